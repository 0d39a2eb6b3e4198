"""gmem exec: run an unmodified program with the model as its /dev/kvm.

    gmem exec [--platform amd|intel|none] [--kernel K] [--set option=value ...] [--report]
              [--guest NAME|FILE.py] [--no-hybrid] -- PROGRAM ARGS...
    gmem shim-path

The program runs with gmem's preload library (LD_PRELOAD, src/gmem/shim/gmem_shim.c); this
process runs the model (gmem/_exec/server.py) and answers it over a UNIX socket. Guest code
runs on this machine's own /dev/kvm where it can run a plain VM ("hybrid"); see README.md,
"gmem exec", for what the mode models and what it cannot.
"""
import argparse
import fcntl
import importlib.util
import os
import re
import socket
import sys
import tempfile

__all__ = ["add_parsers", "cmd_exec", "cmd_shim_path", "hybrid_available", "run", "shim_path"]


def shim_path():
    """The preload library built with the package (gmem/_shim*.so)."""
    spec = importlib.util.find_spec("gmem._shim")
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        raise FileNotFoundError("gmem's preload library (gmem/_shim*.so) is not built: "
                                "reinstall gmem (pip install .)")
    return spec.origin


def hybrid_available():
    """(True, "") when this machine's /dev/kvm can create a plain VM, else (False, why)."""
    from gmem import uapi
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"/dev/kvm: {e.strerror}"
    try:
        if fcntl.ioctl(fd, uapi.KVM_GET_API_VERSION, 0) != uapi.KVM_API_VERSION:
            return False, "/dev/kvm: unexpected KVM_GET_API_VERSION"
        vm = fcntl.ioctl(fd, uapi.KVM_CREATE_VM, 0)
        os.close(vm)
        return True, ""
    except OSError as e:
        return False, f"/dev/kvm: KVM_CREATE_VM: {e.strerror}"
    finally:
        os.close(fd)


def make_host(platform, kernel, options, memory):
    """The model machine: gmem.Host with guest_memfd contents in memfds."""
    import gmem
    kw = dict(options)
    if kernel is not None:
        kw["kernel"] = kernel
    try:
        return gmem.Host(memory=memory, platform=platform, content_memfd=True, **kw)
    except TypeError as e:
        if kernel is not None and "'kernel'" in str(e):
            raise ValueError("--kernel: this gmem has no kernel versions yet") from None
        m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        raise ValueError(f"--set: {m.group(1)!r} is no gmem.Host option" if m else str(e)) from None


