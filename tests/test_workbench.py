"""The workbench's library side: scenario validation, the result schema, the trace tools."""
import json
import sys

import numpy as np
import pytest

import gmem
from gmem import results, scenario, schema, tracing, uapi

pytest.importorskip("jsonschema", reason="validation needs the cli extra (pip install '.[test]')")


# ------------------------------------------------------------- scenarios

@pytest.mark.parametrize("name", sorted(scenario.BUILTIN))
def test_builtin_scenarios_follow_the_schema(name):
    assert scenario.validate(scenario.BUILTIN[name]) is scenario.BUILTIN[name]


def test_schema_host_enums_are_what_host_accepts():
    host = schema.load("scenario")["properties"]["host"]["properties"]
    for key in ("prepare", "prepared_tracking", "invalidate"):
        for value in host[key]["enum"]:
            gmem.Host(memory=2 << 20, platform="none", **{key: value})
        with pytest.raises(ValueError):
            gmem.Host(memory=2 << 20, platform="none", **{key: "bogus"})
    for p in host["platform"]["enum"]:
        gmem.Host(memory=2 << 20, platform=p)
    assert set(scenario.VM_TYPES) == set(schema.load("scenario")["properties"]["vms"]["items"]["properties"]
                                         ["type"]["enum"])
    assert set(scenario.OPS) == set(schema.load("scenario")["$defs"]["step"]["properties"]["op"]["enum"])


@pytest.mark.parametrize("spec, message", [
    ({"steps": [{"op": "faults", "size": "1Q"}]}, "steps[0].size: '1Q' is not a size"),
    ({"vms": [{"name": "a"}, {"name": "a"}]}, "vms[1].name: a second VM named 'a'"),
    ({"vms": [{"vcpus": 0}]}, "vms[0].vcpus: 0 is less than the minimum of 1"),
    ({"host": {"memory": True}}, "host.memory: True is not of type 'integer', 'string'"),
    ({"steps": [{"op": "pvalidate", "size": "4K", "pagesize": 2}]}, "steps[0].pagesize: 2 is not one of [0, 1]"),
])
def test_validation_names_the_path(spec, message):
    with pytest.raises(scenario.ScenarioError) as e:
        scenario.validate(spec)
    assert str(e.value).startswith(message)


def test_toml_on_python_3_10(tmp_path, monkeypatch):
    """Finding: scenarios needed tomllib (3.11+). On 3.10 tomli stands in for it."""
    (tmp_path / "s.toml").write_text('[[steps]]\nop = "check"\n')
    monkeypatch.setitem(sys.modules, "tomllib", None)           # as on 3.10: import tomllib fails
    try:
        import tomli  # noqa: F401
    except ImportError:
        with pytest.raises(scenario.ScenarioError, match="needs tomli"):
            scenario.load_toml(tmp_path / "s.toml")
    else:
        assert scenario.load_toml(tmp_path / "s.toml") == {"steps": [{"op": "check"}]}


def test_violation_and_interrupt_keep_the_partial_run():
    spec = {"host": {"memory": "1G", "platform": "none"},
            "vms": [{"type": "sw_protected", "gmem": [{"size": "4M"}], "memslots": [{"size": "4M", "gmem": "ram"}]}],
            "steps": [{"op": "faults", "size": "4M"}, {"op": "faults", "size": "4M"}, {"op": "check"}]}
    calls = []

    def stop(i, op, done, total):
        calls.append((i, done))
        if i == 1:
            raise KeyboardInterrupt
    r = scenario.run(spec, progress=stop, keep_partial=True)
    assert r.status == "interrupted" and r.error["step"] == 1 and r.last_step == 0
    assert r.counters()["vm"]["vm0"]["pf_taken"] == 1024 + 1024       # one chunk of the second step
    with pytest.raises(KeyboardInterrupt):
        scenario.run(spec, progress=stop)


# --------------------------------------------------------------- results

