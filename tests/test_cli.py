"""`python -m gmem` as a user runs it: each subcommand in a subprocess, in a fresh directory,
on small inputs; its output's content, the files it writes, and its exit status on bad input
(2, a one-line error on stderr, nothing written)."""
import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

import gmem
from gmem import uapi

GMEM_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(gmem.__file__)))
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SMALL_TOML = """\
description = "two batches of faults around a conversion on a SW_PROTECTED VM"
[host]
memory = "256M"
platform = "none"

[[vms]]
name = "g"
type = "sw_protected"
vcpus = 2
gmem = [{ name = "ram", size = "4M" }]
memslots = [{ slot = 1, gpa = "1G", size = "4M", gmem = "ram" }]

[[steps]]
op = "attributes"
gpa = "1G"
size = "2M"
private = true
[[steps]]
op = "faults"
gpa = "1G"
size = "4M"
vcpu = 1
[[steps]]
op = "convert"
gpa = "1G"
size = "1M"
to = "shared"
[[steps]]
op = "faults"
gpa = "1G"
size = "4M"
pattern = "random"
[[steps]]
op = "check"
"""


def gmem_cli(cwd, *args, env_extra=None, timeout=300):
    """Run `python -m gmem ARGS` in cwd with the gmem this test imported (installed or in place)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([GMEM_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["MPLBACKEND"] = "Agg"
    env.update(env_extra or {})
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "gmem", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    p.seconds = time.perf_counter() - t
    return p


def ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p.stdout


def table(out):
    """The rows of the CLI's `_table` output: {first column: [other columns]}."""
    rows = {}
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if i and re.fullmatch(r"-+(  -+)+", line):
            for row in lines[i + 1:]:
                if not row.strip():
                    break
                parts = re.split(r"\s{2,}", row.strip())
                rows[parts[0]] = parts[1:]
    return rows


