"""`python -m gmem` as a user runs it: each subcommand in a subprocess, in a fresh directory,
on small inputs; its output's content, the files it writes, and its exit status on bad input
(2, a one-line error on stderr, nothing written)."""
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
from gmem import results, uapi

pytest.importorskip("matplotlib", reason="the CLI tests need the cli extra (pip install '.[test]')")
GMEM_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(gmem.__file__)))
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


def doc_of(p):
    """The one JSON result document a --json command printed (stdout holds nothing else),
    checked against the shipped schema."""
    d = json.loads(p.stdout)
    results.validate(d)
    return d


VIOLATION_TOML = """\
description = "a TDX guest_memfd with MMAP: a punch zaps only the mirror root, a shared SPTE keeps the freed page"
[host]
memory = "1G"
platform = "intel"
[[vms]]
name = "td"
type = "tdx"
gmem = [{ name = "ram", size = "4M", flags = 1 }]
memslots = [{ slot = 0, gpa = 0, size = "4M", gmem = "ram" }]
[[steps]]
op = "launch"
size = "64K"
[[steps]]
op = "faults"
gpa = "2M"
size = "64K"
private = false
[[steps]]
op = "punch"
gpa = "2M"
size = "64K"
[[steps]]
op = "check"
[[steps]]
op = "faults"
gpa = "2M"
size = "64K"
"""


# ------------------------------------------------------------------ help