def test_a_producer_outside_the_scenarios_makes_a_valid_document():
    """How `gmem exec --report` (or any embedding) makes a result: snapshot, run_record, document."""
    host = gmem.Host(memory=1 << 30, platform="amd")
    vm = host.create_vm(uapi.KVM_X86_SNP_VM)
    vcpu = vm.create_vcpu(0)
    c = results.snapshot(host, {"guest": vm}, {"guest": [vcpu]}, moment=("at exit", None, None))
    doc = results.document("exec", [results.run_record("./selftest", host, c, seconds=0.5)],
                           command=["./selftest", "-v"])
    assert results.validate(doc) is doc and doc["status"] == "ok" and doc["kind"] == "exec"
    assert doc["runs"][0]["host"]["platform"] == "amd" and doc["runs"][0]["counters"]["rmp"]["rmpupdate"] == 0
    json.dumps(doc)
    with pytest.raises(ValueError, match="status must be one of"):
        results.run_record("x", host, c, status="fine")
    with pytest.raises(ValueError, match="kind must be one of"):
        results.document("bench", [])
    bad = dict(doc, runs=[dict(doc["runs"][0], seconds=-1)])
    with pytest.raises(schema.SchemaError, match=r"^runs\[0\]\.seconds: -1 is less than the minimum of 0"):
        results.validate(bad)


def test_worst_status():
    assert results.worst([]) == "ok"
    assert results.worst(["ok", "violation", "ok"]) == "violation"
    assert results.worst(["violation", "interrupted"]) == "interrupted"


# ---------------------------------------------------------------- traces

@pytest.fixture(scope="module")
def traced():
    r = scenario.run(scenario.BUILTIN["sw-conversions"], trace=True)
    return r, r.host.trace.to_numpy()


def test_select_by_event_and_gpa(traced):
    r, recs = traced
    pf = tracing.select(recs, events="kvm_page_fault")
    assert len(pf) == r.counters()["vm"]["guest"]["pf_taken"]
    lo, hi = (4 << 30) + (4 << 20), (4 << 30) + (6 << 20)
    win = tracing.select(recs, gpa=(lo, hi))
    assert len(win) and set(tracing.events(win)) <= set(tracing.GPA_FIELD)
    s, e = tracing.gpa_span(win)
    assert ((s < hi) & (e > lo)).all()
    assert len(tracing.select(recs, events=["kvm_page_fault"], gpa=(lo, hi))) == 3 * 512
    with pytest.raises(ValueError, match="unknown trace event"):
        tracing.select(recs, events=["nope"])
    with pytest.raises(ValueError, match="empty"):
        tracing.select(recs, gpa=(5, 5))
    with pytest.raises(TypeError, match="TRACE_DTYPE"):
        tracing.select(np.zeros(3), events=["kvm_page_fault"])


def test_fault_outcomes_match_the_counters(traced):
    r, recs = traced
    out = tracing.fault_outcomes(recs)
    vm = r.counters()["vm"]["guest"]
    assert (out == "fixed").sum() == vm["pf_fixed"]
    assert (out == "exit").sum() == vm["memory_fault_exits"] == 0
    assert (out == "no change").sum() == vm["pf_spurious"]


def test_mapped_levels_end_at_the_vm_counts(traced):
    r, recs = traced
    levels = tracing.mapped_levels(recs)
    vm = r.counters()["vm"]["guest"]
    assert levels[1][-1] == vm["pages_4k"] and levels[2][-1] == vm["pages_2m"]


def test_report_and_chrome_trace(traced):
    _, recs = traced
    few = tracing.where(recs, events=["kvm_page_fault", "spte_zap"])
    lines = tracing.report(recs, where=few).splitlines()
    assert len(lines) == few.sum()
    assert lines[0].split(":")[1].strip() == "kvm_page_fault" and lines[0].endswith("outcome=fixed")
    t = tracing.chrome_trace(recs, where=few)
    inst = [e for e in t["traceEvents"] if e["ph"] == "i"]
    assert len(inst) == few.sum() and inst[0]["args"]["outcome"] == "fixed"
    assert inst[0]["args"]["gpa"].startswith("0x") and json.loads(json.dumps(t)) == t


def test_parse_gpa_range():
    assert tracing.parse_gpa_range("1G+2M") == (1 << 30, (1 << 30) + (2 << 20))
    assert tracing.parse_gpa_range("0x1000-0x3000") == (0x1000, 0x3000)
    for bad in ("1G", "3M-1M", "x-y"):
        with pytest.raises(ValueError):
            tracing.parse_gpa_range(bad)


def test_trace_timeline_picture(traced, tmp_path):
    pytest.importorskip("matplotlib", reason="pictures need the cli extra")
    from gmem import plots
    _, recs = traced
    p = plots.trace_timeline(recs, str(tmp_path / "t.png"), "sw-conversions")
    assert (tmp_path / "t.png").stat().st_size > 20000 and p.endswith("t.png")