def png_info(path):
    """(width, height) of a PNG, after checking its signature, chunk CRCs and pixel data size."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, data[:16]
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + body), tag
        chunks.append((tag, body))
        pos += 12 + n
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, color = struct.unpack(">IIBB", chunks[0][1][:10])
    raw = zlib.decompress(b"".join(b for t, b in chunks if t == b"IDAT"))
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
    assert depth == 8 and len(raw) == h * (1 + w * channels)
    return w, h


@pytest.fixture
def no_mpl(tmp_path):
    """An environment in which `import matplotlib` fails, as on a machine without gmem[plot]."""
    d = tmp_path / "_no_mpl"
    (d / "matplotlib").mkdir(parents=True)
    (d / "matplotlib" / "__init__.py").write_text("raise ImportError('matplotlib hidden by the test')\n")
    return {"PYTHONPATH": os.pathsep.join([str(d), GMEM_ROOT])}


def listing(d):
    return sorted(p.name for p in d.iterdir() if not p.name.startswith("_"))


# ------------------------------------------------------------------ help

@pytest.mark.parametrize("cmd, options", [
    ((), ["demo", "run", "compare", "replay"]),
    (("demo",), ["--no-plot", "--out"]),
    (("run",), ["--set", "--trace", "--json", "--all", "scenario"]),
    (("compare",), ["--policy", "--chart", "scenario"]),
    (("replay",), ["--vm-type", "--private", "--huge-folios", "--memory", "--chunk", "--plot", "--quiet", "file"]),
])
def test_help(tmp_path, cmd, options):
    out = ok(gmem_cli(tmp_path, *cmd, "--help"))
    assert out.startswith(f"usage: gmem {' '.join(cmd)}".rstrip())
    for o in options:
        assert o in out
    assert listing(tmp_path) == []


def test_no_command_is_a_usage_error(tmp_path):
    p = gmem_cli(tmp_path)
    assert p.returncode == 2 and "usage: gmem" in p.stderr and p.stdout == ""


# ------------------------------------------------------------------ demo

def test_demo(tmp_path):
    p = gmem_cli(tmp_path, "demo")
    out = ok(p)
    print(f"gmem demo: {p.seconds:.2f} s wall (subprocess, with interpreter start and the PNG)")
    assert p.seconds < 60            # loose: the demo's target is < 10 s
    assert out.startswith("gmem demo: An SEV-SNP guest's life")
    rows = table(out)
    assert "RMPUPDATE / PSMASH / PVALIDATE" in rows
    rmpupdate, psmash, pvalidate = (int(x) for x in rows["RMPUPDATE / PSMASH / PVALIDATE"][0].split(" / "))
    assert rmpupdate > 0 and psmash >= 1 and pvalidate > 0
    assert rows["host RMP violations"] == ["0"]
    assert rows["RMP-assigned pages after shutdown"] == ["0"]
    assert int(rows["RMP-assigned pages (before shutdown)"][0]) > 0
    assert int(rows["huge folio splits"][0]) >= 1
    for event in ("launched with a 1024 KiB initial image", "to shared", "to private", "PSMASH", "shut down"):
        assert event in out
    assert "host.check() passed" in out
    assert re.search(r"ran in \d+\.\d\d s", out)
    assert "wrote gmem-demo.png" in out
    assert listing(tmp_path) == ["gmem-demo.png"]
    w, h = png_info(tmp_path / "gmem-demo.png")
    assert w >= 256 and h >= 32
    # a labelled figure with matplotlib; else the bare map (flat colours compress to ~1 KB)
    assert (tmp_path / "gmem-demo.png").stat().st_size > (10000 if HAVE_MPL else 500)


def test_demo_no_plot_and_out(tmp_path):
    out = ok(gmem_cli(tmp_path, "demo", "--no-plot"))
    assert "host RMP violations" in out and "wrote" not in out
    assert listing(tmp_path) == []
    (tmp_path / "pics").mkdir()
    out = ok(gmem_cli(tmp_path, "demo", "--out", "pics/map.png"))
    assert "wrote pics/map.png" in out
    png_info(tmp_path / "pics" / "map.png")


def test_demo_without_matplotlib(tmp_path, no_mpl):
    out = ok(gmem_cli(tmp_path, "demo", env_extra=no_mpl))
    assert "wrote gmem-demo.png (bare image" in out
    w, h = png_info(tmp_path / "gmem-demo.png")
    assert (w, h) == (512, 256)      # one column per 4K page, 32 rows of 2M scaled x8
    assert (tmp_path / "gmem-demo.png").stat().st_size > 500


# ------------------------------------------------------------------- run

@pytest.mark.parametrize("name", ["snp-life", "sw-conversions", "tdx-life"])
def test_run_builtin(tmp_path, name):
    out = ok(gmem_cli(tmp_path, "run", name))
    assert re.match(rf"scenario {name}: \d+ steps in \d+\.\d+ s", out)
    rows = table(out)
    assert "host.folios_allocated" in rows
    if name == "snp-life":
        assert int(rows["rmp.rmpupdate"][0]) > 0 and rows.get("rmp.rmp_violations", ["0"]) == ["0"]
        assert "guest: shut down" in out
    elif name == "tdx-life":
        assert "td: launched" in out and "hypercall exits" in out
    else:
        assert int(rows["guest.pf_fixed"][0]) > 0
    assert listing(tmp_path) == []


def test_run_json(tmp_path):
    d = json.loads(ok(gmem_cli(tmp_path, "run", "sw-conversions", "--json")))
    assert set(d) == {"counters", "events", "seconds"}
    assert d["counters"]["guest.pf_taken"] == d["counters"]["guest.pf_fixed"] + d["counters"]["guest.pf_spurious"]
    assert all(isinstance(v, int) for v in d["counters"].values())


def test_run_toml_file(tmp_path):
    (tmp_path / "small.toml").write_text(SMALL_TOML)
    d = json.loads(ok(gmem_cli(tmp_path, "run", "small.toml", "--json")))
    c = d["counters"]
    # 1024 pages faulted (2M private, 2M shared), 1M converted to shared (256 SPTEs zapped),
    # then the same 1024 pages again: 256 refaulted, 768 spurious
    assert c["g.pf_taken"] == 2048
    assert c["g.pf_fixed"] == 1024 + 256
    assert c["g.pf_spurious"] == 768
    assert c["g.zapped_sptes"] == 256
    assert c["g.pages_4k"] == 1024
    assert c["g.memory_fault_exits"] == 0
    assert d["events"][1] == "g: converted 1024 KiB at 0x40000000 to shared (0 hypercall exits)"
    out = ok(gmem_cli(tmp_path, "run", "small.toml", "--set", "huge_folios=true"))
    assert "scenario small.toml: 5 steps" in out
    assert listing(tmp_path) == ["small.toml"]


def test_run_trace_npy(tmp_path):
    out = ok(gmem_cli(tmp_path, "run", "sw-conversions", "--trace", "x.npy"))
    n = int(re.search(r"wrote (\d+) trace records to x.npy", out).group(1))
    recs = np.load(tmp_path / "x.npy")
    assert recs.dtype == gmem.TRACE_DTYPE and len(recs) == n > 0
    assert (np.diff(recs["seq"].astype(np.int64)) == 1).all()
    names = [gmem.TRACE_EVENTS[e] for e in np.unique(recs["event"])]
    assert {"kvm_page_fault", "spte_install", "spte_zap"} <= set(names)
    pf = recs[recs["event"] == gmem.TRACE_EVENTS.index("kvm_page_fault")]
    assert (pf["a"] >= np.uint64(4 << 30)).all()                # gpa, inside the memslot at 4G
    assert listing(tmp_path) == ["x.npy"]


def test_run_trace_text(tmp_path):
    (tmp_path / "small.toml").write_text(SMALL_TOML)
    out = ok(gmem_cli(tmp_path, "run", "small.toml", "--trace", "trace.txt"))
    n = int(re.search(r"wrote (\d+) trace records to trace.txt", out).group(1))
    lines = (tmp_path / "trace.txt").read_text().splitlines()
    assert len(lines) == n > 0
    line_re = re.compile(r"\s*\d+ vcpu\d+: (" + "|".join(gmem.TRACE_EVENTS) + r"): (\w+=\S+ ?)+")
    assert all(line_re.fullmatch(ln) for ln in lines), [ln for ln in lines if not line_re.fullmatch(ln)][:3]
    faults = [ln for ln in lines if ": kvm_page_fault: " in ln]
    assert len(faults) == 2048
    assert re.search(r"vcpu1: kvm_page_fault: gpa=0x40000000 error_code=0x[0-9a-f]+$", faults[0])
    assert any("spte_zap" in ln for ln in lines)


# --------------------------------------------------------------- compare

def test_compare_default_policies(tmp_path):
    args = ["compare"] + (["--chart", "c.png"] if HAVE_MPL else [])
    out = ok(gmem_cli(tmp_path, *args))
    assert "scenario snp-life under 3 policy sets:" in out
    assert "[0] prepare=fault,prepared_tracking=gmem" in out
    assert "[1] prepare=alloc,prepared_tracking=arch" in out
    rows = table(out)
    prep = [int(x) for x in rows["gmem_prepare"]]
    rmpupdate = [int(x) for x in rows["rmp.rmpupdate"]]
    assert len(prep) == 3 and prep[0] != prep[1]              # the RFC prepares at allocation
    assert len(set(rmpupdate)) == 1 and rmpupdate[0] > 0      # ... but the RMP sees the same updates
    assert rows["rmp.leaked_pages"] == ["0", "0", "0"]
    if HAVE_MPL:
        assert "wrote c.png" in out
        png_info(tmp_path / "c.png")
        assert (tmp_path / "c.png").stat().st_size > 5000
        assert listing(tmp_path) == ["c.png"]


def test_compare_given_policy_sets(tmp_path):
    out = ok(gmem_cli(tmp_path, "compare", "sw-conversions", "--policy", "prepare=alloc",
                      "--policy", "invalidate=invalidate_folio,huge_folios=true"))
    assert "under 2 policy sets" in out
    assert "[1] invalidate=invalidate_folio,huge_folios=True" in out
    rows = table(out)
    assert len(rows["pf_fixed"]) == 2
    assert rows["host.folio_splits"][0] == "0" and int(rows["host.folio_splits"][1]) >= 1


def test_compare_chart_without_matplotlib(tmp_path, no_mpl):
    out = ok(gmem_cli(tmp_path, "compare", "--chart", "c.png", env_extra=no_mpl))
    assert "matplotlib is not installed: no chart" in out
    assert listing(tmp_path) == []


# ---------------------------------------------------------------- replay

def _stream(n=5000, pages=2048):
    a = np.zeros(n, dtype=[("vcpu", "<u4"), ("gpa", "<u8"), ("error_code", "<u8")])
    a["vcpu"] = np.arange(n) % 2
    a["gpa"] = (np.arange(n) % pages).astype(np.uint64) << np.uint64(12)
    a["error_code"] = uapi.PFERR_WRITE_MASK
    return a


def test_replay_npy(tmp_path):
    np.save(tmp_path / "s.npy", _stream())
    args = ["replay", "s.npy", "--chunk", "1000"] + (["--plot", "r.png"] if HAVE_MPL else [])
    out = ok(gmem_cli(tmp_path, *args))
    assert re.match(r"replayed 5000 faults in \d+\.\d+ s: \d+\.\d\d million faults/s \(\d+ ns/fault\)", out)
    rows = table(out)
    assert rows["pf_taken"] == ["5000"]
    assert rows["pf_fixed"] == ["2048"] and rows["pf_spurious"] == ["2952"]
    assert rows["pages_4k"] == ["2048"]
    if HAVE_MPL:
        assert "wrote r.png" in out
        png_info(tmp_path / "r.png")
        assert sorted(listing(tmp_path)) == ["r.png", "s.npy"]


def test_replay_csv_private(tmp_path):
    lines = ["vcpu,gpa,error_code"] + [f"{i % 3},{(i % 512) << 12:#x},0x2" for i in range(1500)]
    (tmp_path / "s.csv").write_text("\n".join(lines) + "\n")
    out = ok(gmem_cli(tmp_path, "replay", "s.csv", "--private", "--huge-folios", "--memory", "1G"))
    rows = table(out)
    assert rows["pf_taken"] == ["1500"]
    assert rows["pages_2m"] == ["1"]                  # 2M private folio, mapped 2M at the first fault
    assert rows["memory_fault_exits"] == ["0"]
    assert listing(tmp_path) == ["s.csv"]


# ------------------------------------------------------------- bad input

BAD = [
    # (name, files to create, argv, what stderr names); argv writes "out.*" if it wrongly succeeds
    ("run: missing TOML file", {}, ["run", "missing.toml", "--trace", "out.npy"], "no such file: missing.toml"),
    ("run: malformed TOML", {"bad.toml": "x = [\n"}, ["run", "bad.toml", "--trace", "out.npy"], "malformed TOML"),
    ("run: TOML with a step missing a key", {"m.toml": "[[vms]]\ntype = 'default'\n[[steps]]\nop = 'faults'\n"},
     ["run", "m.toml", "--trace", "out.txt"], "missing key 'size'"),
    ("run: TOML of the wrong shape", {"m.toml": "steps = 'nope'\n"}, ["run", "m.toml"], "array of tables"),
    ("run: TOML with an unknown op", {"m.toml": "[[steps]]\nop = 'reboot'\n"}, ["run", "m.toml"], "unknown op"),
    ("run: unknown scenario", {}, ["run", "no-such-scenario", "--trace", "out.npy"], "unknown scenario"),
    ("run: unknown policy key", {}, ["run", "snp-life", "--set", "bogus=1", "--trace", "out.npy"], "unknown policy"),
    ("run: unknown policy value", {}, ["run", "snp-life", "--set", "prepare=sometimes", "--trace", "out.npy"],
     "prepare must be one of"),
    ("run: trace into a missing directory", {}, ["run", "snp-life", "--trace", "nodir/out.npy"], "no directory"),
    ("compare: unknown policy key", {}, ["compare", "--policy", "prepare=alloc,foo=bar", "--chart", "out.png"],
     "unknown policy"),
    ("compare: unknown policy value", {}, ["compare", "--policy", "prepare=alloc", "--policy", "invalidate=never",
                                          "--chart", "out.png"], "invalidate must be one of"),
    ("compare: non-boolean huge_folios", {}, ["compare", "--policy", "huge_folios=yes", "--chart", "out.png"],
     "true or false"),
    ("compare: unknown scenario", {}, ["compare", "nope", "--chart", "out.png"], "unknown scenario"),
    ("compare: missing TOML file", {}, ["compare", "missing.toml", "--chart", "out.png"], "no such file"),
    ("compare: scenario that cannot run", {"m.toml": "[[vms]]\n[[steps]]\nop = 'faults'\n"},
     ["compare", "m.toml", "--chart", "out.png"], "fails under every policy set"),
    ("replay: missing file", {}, ["replay", "missing.npy", "--plot", "out.png"], "no such file: missing.npy"),
    ("replay: .npy that is not a stream", {"plain.npy": np.arange(10)}, ["replay", "plain.npy", "--plot", "out.png"],
     "need a structured array"),
    ("replay: CSV that is not a stream", {"s.csv": "a,b\n1,2\n"}, ["replay", "s.csv", "--plot", "out.png"],
     "CSV needs three columns"),
    ("replay: CSV with garbage", {"s.csv": "vcpu,gpa,error_code\n0,zz,2\n"}, ["replay", "s.csv"],
     "cannot read the fault stream"),
    ("replay: empty CSV", {"s.csv": "vcpu,gpa,error_code\n"}, ["replay", "s.csv", "--plot", "out.png"],
     "empty fault stream"),
    ("replay: text file as .npy", {"t.npy": "hello\n"}, ["replay", "t.npy"], "cannot read the fault stream"),
    ("replay: unknown vm type", {"s.npy": _stream(10)}, ["replay", "s.npy", "--vm-type", "nope", "--plot", "out.png"],
     "unknown vm type"),
    ("demo: PNG into a missing directory", {}, ["demo", "--out", "nodir/out.png"], "no directory"),
]


@pytest.mark.parametrize("files, argv, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(tmp_path, files, argv, message):
    for name, content in files.items():
        if isinstance(content, np.ndarray):
            np.save(tmp_path / name, content)
        else:
            (tmp_path / name).write_text(content)
    before = listing(tmp_path)
    p = gmem_cli(tmp_path, *argv)
    assert p.returncode == 2, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    err = p.stderr.splitlines()
    assert len(err) == 1, p.stderr
    assert err[0].startswith(f"gmem {argv[0]}: error: ") and message in err[0], err[0]
    assert p.stdout == ""
    assert listing(tmp_path) == before                     # nothing written
    assert not any(tmp_path.glob("out.*"))
