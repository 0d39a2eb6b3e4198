#!/usr/bin/env python3
"""The kernel's own KVM selftests, unmodified, against the model: gmem exec's conformance run.

    python conformance/selftests.py [--cache DIR] [--source DIR] [--only NAME ...] [--timeout S]

1. Gets the Linux 7.2 source: Debian's `linux-source-7.2` package from trixie-backports,
   downloaded with apt-get into a private apt state (nothing on the system changes), and
   unpacks only what the selftests need: tools/, include/, arch/x86/include/, the x86
   syscall tables and scripts/subarch.include (--source DIR uses an unpacked tree instead).
2. Installs the uAPI headers as `make headers_install` does (headers_install.sh's rewrites,
   unifdef -U__KERNEL__, the generated asm/unistd_*.h and asm-generic wrappers).
3. Builds the selftests below with the selftests' own Makefile (serially).
4. Runs each under `gmem exec` on every platform it covers and prints TAP, one `ok` line per
   (test, platform); the exit status is 1 when a run fails that is not a known limitation of
   this machine's KVM (those are `# TODO` with the reason, see README.md).

Everything lives in the cache directory (default: ~/.cache/gmem-conformance), so a second
run builds nothing.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

SUITE = "trixie-backports"
PACKAGE = "linux-source-7.2"
TREE = "linux-source-7.2"
# what the selftests need from the tree (tools/ has the selftests and their libraries)
PARTS = ("tools/", "include/", "arch/x86/include/", "arch/x86/entry/syscalls/", "scripts/subarch.include")

# (selftest, platforms): the VM types a test covers come from KVM_CAP_VM_TYPES, so a test
# that loops over them runs once per platform
TESTS = [
    ("guest_memfd_test", ("amd", "intel", "none")),
    ("set_memory_region_test", ("amd",)),
    ("pre_fault_memory_test", ("amd",)),
    ("x86/private_mem_conversions_test", ("amd",)),
    ("x86/private_mem_kvm_exits_test", ("amd",)),
]


# ---------------------------------------------------------------------- the source

def _apt_uri():
    for path, rx in (("/etc/apt/sources.list.d/debian.sources", r"^URIs:\s*(\S+)"),
                     ("/etc/apt/sources.list", r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)")):
        try:
            m = re.search(rx, open(path).read(), re.M)
        except OSError:
            continue
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def fetch_source(cache):
    """Download and unpack the package's tree (the parts in PARTS) into cache: its path."""
    tree = os.path.join(cache, TREE)
    if os.path.isfile(os.path.join(tree, "tools", "testing", "selftests", "kvm", "Makefile")):
        return tree
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise RuntimeError("needs apt-get and dpkg-deb to fetch the Linux source (or --source DIR)")
    apt = os.path.join(cache, "apt")
    for d in ("etc/apt/preferences.d", "cache/archives/partial", "state/lists/partial"):
        os.makedirs(os.path.join(apt, d), exist_ok=True)
    with open(os.path.join(apt, "etc/apt/sources.list"), "w") as f:
        f.write(f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {_apt_uri()} {SUITE} main\n")
    opts = ["-o", f"Dir::Etc={apt}/etc/apt", "-o", f"Dir::Cache={apt}/cache", "-o", f"Dir::State={apt}/state",
            "-o", f"Dir::Etc::SourceParts={apt}/etc/apt/none", "-o", "APT::Sandbox::User=root"]
    debs = [f for f in os.listdir(cache) if f.startswith(PACKAGE + "_") and f.endswith(".deb")]
    if not debs:
        subprocess.run(["apt-get", *opts, "update", "-qq"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", *opts, "download", "-qq", PACKAGE], check=True, cwd=cache)
        debs = [f for f in os.listdir(cache) if f.startswith(PACKAGE + "_") and f.endswith(".deb")]
    with tempfile.TemporaryDirectory(dir=cache) as x:
        subprocess.run(["dpkg-deb", "-x", os.path.join(cache, sorted(debs)[-1]), x], check=True)
        tarball = os.path.join(x, "usr", "src", f"{TREE}.tar.xz")
        with tarfile.open(tarball) as t:
            members = [m for m in t if any(m.name.startswith(f"{TREE}/{p}") for p in PARTS)]
            t.extractall(cache, members=members, filter="tar") if hasattr(tarfile, "data_filter") \
                else t.extractall(cache, members=members)
    return tree


# ---------------------------------------------------------------------- headers_install

_REWRITES = [   # scripts/headers_install.sh's sed script
    (re.compile(r"([\s(])(__user|__force|__iomem)\s"), r"\1"),
    (re.compile(r"__attribute_const__(\s|$)", re.M), r"\1"),
    (re.compile(r"^#include <linux/compiler.h>", re.M), ""),
    (re.compile(r"(^|[^a-zA-Z0-9])__packed([^a-zA-Z0-9_]|$)", re.M), r"\1__attribute__((packed))\2"),
    (re.compile(r"(^|[\s(])(inline|asm|volatile)([\s(]|$)", re.M), r"\1__\2__\3"),
    (re.compile(r"#(ifndef|define|endif\s*/[*])\s*_UAPI", re.M), r"#\1 "),
]


def unifdef(text):
    """unifdef -U__KERNEL__: drop the __KERNEL__ branches of #if/#ifdef/#ifndef (and those
    directives); an #elif after a dropped branch becomes the #if."""
    out, stack, keep = [], [], True          # stack: [keep of the enclosing text, state]
    for line in text.split("\n"):
        m = re.match(r"\s*#\s*(ifdef|ifndef|if|elif|else|endif)\b(.*)", line)
        d, rest = (m.group(1), m.group(2).strip()) if m else (None, None)
        if d in ("ifdef", "ifndef", "if"):
            kern = None
            if d in ("ifdef", "ifndef") and rest == "__KERNEL__":
                kern = d == "ifndef"
            elif d == "if" and re.fullmatch(r"!?\s*defined\s*\(?\s*__KERNEL__\s*\)?", rest):
                kern = rest.startswith("!")
            stack.append([keep, kern])
            if kern is not None:
                keep = keep and kern
                continue
        elif d in ("elif", "else") and stack[-1][1] is not None:
            parent, kern = stack[-1]
            if kern == "dropped-rest" or kern is True:
                stack[-1][1], keep = "dropped-rest", False
                continue
            if d == "else":
                keep = parent
                continue
            stack[-1][1], keep = None, parent          # the #elif of a dropped branch: now the #if
            line = "#if " + rest
        elif d == "endif":
            parent, kern = stack.pop()
            if kern is not None:
                keep = parent
                continue
        if keep:
            out.append(line)
    return "\n".join(out)


def _install_dir(src, dst):
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".h"):
                continue
            text = open(os.path.join(root, f)).read()
            for rx, rep in _REWRITES:
                text = rx.sub(rep, text)
            out = os.path.join(dst, os.path.relpath(os.path.join(root, f), src))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "w") as fh:
                fh.write(unifdef(text))


def _syscall_header(tbl, abis, dst, offset=None):
    """scripts/syscallhdr.sh: __NR_* of the given ABIs."""
    guard = "_UAPI_ASM_" + re.sub(r"__", "_", re.sub(r"[^A-Z0-9_]", "_", os.path.basename(dst).upper()))
    lines = [f"#ifndef {guard}", f"#define {guard}", ""]
    for row in open(tbl):
        f = row.split()
        if len(f) >= 3 and f[0][0].isdigit() and f[1] in abis:
            lines.append(f"#define __NR_{f[2]} {f'({offset} + {f[0]})' if offset else f[0]}")
    lines += ["", f"#endif /* {guard} */", ""]
    with open(dst, "w") as fh:
        fh.write("\n".join(lines))


def headers_install(tree, dst):
    """usr/include of `make headers_install` for x86, into dst."""
    if os.path.isfile(os.path.join(dst, "linux", "kvm.h")):
        return dst
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _install_dir(os.path.join(tree, "include", "uapi"), tmp)
    _install_dir(os.path.join(tree, "arch", "x86", "include", "uapi"), tmp)
    for line in open(os.path.join(tree, "include", "uapi", "asm-generic", "Kbuild")):
        m = re.match(r"mandatory-y \+= (\S+)", line)
        if m and not os.path.exists(os.path.join(tmp, "asm", m.group(1))):
            with open(os.path.join(tmp, "asm", m.group(1)), "w") as fh:
                fh.write(f"#include <asm-generic/{m.group(1)}>\n")
    tbl = os.path.join(tree, "arch", "x86", "entry", "syscalls")
    _syscall_header(os.path.join(tbl, "syscall_64.tbl"), ("common", "64"), os.path.join(tmp, "asm", "unistd_64.h"))
    _syscall_header(os.path.join(tbl, "syscall_64.tbl"), ("common", "x32"), os.path.join(tmp, "asm", "unistd_x32.h"),
                    "__X32_SYSCALL_BIT")
    _syscall_header(os.path.join(tbl, "syscall_32.tbl"), ("i386",), os.path.join(tmp, "asm", "unistd_32.h"))
    os.rename(tmp, dst)
    return dst


# ---------------------------------------------------------------------- build and run

def build(tree, cache, names):
    out = os.path.join(cache, "build")
    hdrs = headers_install(tree, os.path.join(cache, "usr", "include"))
    want = [os.path.join(out, n) for n in names]
    missing = [w for w in want if not os.access(w, os.X_OK)]
    if missing:
        subprocess.run(["make", "-s", f"OUTPUT={out}", f"KHDR_INCLUDES=-isystem {hdrs}", "ARCH=x86", *missing],
                       cwd=os.path.join(tree, "tools", "testing", "selftests", "kvm"), check=True)
    return out


def host_limits():
    """Known limits of this machine's /dev/kvm for the selftests: {test: reason}."""
    if os.path.isdir("/sys/module/kvm_pvm"):
        pvm = "this machine's KVM is PVM (kvm_pvm), "
        return {
            "set_memory_region_test": pvm + "which delivers guest events in software: an IDT in MMIO makes "
            "it shut the guest down (KVM_EXIT_SHUTDOWN) where VMX/SVM KVM reports "
            "KVM_INTERNAL_ERROR_DELIVERY_EV (test_mmio_during_vectoring), and the test stops there",
            "x86/private_mem_conversions_test": pvm + "whose guests make hypercalls with SYSCALL: the "
            "guest's VMMCALL/VMCALL for KVM_HC_MAP_GPA_RANGE never reaches KVM (#UD)",
        }
    return {}


def run_one(exe, platform, timeout):
    cmd = [sys.executable, "-m", "gmem", "exec", "--platform", platform, "--", exe]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = None, (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    return rc, out, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "gmem-conformance"))
    ap.add_argument("--source", help="an unpacked Linux 7.2 tree to use instead of downloading one")
    ap.add_argument("--only", action="append", help="run only this selftest (repeat)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run (default: %(default)s)")
    ap.add_argument("--verbose", action="store_true", help="print every run's output")
    args = ap.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    tests = [(n, p) for n, p in TESTS if not args.only or n in args.only]
    try:
        tree = args.source or fetch_source(args.cache)
        out = build(tree, args.cache, [n for n, _ in tests])
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"1..0 # SKIP the KVM selftests could not be fetched or built: {e}")
        return 0
    limits = host_limits()
    runs = [(n, p) for n, ps in tests for p in ps]
    print(f"1..{len(runs)}")
    from gmem._exec import hybrid_available
    usable, why = hybrid_available()
    if not usable:                          # every one of them runs guest code
        for i, (name, platform) in enumerate(runs, 1):
            print(f"ok {i} - {name} --platform {platform} # SKIP no /dev/kvm that runs a plain VM ({why})")
        return 0
    failed = 0
    for i, (name, platform) in enumerate(runs, 1):
        rc, text, secs = run_one(os.path.join(out, name), platform, args.timeout)
        what = f"{name} --platform {platform} ({secs:.1f} s)"
        cases = [ln for ln in text.splitlines() if ln.startswith("Testing ")]
        if rc == 0:
            print(f"ok {i} - {what}" + (f": {len(cases)} cases" if cases else ""))
        elif rc == 4:
            skip = next((ln for ln in text.splitlines() if "SKIP" in ln), "skipped")
            print(f"ok {i} - {what} # SKIP {skip}")
            failed += 1                     # the point is that they run: a skip is a failure here
        elif name in limits:
            print(f"not ok {i} - {what} # TODO {limits[name]}")
        else:
            print(f"not ok {i} - {what}: " + ("timed out" if rc is None else f"exit status {rc}"))
            failed += 1
        if args.verbose or (rc not in (0,) and name not in limits):
            print("\n".join("# " + ln for ln in text.splitlines()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
