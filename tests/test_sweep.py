"""gmem sweep: the grid, scaling, determinism across Dask workers, resuming, the table."""
import json
import os
import subprocess
import sys

import pytest

from gmem import results, scenario, sweep

pytest.importorskip("distributed", reason="the sweep tests need the sweep extra (pip install '.[test]')")
pq = pytest.importorskip("pyarrow.parquet", reason="the sweep tests need the sweep extra (pip install '.[test]')")

SPEC = {"name": "small", "scenarios": ["sw-conversions", "snp-life"], "sizes": ["8M", "16M"],
        "options": {"prepare": ["fault", "alloc"]}, "seeds": [0]}


def _same(rec):
    """What must not depend on where a cell ran (not timings)."""
    return rec["status"], rec["counters"], rec["events"], rec["host"], rec["cell"]


def test_grid_and_scaling():
    spec = sweep.validate(dict(SPEC))
    cells = sweep.cells(spec)
    assert len(cells) == 2 * 2 * 2 and len({c["key"] for c in cells}) == 8
    snp = next(c for c in cells if c["scenario"] == "snp-life" and c["size"] == 8 << 20)
    s = snp["spec"]
    assert s["vms"][0]["memslots"][0]["size"] == 8 << 20 and s["vms"][0]["gmem"][0]["size"] == 8 << 20
    conv = [st for st in s["steps"] if st["op"] == "convert"]
    assert (conv[0]["gpa"], conv[0]["size"]) == (4 << 20, 1 << 20)        # 32M + 8M of 64M, scaled by 1/8
    sw = next(c for c in cells if c["scenario"] == "sw-conversions" and c["size"] == 8 << 20)["spec"]
    assert [st["gpa"] for st in sw["steps"] if st["op"] == "convert"][1] == (4 << 30) + (2 << 20)  # around 4G


def test_bad_specs():
    with pytest.raises(sweep.SweepError, match=r"sizes\[0\]: 0 is less than the minimum of 4096"):
        sweep.validate(dict(SPEC, sizes=[0]))
    with pytest.raises(sweep.SweepError, match=r"scenarios\[1\]: unknown scenario '.*nope'"):
        sweep.validate(dict(SPEC, scenarios=["snp-life", "nope"]))
    with pytest.raises(sweep.SweepError, match=r"options.prepare\[0\]: 'never' is not one of"):
        sweep.validate(dict(SPEC, options={"prepare": ["never"]}))
    with pytest.raises(sweep.SweepError, match=r"kernels\[0\]: .*'1.0'"):
        sweep.validate(dict(SPEC, kernels=["1.0"]))


def test_local_cluster_of_two_workers_equals_serial(tmp_path):
    spec = sweep.validate(dict(SPEC))
    serial = sweep.run(spec, str(tmp_path / "serial"), scheduler="serial")
    dask = sweep.run(spec, str(tmp_path / "dask"), workers=2, processes=True)
    assert dask["sweep"]["workers"] == 2 and dask["sweep"]["scheduler"] == "local processes"
    results.validate(serial)
    results.validate(dask)
    assert serial["status"] == dask["status"] == "ok"
    a = {r["cell"]["key"]: _same(r) for r in serial["runs"]}
    b = {r["cell"]["key"]: _same(r) for r in dask["runs"]}
    assert len(a) == 8 and a == b
    ta = pq.read_table(tmp_path / "serial" / "sweep.parquet").drop(["seconds"]).to_pylist()
    tb = pq.read_table(tmp_path / "dask" / "sweep.parquet").drop(["seconds"]).to_pylist()
    assert ta == tb and len(ta) == 8
    assert {"scenario", "size", "seed", "kernel", "option.prepare", "vm.pf_fixed", "rmp.rmpupdate"} <= set(ta[0])