@pytest.mark.parametrize("cmd, options", [
    ((), ["demo", "run", "compare", "replay", "sweep", "report"]),
    (("demo",), ["--no-plot", "--out"]),
    (("run",), ["--set", "--trace", "--trace-event", "--trace-gpa", "--json", "--output", "--all", "scenario"]),
    (("compare",), ["--policy", "--chart", "--json", "--output", "scenario"]),
    (("replay",), ["--vm-type", "--private", "--huge-folios", "--memory", "--chunk", "--plot", "--quiet", "--json",
                   "file"]),
    (("sweep",), ["--scheduler", "--workers", "--out", "--json", "spec"]),
    (("report",), ["--out", "result"]),
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
    assert out.startswith("gmem demo: An SEV-SNP guest's life")
    m = re.search(r"RMPUPDATE / PSMASH / PVALIDATE\s+(\d+) / (\d+) / (\d+)", out)
    rmpupdate, psmash, pvalidate = map(int, m.groups())
    assert rmpupdate > 0 and psmash >= 1 and pvalidate > 0
    assert re.search(r"host RMP violations\s+0\b", out)
    assert re.search(r"RMP-assigned pages after shutdown\s+0\b", out)
    assert int(re.search(r"huge folio splits\s+(\d+)", out).group(1)) >= 1
    for event in ("launched with a 1024 KiB initial image", "to shared", "to private", "PSMASH", "shut down"):
        assert event in out
    assert "host.check() passed" in out
    assert "wrote gmem-demo.png" in out
    assert listing(tmp_path) == ["gmem-demo.png"]
    w, h = png_info(tmp_path / "gmem-demo.png")
    assert w >= 800 and h >= 200                        # a labelled figure, not a bare pixel map
    assert (tmp_path / "gmem-demo.png").stat().st_size > 20000


def test_demo_no_plot_and_out(tmp_path):
    out = ok(gmem_cli(tmp_path, "demo", "--no-plot"))
    assert "host RMP violations" in out and "wrote" not in out
    assert listing(tmp_path) == []
    (tmp_path / "pics").mkdir()
    out = ok(gmem_cli(tmp_path, "demo", "--out", "pics/map.png"))
    assert "wrote pics/map.png" in out
    png_info(tmp_path / "pics" / "map.png")


def test_demo_svg_is_svg(tmp_path):
    """Finding: the demo wrote PNG bytes into a .svg file."""
    ok(gmem_cli(tmp_path, "demo", "--out", "map.svg"))
    text = (tmp_path / "map.svg").read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    assert "guest physical address" in text or "guest" in text


def test_demo_without_matplotlib_writes_nothing(tmp_path, no_mpl):
    """Finding: without matplotlib the demo wrote an unlabelled PNG; now it says how to get
    pictures, in one line, and writes nothing."""
    p = gmem_cli(tmp_path, "demo", env_extra=no_mpl)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == ("gmem demo: error: pictures need matplotlib: pip install 'kvm-gmem[cli]' "
                                "(or --no-plot)")
    assert listing(tmp_path) == []
    ok(gmem_cli(tmp_path, "demo", "--no-plot", env_extra=no_mpl))


def test_no_hand_written_png_encoder():
    from gmem import plots
    assert not hasattr(plots, "write_png")


# ------------------------------------------------------------------- run

@pytest.mark.parametrize("name", ["snp-life", "sw-conversions", "tdx-life"])
def test_run_builtin(tmp_path, name):
    out = ok(gmem_cli(tmp_path, "run", name))
    assert re.match(rf"scenario {name}: \d+ steps in \d+\.\d+ s", out)
    assert "host.folios_allocated" in out
    if name == "snp-life":
        assert int(re.search(r"rmp\.rmpupdate\s+(\d+)", out).group(1)) > 0
        assert "guest: shut down" in out
        assert "counters after step 13 (close); guest's just before its close (step 13)" in out
    elif name == "tdx-life":
        assert "td: launched" in out and "hypercall exits" in out
    else:
        assert int(re.search(r"guest\.pf_fixed\s+(\d+)", out).group(1)) > 0
    assert listing(tmp_path) == []


def test_run_json_document(tmp_path):
    """Finding: the JSON lacked the scenario, the effective options and the gmem version."""
    p = gmem_cli(tmp_path, "run", "sw-conversions", "--set", "prepare=alloc", "--json")
    d = doc_of(p)
    assert d["schema"] == "kvm-gmem-result" and d["schema_version"] == 1 and d["kind"] == "run"
    assert d["gmem_version"] == gmem.__version__
    assert d["scenario"]["name"] == "sw-conversions" and d["scenario"]["spec"]["steps"][0]["op"] == "faults"
    assert d["status"] == "ok" and p.returncode == 0
    (r,) = d["runs"]
    # the version's policies but for the one set
    assert r["host"]["options"] == gmem.Host(memory=4096, platform="none", prepare="alloc").options
    assert r["host"]["options"]["prepare"] == "alloc"
    assert r["host"]["platform"] == "none" and r["host"]["memory"] == 4 << 30 and r["host"]["kernel"]
    c = r["counters"]
    assert c["moment"] == {"after_step": 7, "op": "check", "label": "after step 7 (check)"}
    vm = c["vm"]["guest"]
    assert vm["pf_taken"] == vm["pf_fixed"] + vm["pf_spurious"]
    assert sum(v["pf_taken"] for v in c["vcpu"]["guest"]) == vm["pf_taken"]
    assert c["rmp"] is None and c["tdx"] == {}
    assert [t["op"] for t in r["timings"]] == [s["op"] for s in d["scenario"]["spec"]["steps"]]


def test_run_json_with_trace_is_only_json(tmp_path):
    """Finding: --json --trace printed a status line before the JSON."""
    p = gmem_cli(tmp_path, "run", "sw-conversions", "--json", "--trace", "t.npy")
    d = doc_of(p)
    assert d["runs"][0]["trace"]["records"] == len(np.load(tmp_path / "t.npy")) > 0
    assert "wrote" in p.stderr


def test_run_and_compare_agree(tmp_path):
    """Finding: run and compare reported different rmp.rmpupdate for the same scenario and
    policy (snapshots at different moments, said nowhere)."""
    run = doc_of(gmem_cli(tmp_path, "run", "snp-life", "--json"))
    cmp_ = doc_of(gmem_cli(tmp_path, "compare", "snp-life", "--policy", "prepare=fault", "--json"))
    a, b = run["runs"][0]["counters"], cmp_["runs"][0]["counters"]
    assert a["rmp"]["rmpupdate"] == b["rmp"]["rmpupdate"] > 0
    assert a["moment"] == b["moment"] and a["closed_vms"] == b["closed_vms"] == {"guest": 13}
    assert a["vm"] == b["vm"] and a["host"]["folios_freed"] == b["host"]["folios_freed"]


def test_run_toml_file(tmp_path):
    (tmp_path / "small.toml").write_text(SMALL_TOML)
    d = doc_of(gmem_cli(tmp_path, "run", "small.toml", "--json"))
    c = d["runs"][0]["counters"]["vm"]["g"]
    # 1024 pages faulted (2M private, 2M shared), 1M converted to shared (256 SPTEs zapped),
    # then the same 1024 pages again: 256 refaulted, 768 spurious
    assert c["pf_taken"] == 2048
    assert c["pf_fixed"] == 1024 + 256
    assert c["pf_spurious"] == 768
    assert c["zapped_sptes"] == 256
    assert c["pages_4k"] == 1024
    assert c["memory_fault_exits"] == 0
    assert d["runs"][0]["events"][1] == "g: converted 1024 KiB at 0x40000000 to shared (0 hypercall exits)"
    out = ok(gmem_cli(tmp_path, "run", "small.toml", "--set", "huge_folios=true", "-o", "r.json"))
    assert "scenario small.toml: 5 steps" in out
    results.validate(json.loads((tmp_path / "r.json").read_text()))
    assert listing(tmp_path) == ["r.json", "small.toml"]


def test_run_check_violation(tmp_path):
    """Finding: a check step that finds a violation ended in a traceback. Now: the result
    (status violation, the error and where), one line on stderr, exit 1."""
    (tmp_path / "v.toml").write_text(VIOLATION_TOML)
    p = gmem_cli(tmp_path, "run", "v.toml", "--json")
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.splitlines()) == 1
    assert p.stderr.startswith("gmem run: violation at steps[3] (check): InvariantError: ")
    d = doc_of(p)
    assert d["status"] == "violation"
    r = d["runs"][0]
    assert r["error"]["step"] == 3 and r["error"]["op"] == "check" and "stale SPTE" in r["error"]["message"]
    assert r["counters"]["moment"]["after_step"] == 2          # the steps before the failing one
    assert len(r["timings"]) == 3


def test_compare_violation_exits_1(tmp_path):
    """Finding: compare showed a failure and exited 0."""
    (tmp_path / "v.toml").write_text(VIOLATION_TOML)
    p = gmem_cli(tmp_path, "compare", "v.toml", "--policy", "prepare=fault", "--policy", "prepare=alloc")
    assert p.returncode == 1
    assert "[violation]" in p.stdout and "Traceback" not in p.stderr


def test_run_trace_npy(tmp_path):
    out = gmem_cli(tmp_path, "run", "sw-conversions", "--trace", "x.npy")
    n = int(re.search(r"wrote (\d+) trace records to x.npy", ok(out) + out.stderr).group(1))
    recs = np.load(tmp_path / "x.npy")
    assert recs.dtype == gmem.TRACE_DTYPE and len(recs) == n > 0
    assert (np.diff(recs["seq"].astype(np.int64)) == 1).all()
    names = [gmem.TRACE_EVENTS[e] for e in np.unique(recs["event"])]
    assert {"kvm_page_fault", "spte_install", "spte_zap"} <= set(names)
    pf = recs[recs["event"] == gmem.TRACE_EVENTS.index("kvm_page_fault")]
    assert (pf["a"] >= np.uint64(4 << 30)).all()                # gpa, inside the memslot at 4G
    assert listing(tmp_path) == ["x.npy"]


def test_run_trace_text_filtered(tmp_path):
    (tmp_path / "small.toml").write_text(SMALL_TOML)
    p = gmem_cli(tmp_path, "run", "small.toml", "--trace", "trace.txt", "--trace-event", "kvm_page_fault",
                 "--trace-gpa", "1G+1M")
    ok(p)
    n = int(re.search(r"wrote (\d+) trace records to trace.txt", p.stderr).group(1))
    lines = (tmp_path / "trace.txt").read_text().splitlines()
    assert len(lines) == n == 2 * 256              # two passes over the 256 pages of [1G, 1G + 1M)
    line_re = re.compile(r"\s*vcpu-\d+ \[\d{3}\]\s+\d+: kvm_page_fault:\s+gpa=0x[0-9a-f]+ error_code=0x[0-9a-f]+ "
                         r"outcome=(fixed|exit|no change)")
    assert all(line_re.fullmatch(ln) for ln in lines), [ln for ln in lines if not line_re.fullmatch(ln)][:3]
    gpas = [int(re.search(r"gpa=(0x[0-9a-f]+)", ln).group(1), 16) for ln in lines]
    assert min(gpas) == 1 << 30 and max(gpas) < (1 << 30) + (1 << 20)
    assert "vcpu-1 [001]" in lines[0]
    outcomes = [ln.rsplit("outcome=", 1)[1] for ln in lines]
    # first pass: 256 faults fixed (all private); after the 1M conversion to shared they fault again
    assert outcomes[:256] == ["fixed"] * 256 and outcomes[256:].count("fixed") == 256


def test_run_timeline(tmp_path):
    out = ok(gmem_cli(tmp_path, "run", "snp-life", "--timeline", "t.png"))
    assert "wrote t.png" in out and listing(tmp_path) == ["t.png"]
    w, h = png_info(tmp_path / "t.png")
    assert w > 800 and h > 600


def test_run_trace_chrome_json(tmp_path):
    ok(gmem_cli(tmp_path, "run", "sw-conversions", "--trace", "t.json"))
    t = json.loads((tmp_path / "t.json").read_text())
    evs = [e for e in t["traceEvents"] if e["ph"] == "i"]
    assert evs and {"kvm_page_fault", "spte_install", "spte_zap"} <= {e["name"] for e in evs}
    assert all(isinstance(e["ts"], int) and e["pid"] == 1 for e in evs)
    assert [e["ts"] for e in evs] == sorted(e["ts"] for e in evs)
    assert any(e["ph"] == "M" and e["name"] == "thread_name" for e in t["traceEvents"])


# --------------------------------------------------------------- compare

def test_compare_default_policies(tmp_path):
    p = gmem_cli(tmp_path, "compare", "--chart", "c.png")
    out = ok(p)
    assert "scenario snp-life under 3 policy sets" in out
    assert "1: prepare=fault,prepared_tracking=gmem" in out
    assert "2: prepare=alloc,prepared_tracking=arch" in out
    prep = [int(x) for x in re.search(r"vm\.gmem_prepare\s+(\d+)\s+(\d+)\s+(\d+)", out).groups()]
    rmpupdate = [int(x) for x in re.search(r"rmp\.rmpupdate\s+(\d+)\s+(\d+)\s+(\d+)", out).groups()]
    assert prep[0] != prep[1]                                 # the RFC prepares at allocation
    assert len(set(rmpupdate)) == 1 and rmpupdate[0] > 0      # ... but the RMP sees the same updates
    assert "wrote c.png" in out
    png_info(tmp_path / "c.png")
    assert listing(tmp_path) == ["c.png"]


def test_compare_tdx_rows_follow_the_vm_type(tmp_path):
    """Finding: compare's rows were SNP's only (a TDX run showed empty RMP groups)."""
    d = doc_of(gmem_cli(tmp_path, "compare", "tdx-life", "--json"))
    from gmem.__main__ import compare_keys
    keys = compare_keys(d["runs"])
    assert "tdx.aug" in keys and "tdx.accept" in keys and not any(k.startswith("rmp.") for k in keys)
    out = ok(gmem_cli(tmp_path, "compare", "tdx-life", "--chart", "c.svg"))
    assert re.search(r"tdx\.aug\s+\d+\s+\d+\s+\d+", out) and "rmp." not in out
    svg = (tmp_path / "c.svg").read_text()
    assert "tdx.aug" in svg and "prepare=alloc,prepared_tracking=arch" in svg and "rmpupdate" not in svg


def test_compare_given_policy_sets(tmp_path):
    d = doc_of(gmem_cli(tmp_path, "compare", "sw-conversions", "--policy", "prepare=alloc",
                        "--policy", "invalidate=invalidate_folio,huge_folios=true", "--json"))
    assert [r["label"] for r in d["runs"]] == ["prepare=alloc", "invalidate=invalidate_folio,huge_folios=True"]
    assert d["runs"][1]["host"]["options"]["huge_folios"] is True
    splits = [r["counters"]["host"]["folio_splits"] for r in d["runs"]]
    assert splits[0] == 0 and splits[1] >= 1


def test_compare_chart_without_matplotlib(tmp_path, no_mpl):
    p = gmem_cli(tmp_path, "compare", "--chart", "c.png", env_extra=no_mpl)
    assert p.returncode == 2 and "pictures need matplotlib" in p.stderr
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
    p = gmem_cli(tmp_path, "replay", "s.npy", "--chunk", "1000", "--plot", "r.png")
    out = ok(p)
    assert re.match(r"replayed 5000 faults in \d+\.\d+ s: \d+\.\d\d million faults/s \(\d+ ns/fault\)", out)
    assert re.search(r"pf_taken\s+5000\b", out) and re.search(r"pf_fixed\s+2048\b", out)
    assert "wrote r.png" in out
    png_info(tmp_path / "r.png")
    assert sorted(listing(tmp_path)) == ["r.png", "s.npy"]


def test_replay_json(tmp_path):
    """Finding: replay had no --json."""
    np.save(tmp_path / "s.npy", _stream())
    d = doc_of(gmem_cli(tmp_path, "replay", "s.npy", "--chunk", "1000", "--json"))
    assert d["kind"] == "replay" and d["status"] == "ok"
    r = d["runs"][0]
    assert r["stream"]["faults"] == 5000 and len(r["stream"]["chunks"]) == 5
    vm = r["counters"]["vm"]["replay"]
    assert vm["pf_taken"] == 5000 and vm["pf_fixed"] == 2048 and vm["pf_spurious"] == 2952
    assert [v["pf_taken"] for v in r["counters"]["vcpu"]["replay"]] == [2500, 2500]


def test_replay_csv_by_header(tmp_path):
    """Finding: CSV columns were read by position. Reordered columns (and no vcpu column)
    read by name give the same counters."""
    lines = ["vcpu,gpa,error_code"] + [f"{i % 3},{(i % 512) << 12:#x},0x2" for i in range(1500)]
    (tmp_path / "s.csv").write_text("\n".join(lines) + "\n")
    lines = ["error_code,gpa"] + [f"0x2,{(i % 512) << 12:#x}" for i in range(1500)]
    (tmp_path / "r.csv").write_text("\n".join(lines) + "\n")
    a = doc_of(gmem_cli(tmp_path, "replay", "s.csv", "--private", "--huge-folios", "--memory", "1G", "--json"))
    b = doc_of(gmem_cli(tmp_path, "replay", "r.csv", "--private", "--huge-folios", "--memory", "1G", "--json"))
    va, vb = a["runs"][0]["counters"]["vm"]["replay"], b["runs"][0]["counters"]["vm"]["replay"]
    assert va["pf_taken"] == vb["pf_taken"] == 1500
    assert va["pages_2m"] == vb["pages_2m"] == 1          # 2M private folio, mapped 2M at the first fault
    assert va["memory_fault_exits"] == 0
    assert len(a["runs"][0]["counters"]["vcpu"]["replay"]) == 3


def test_replay_csv_without_header_is_refused(tmp_path):
    """Finding: a CSV without a header silently lost its first fault."""
    (tmp_path / "s.csv").write_text("0,0x1000,0x2\n0,0x2000,0x2\n")
    p = gmem_cli(tmp_path, "replay", "s.csv")
    assert p.returncode == 2 and "header" in p.stderr and p.stdout == ""


def test_replay_snp_hint_for_bit_34(tmp_path):
    """Finding: no hint when every SNP fault exits because bit 34 (C-bit, private) is missing."""
    np.save(tmp_path / "s.npy", _stream(100, 100))
    p = gmem_cli(tmp_path, "replay", "s.npy", "--vm-type", "snp", "--private", "--memory", "1G")
    out = ok(p)
    assert re.search(r"memory_fault_exits\s+100\b", out)
    assert "hint: every fault exited to userspace and no error code has bit 34" in out
    a = _stream(100, 100)
    a["error_code"] |= np.uint64(uapi.PFERR_GUEST_ENC_MASK)
    np.save(tmp_path / "e.npy", a)
    out = ok(gmem_cli(tmp_path, "replay", "e.npy", "--vm-type", "snp", "--private", "--memory", "1G"))
    assert "hint" not in out and re.search(r"memory_fault_exits\s+0\b", out)


# ------------------------------------------------------------- bad input

_STRUCT_FLOAT = np.zeros(3, dtype=[("gpa", "<f8"), ("error_code", "<u8")])
_STRUCT_NEG = np.zeros(3, dtype=[("gpa", "<i8"), ("error_code", "<u8")])
_STRUCT_NEG["gpa"] = -4096
_STRUCT_TOP = np.zeros(3, dtype=[("gpa", "<u8"), ("error_code", "<u8")])
_STRUCT_TOP["gpa"] = 2**64 - 1
_STEP = "[[vms]]\ntype = 'sw_protected'\ngmem = [{size = '4M'}]\nmemslots = [{size = '4M', gmem = 'ram'}]\n"

BAD = [
    # (name, files to create, argv, what stderr names); argv writes "out.*" if it wrongly succeeds
    ("run: missing TOML file", {}, ["run", "missing.toml", "--trace", "out.npy"], "no such file: missing.toml"),
    ("run: malformed TOML", {"bad.toml": "x = [\n"}, ["run", "bad.toml", "--trace", "out.npy"], "malformed TOML"),
    ("run: TOML with a step missing a key", {"m.toml": "[[vms]]\ntype = 'default'\n[[steps]]\nop = 'faults'\n"},
     ["run", "m.toml", "--trace", "out.txt"], "steps[0]: 'size' is a required property"),
    ("run: TOML of the wrong shape", {"m.toml": "steps = 'nope'\n"}, ["run", "m.toml"],
     "steps: 'nope' is not of type 'array'"),
    ("run: steps = 5", {"m.toml": "steps = 5\n"}, ["run", "m.toml"], "steps: 5 is not of type 'array'"),
    ("run: TOML with an unknown op", {"m.toml": "[[steps]]\nop = 'reboot'\n"}, ["run", "m.toml"],
     "steps[0].op: 'reboot' is not one of"),
    ("run: unknown key in a step", {"m.toml": _STEP + "[[steps]]\nop = 'punch'\nsize = '4K'\nsizee = 1\n"},
     ["run", "m.toml"], "steps[0]: Additional properties are not allowed ('sizee' was unexpected)"),
    ("run: unknown top-level key", {"m.toml": "hosts = {}\n"}, ["run", "m.toml"], "'hosts' was unexpected"),
    ("run: convert to sideways", {"m.toml": _STEP + "[[steps]]\nop = 'convert'\nsize = '4K'\nto = 'sideways'\n"},
     ["run", "m.toml"], "steps[0].to: 'sideways' is not one of ['shared', 'private']"),
    ("run: pattern zigzag", {"m.toml": _STEP + "[[steps]]\nop = 'faults'\nsize = '4K'\npattern = 'zigzag'\n"},
     ["run", "m.toml"], "steps[0].pattern: 'zigzag' is not one of ['seq', 'random']"),
    ("run: negative size", {"m.toml": _STEP + "[[steps]]\nop = 'faults'\nsize = -4096\n"}, ["run", "m.toml"],
     "steps[0].size: -4096 is less than the minimum of 0"),
    ("run: unknown vm type", {"m.toml": "[[vms]]\ntype = 'snpp'\n"}, ["run", "m.toml"], "vms[0].type: 'snpp'"),
    ("run: memslot on an unknown gmem", {"m.toml": "[[vms]]\nmemslots = [{size = '4M', gmem = 'x'}]\n"},
     ["run", "m.toml"], "vms[0].memslots[0].gmem: unknown gmem 'x'"),
    ("run: step on an unknown vm", {"m.toml": _STEP + "[[steps]]\nop = 'check'\nvm = 'other'\n"},
     ["run", "m.toml"], "steps[0].vm: unknown vm 'other'"),
    ("run: vcpu past vcpus", {"m.toml": _STEP + "[[steps]]\nop = 'faults'\nsize = '4K'\nvcpu = 3\n"},
     ["run", "m.toml"], "steps[0].vcpu: 3 but vm 'vm0' has 1 vCPU(s)"),
    # issue 13's CLI inputs
    ("run: inf as a size", {"m.toml": _STEP + "[[steps]]\nop = 'faults'\nsize = inf\n"}, ["run", "m.toml"],
     "steps[0].size: inf is not of type 'integer', 'string'"),
    ("run: inf as vcpus", {"m.toml": "[[vms]]\nvcpus = inf\n"}, ["run", "m.toml"], "vms[0].vcpus: inf"),
    ("run: inf as repeat", {"m.toml": _STEP + "[[steps]]\nop = 'faults'\nsize = '4K'\nrepeat = inf\n"},
     ["run", "m.toml"], "steps[0].repeat: inf"),
    ("run: huge size", {"m.toml": _STEP + "[[steps]]\nop = 'faults'\nsize = '99999999T'\n"}, ["run", "m.toml"],
     "size: '99999999T' is out of range"),
    ("run: huge host memory", {"m.toml": "[host]\nmemory = 18446744073709551616\n"}, ["run", "m.toml"],
     "host.memory: 18446744073709551616 is greater than the maximum"),
    ("run: huge repeat", {"m.toml": _STEP + "[[steps]]\nop = 'faults'\nsize = '4K'\nrepeat = 1000000000000\n"},
     ["run", "m.toml"], "steps[0].repeat: 1000000000000 is greater than the maximum of 1000000"),
    ("run: op is a list", {"m.toml": "[[steps]]\nop = [1]\n"}, ["run", "m.toml"], "steps[0].op: [1] is not one of"),
    ("run: op is a table", {"m.toml": "[[steps]]\nop = {a = 1}\n"}, ["run", "m.toml"], "steps[0].op: {'a': 1}"),
    ("run: too many faults in one step", {"m.toml": _STEP + "[[steps]]\nop = 'faults'\nsize = '2T'\n"},
     ["run", "m.toml"], "steps[0] (faults): size: 536870912 pages in one faults step (at most 268435456)"),
    ("run: unknown scenario", {}, ["run", "no-such-scenario", "--trace", "out.npy"], "unknown scenario"),
    ("run: unknown policy key", {}, ["run", "snp-life", "--set", "bogus=1", "--trace", "out.npy"], "unknown policy"),
    ("run: unknown policy value", {}, ["run", "snp-life", "--set", "prepare=sometimes", "--trace", "out.npy"],
     "prepare must be one of"),
    ("run: trace into a missing directory", {}, ["run", "snp-life", "--trace", "nodir/out.npy"], "no directory"),
    ("run: unknown trace event", {}, ["run", "snp-life", "--trace", "out.txt", "--trace-event", "nope"],
     "unknown trace event 'nope'"),
    ("run: bad trace gpa range", {}, ["run", "snp-life", "--trace", "out.txt", "--trace-gpa", "5M-1M"],
     "is empty"),
    ("compare: unknown policy key", {}, ["compare", "--policy", "prepare=alloc,foo=bar", "--chart", "out.png"],
     "unknown policy"),
    ("compare: unknown policy value", {}, ["compare", "--policy", "prepare=alloc", "--policy", "invalidate=never",
                                          "--chart", "out.png"], "invalidate must be one of"),
    ("compare: non-boolean huge_folios", {}, ["compare", "--policy", "huge_folios=yes", "--chart", "out.png"],
     "true or false"),
    ("compare: unknown scenario", {}, ["compare", "nope", "--chart", "out.png"], "unknown scenario"),
    ("compare: missing TOML file", {}, ["compare", "missing.toml", "--chart", "out.png"], "no such file"),
    ("compare: invalid scenario", {"m.toml": "[[vms]]\n[[steps]]\nop = 'faults'\n"},
     ["compare", "m.toml", "--chart", "out.png"], "steps[0]: 'size' is a required property"),
    ("compare: scenario that cannot run", {"m.toml": "[[vms]]\n[[steps]]\nop = 'attributes'\nsize = '4K'\n"},
     ["compare", "m.toml", "--chart", "out.png"], "fails under every policy set"),
    ("compare: chart of an unknown format", {}, ["compare", "--chart", "out.bmp"], "a picture is .png, .svg, .pdf"),
    ("replay: missing file", {}, ["replay", "missing.npy", "--plot", "out.png"], "no such file: missing.npy"),
    ("replay: .npy that is not a stream", {"plain.npy": np.arange(10)}, ["replay", "plain.npy", "--plot", "out.png"],
     "need a 1-D structured array"),
    ("replay: 0-d .npy", {"z.npy": np.array(5)}, ["replay", "z.npy"], "need a 1-D structured array"),
    ("replay: 2-D .npy", {"z.npy": np.zeros((2, 3), np.uint64)}, ["replay", "z.npy"], "need a 1-D structured array"),
    ("replay: 2-D structured .npy", {"z.npy": np.zeros((2, 2), dtype=[("gpa", "<u8"), ("error_code", "<u8")])},
     ["replay", "z.npy"], "need a 1-D structured array"),
    ("replay: structured .npy with float gpa", {"z.npy": _STRUCT_FLOAT}, ["replay", "z.npy"],
     "gpa must be a column of integers"),
    ("replay: negative gpa", {"z.npy": _STRUCT_NEG}, ["replay", "z.npy"], "gpa has values outside [0, 2**64)"),
    ("replay: gpa 2**64-1", {"z.npy": _STRUCT_TOP}, ["replay", "z.npy"], "is beyond 2**52 (MAXPHYADDR)"),
    ("replay: negative gpa in CSV", {"s.csv": "gpa,error_code\n-4096,2\n"}, ["replay", "s.csv"],
     "gpa: -4096 is outside [0, 2**64)"),
    ("replay: CSV that is not a stream", {"s.csv": "a,b\n1,2\n"}, ["replay", "s.csv", "--plot", "out.png"],
     "header naming the columns"),
    ("replay: CSV with garbage", {"s.csv": "vcpu,gpa,error_code\n0,zz,2\n"}, ["replay", "s.csv"],
     "s.csv:2: gpa: 'zz' is not an integer"),
    ("replay: empty CSV", {"s.csv": "vcpu,gpa,error_code\n"}, ["replay", "s.csv", "--plot", "out.png"],
     "empty fault stream"),
    ("replay: text file as .npy", {"t.npy": "hello\n"}, ["replay", "t.npy"], "cannot read the fault stream"),
    ("replay: unknown vm type", {"s.npy": _stream(10)}, ["replay", "s.npy", "--vm-type", "nope", "--plot", "out.png"],
     "unknown vm type"),
    ("replay: --memory 0", {"s.npy": _stream(10)}, ["replay", "s.npy", "--memory", "0"],
     "must be a positive multiple of 4096"),
    ("replay: --memory 1", {"s.npy": _stream(10)}, ["replay", "s.npy", "--memory", "1"],
     "must be a positive multiple of 4096"),
    ("replay: --memory 99999999T", {"s.npy": _stream(10)}, ["replay", "s.npy", "--memory", "99999999T"],
     "--memory: '99999999T' is out of range"),
    ("demo: PNG into a missing directory", {}, ["demo", "--out", "nodir/out.png"], "no directory"),
    ("demo: picture of an unknown format", {}, ["demo", "--out", "out.bmp"], "a picture is .png, .svg, .pdf"),
    ("report: missing result", {}, ["report", "missing.json", "--out", "out.html"], "no such file"),
    ("report: not a result", {"r.json": "{\"a\": 1}"}, ["report", "r.json", "--out", "out.html"],
     "(top level): Additional properties are not allowed"),
]


@pytest.mark.parametrize("files, argv, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(tmp_path, monkeypatch, capsys, files, argv, message):
    """In-process (gmem.__main__.main, as the console script calls it): an exception it let
    through would fail the test, as a traceback would fail a user."""
    from gmem.__main__ import main
    for name, content in files.items():
        if isinstance(content, np.ndarray):
            np.save(tmp_path / name, content)
        else:
            (tmp_path / name).write_text(content)
    before = listing(tmp_path)
    monkeypatch.chdir(tmp_path)
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 2, f"exit {rc}\nstdout:\n{out}\nstderr:\n{err}"
    err = err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"gmem {argv[0]}: error: ") and message in err[0], err[0]
    assert out == ""
    assert listing(tmp_path) == before                     # nothing written
    assert not any(tmp_path.glob("out.*"))


def test_bad_input_in_a_subprocess(tmp_path):
    """One of them as the user runs it: a new interpreter, one line, exit 2."""
    p = gmem_cli(tmp_path, "run", "missing.toml")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == "gmem run: error: no such file: missing.toml\n"


# ---------------------------------------------------------------- Ctrl-C

def test_ctrl_c_gives_the_partial_result(tmp_path):
    """Finding: Ctrl-C printed a traceback, and a long step took seconds to stop. SIGINT in
    the middle of a long faults step: the result so far, status interrupted, exit 130."""
    import signal
    (tmp_path / "long.toml").write_text(
        "[host]\nmemory = '2G'\nplatform = 'none'\n[[vms]]\ntype = 'sw_protected'\ngmem = [{size = '1G'}]\n"
        "memslots = [{size = '1G', gmem = 'ram'}]\n[[steps]]\nop = 'faults'\nsize = '4M'\n"
        "[[steps]]\nop = 'faults'\nsize = '1G'\nrepeat = 1000000\n")
    env = dict(os.environ, PYTHONPATH=GMEM_ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "gmem", "run", "long.toml", "--json"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # interrupt once the run is well inside the endless second step, however loaded the machine:
    # after 2.5 s of the process's own CPU time (start, imports and the first step take about 1)
    tick = os.sysconf("SC_CLK_TCK")
    while proc.poll() is None:
        with open(f"/proc/{proc.pid}/stat") as fh:
            utime, stime = (int(x) for x in fh.read().rsplit(")", 1)[1].split()[11:13])
        if (utime + stime) / tick > 2.5:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    t = time.perf_counter()
    out, err = proc.communicate(timeout=60)
    stop = time.perf_counter() - t
    print(f"stopped {stop:.2f} s after SIGINT")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().startswith("gmem run: interrupted at steps[1] (faults)")
    d = json.loads(out)
    results.validate(d)
    assert d["status"] == "interrupted"
    c = d["runs"][0]["counters"]
    assert c["moment"]["after_step"] == 0                   # the first step finished, the second did not
    assert c["vm"]["vm0"]["pf_taken"] > 1024                # ... but its faults so far are counted


# ---------------------------------------------------------------- report

def test_report_of_a_run_and_a_comparison(tmp_path):
    ok(gmem_cli(tmp_path, "run", "tdx-life", "-o", "run.json"))
    ok(gmem_cli(tmp_path, "compare", "snp-life", "-o", "cmp.json"))
    out = ok(gmem_cli(tmp_path, "report", "run.json"))
    assert out.strip() == "wrote run.html"
    page = (tmp_path / "run.html").read_text()
    assert page.startswith("<!doctype html>") and "gmem run: tdx-life" in page
    assert "tdx.aug" in page and "after step 6 (close)" in page and "td: launched" in page
    ok(gmem_cli(tmp_path, "report", "cmp.json", "--out", "c.html"))
    page = (tmp_path / "c.html").read_text()
    assert "prepare=alloc,prepared_tracking=arch" in page and "rmp.rmpupdate" in page
    # the comparison chart and (snp-life has 2M folios) the mapped-level shares, inlined
    assert page.count("data:image/png;base64,") == 2 and "share of mapped bytes per level" in page
    assert sorted(listing(tmp_path)) == ["c.html", "cmp.json", "run.html", "run.json"]


def test_without_the_cli_extra(tmp_path):
    """Installed without the cli extra: one line naming the extra, exit 2, nothing written."""
    d = tmp_path / "_no_rich"
    d.mkdir()
    (d / "sitecustomize.py").write_text("import sys\nsys.modules['rich'] = None\n")   # import rich fails
    p = gmem_cli(tmp_path, "run", "snp-life", env_extra={"PYTHONPATH": os.pathsep.join([str(d), GMEM_ROOT])})
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == "gmem run: error: the command line needs rich: pip install 'kvm-gmem[cli]'"


def test_compare_kernel_versions(tmp_path):
    """gmem compare --kernel: the scenario under each version, crossed with the policy sets.
    6.18 prepares once per folio (uptodate = prepared), the others on every get_pfn."""
    doc = doc_of(gmem_cli(tmp_path, "compare", "snp-life", "--kernel", "rfc-2023,6.18,7.2,next", "--json"))
    assert [r["label"] for r in doc["runs"]] == [f"kernel={k}" for k in ("rfc-2023", "6.18", "7.2", "next")]
    prep = [r["counters"]["vm"]["guest"]["gmem_prepare"] for r in doc["runs"]]
    assert all(r["status"] == "ok" for r in doc["runs"]) and prep[1] < prep[0] == prep[2] == prep[3]
    doc = doc_of(gmem_cli(tmp_path, "compare", "snp-life", "--kernel", "7.2,next", "--policy",
                          "prepare=alloc", "--json"))
    assert [r["label"] for r in doc["runs"]] == ["kernel=7.2,prepare=alloc", "kernel=next,prepare=alloc"]
    p = gmem_cli(tmp_path, "compare", "snp-life", "--kernel", "6.1")
    assert p.returncode == 2 and "kernel must be one of" in p.stderr