def run(argv, platform="amd", kernel=None, options=(), memory=64 << 30, report=False,
        guest=None, hybrid=None, stdout=None):
    """Run argv under the model; its exit status (128 + signal when killed). report: print
    the model's counters and check() at exit (to stdout, or the given file)."""
    from gmem._exec.server import Server, serve
    host = make_host(platform, kernel, options, memory)
    if hybrid is None:
        hybrid, why = hybrid_available()
    guest_factory = None
    if guest is not None:
        from gmem._exec.guest import load_guest
        guest_factory = load_guest(guest)
    server = Server(host, hybrid, guest=guest_factory,
                    log=lambda m: print(f"gmem exec: {m}", file=sys.stderr) if os.environ.get("GMEM_EXEC_DEBUG") else None)
    tmp = tempfile.mkdtemp(prefix="gmem-exec-")
    path = os.path.join(tmp, "sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(path)
        listener.listen(64)
        env = dict(os.environ)
        env["LD_PRELOAD"] = shim_path() + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
        env["GMEM_EXEC_SOCKET"] = path
        env["GMEM_EXEC_HYBRID"] = "1" if hybrid else "0"
        env["GMEM_EXEC_PLATFORM"] = platform
        # a PVM host (kvm_pvm) hangs a guest's VMCALL/VMMCALL: the preload library turns the
        # hang into the guest's #UD (KVM_X86_QUIRK_FIX_HYPERCALL_INSN off, gmem_shim.c)
        env["GMEM_EXEC_PVM"] = "1" if hybrid and os.path.isdir("/sys/module/kvm_pvm") else "0"
        child = _spawn(argv, env)           # kept: a collected Popen would reap the pid
        with _signals_to(child.pid):
            status = serve(server, listener, child.pid)
    finally:
        listener.close()
        try:
            os.unlink(path)
        except OSError:
            pass
        os.rmdir(tmp)
    if report:
        from gmem._exec.report import report as make_report
        print(make_report(server), file=stdout or sys.stdout)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _spawn(argv, env):
    """Start the program (its Popen): it keeps our fds (as exec would) and dies with us (PR_SET_PDEATHSIG),
    so it never runs on without its model."""
    import ctypes
    import signal
    import subprocess
    libc = ctypes.CDLL(None, use_errno=True)

    def in_child():
        libc.prctl(1, int(signal.SIGKILL))          # PR_SET_PDEATHSIG
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        return subprocess.Popen(argv, env=env, close_fds=False, preexec_fn=in_child)
    except OSError as e:
        raise OSError(e.errno, f"{argv[0]}: {e.strerror}") from None


class _signals_to:
    """While the program runs: Ctrl-C is the program's to handle (the terminal sends it to both),
    and SIGTERM/SIGHUP sent to gmem exec are passed on to it."""

    def __init__(self, pid):
        self.pid = pid

    def __enter__(self):
        import signal
        self.old = {sig: signal.signal(sig, handler) for sig, handler in (
            (signal.SIGINT, signal.SIG_IGN), (signal.SIGTERM, self._forward), (signal.SIGHUP, self._forward))}

    def _forward(self, sig, frame):
        os.kill(self.pid, sig)

    def __exit__(self, *exc):
        import signal
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------- the command line

def _parse_set(items):
    """--set key=value[,key=value] into Host keywords (gmem.Host checks names and values)."""
    out = {}
    for item in items or []:
        for kv in filter(None, (p.strip() for p in item.split(","))):
            key, sep, value = kv.partition("=")
            if not sep:
                raise ValueError(f"--set {kv!r}: use key=value")
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def _fail(msg):
    print(f"gmem exec: error: {msg}", file=sys.stderr)
    return 2


def cmd_exec(args):
    argv = list(args.program)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        return _fail("no program to run (gmem exec [options] -- PROGRAM ARGS...)")
    try:
        return run(argv, platform=args.platform, kernel=args.kernel, options=_parse_set(args.set),
                   report=args.report, guest=args.guest, hybrid=False if args.no_hybrid else None)
    except (TypeError, ValueError, OSError) as e:      # a bad option or program: one line, status 2
        return _fail(e)


def cmd_shim_path(args):
    print(shim_path())
    return 0


def add_parsers(sub):
    """Register `gmem exec` and `gmem shim-path` on the CLI's subparsers."""
    e = sub.add_parser("exec", help="run an unmodified program with the model as its /dev/kvm",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--platform", default="amd", choices=("amd", "intel", "none"),
                   help="the simulated machine (default: %(default)s)")
    e.add_argument("--kernel", help="the kernel version the model follows")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="a Host option, e.g. prepare=alloc")
    e.add_argument("--report", action="store_true",
                   help="print the model's counters and host.check() when the program exits")
    e.add_argument("--guest", metavar="NAME|FILE.py",
                   help="a scripted guest for confidential VMs (their code cannot run on a plain host)")
    e.add_argument("--no-hybrid", action="store_true",
                   help="do not use this machine's /dev/kvm: KVM_RUN fails with ENOEXEC")
    e.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM ARGS...")
    e.set_defaults(func=cmd_exec)
    p = sub.add_parser("shim-path", help="print the preload library, for harnesses that set LD_PRELOAD")
    p.set_defaults(func=cmd_shim_path)