def test_resume_skips_finished_cells(tmp_path):
    spec = sweep.validate(dict(SPEC, scenarios=["sw-conversions"]))
    out = str(tmp_path / "out")
    first = sweep.run(spec, out, scheduler="serial")
    assert first["sweep"]["skipped"] == 0 and len(first["runs"]) == 4
    cells = sorted(os.listdir(os.path.join(out, "cells")))
    os.remove(os.path.join(out, "cells", cells[0]))
    ran = []
    again = sweep.run(spec, out, scheduler="serial", progress=lambda d, t: ran.append(d))
    assert again["sweep"]["skipped"] == 3 and ran == [3, 4]
    assert [_same(r) for r in again["runs"]] == [_same(r) for r in first["runs"]]


def test_threads_by_default(tmp_path):
    spec = sweep.validate(dict(SPEC, scenarios=["sw-conversions"], sizes=["8M"]))
    doc = sweep.run(spec, str(tmp_path / "t"), workers=2)
    assert doc["sweep"]["scheduler"] == "local threads" and doc["status"] == "ok" and len(doc["runs"]) == 2


def test_cli_sweep(tmp_path):
    (tmp_path / "s.toml").write_text('name = "s"\nscenarios = ["sw-conversions"]\nsizes = ["8M", "16M"]\n'
                                     'metrics = ["vm.pf_fixed"]\n[options]\nhuge_folios = [false, true]\n')
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(sweep.__file__))),
               MPLBACKEND="Agg")
    p = subprocess.run([sys.executable, "-m", "gmem", "sweep", "s.toml", "--serial", "--json"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    doc = results.validate(json.loads(p.stdout))
    assert doc["kind"] == "sweep" and len(doc["runs"]) == 4 and doc["sweep"]["charts"] == ["charts/vm.pf_fixed.png"]
    assert (tmp_path / "s" / "charts" / "vm.pf_fixed.png").stat().st_size > 10000
    p = subprocess.run([sys.executable, "-m", "gmem", "report", "s"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "data:image/png;base64," in (tmp_path / "s.html").read_text()
    (tmp_path / "bad.toml").write_text('scenarios = ["sw-conversions"]\nseeds = [-1]\n')
    p = subprocess.run([sys.executable, "-m", "gmem", "sweep", "bad.toml"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip() == "gmem sweep: error: seeds[0]: -1 is less than the minimum of 0"


def test_shipped_spec_is_valid():
    root = os.path.join(os.path.dirname(__file__), "..", "examples", "sweeps", "policies.toml")
    if not os.path.exists(root):
        pytest.skip("the examples/ folder is not next to the tests (installed run)")
    spec = sweep.load(root)
    assert len(sweep.cells(spec)) == 200
    assert scenario.validate(spec["_scenarios"]["tdx-life"])


def test_an_existing_scheduler(tmp_path):
    """--scheduler ADDRESS: the cells go to a cluster someone else started (here one in-process
    worker on loopback), with the results of the serial run."""
    from distributed import LocalCluster
    spec = sweep.validate(dict(SPEC, scenarios=["sw-conversions"], sizes=["8M"]))
    with LocalCluster(n_workers=1, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=None) as cluster:
        doc = sweep.run(spec, str(tmp_path / "remote"), scheduler=cluster.scheduler_address)
        assert len(cluster.scheduler_info["workers"]) == 1            # the cluster outlives the sweep
    serial = sweep.run(spec, str(tmp_path / "serial"), scheduler="serial")
    assert doc["sweep"]["scheduler"].startswith("tcp://127.0.0.1:")
    assert [_same(r) for r in doc["runs"]] == [_same(r) for r in serial["runs"]]


def test_unreachable_scheduler(tmp_path):
    spec = sweep.validate(dict(SPEC, scenarios=["sw-conversions"], sizes=["8M"]))
    with pytest.raises(sweep.SweepError, match="--scheduler tcp://127.0.0.1:9: cannot connect"):
        sweep.run(spec, str(tmp_path / "x"), scheduler="tcp://127.0.0.1:9", connect_timeout="1s")
