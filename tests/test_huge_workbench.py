"""Huge pages on the workbench (proposed upstream): scenario keys for the hugetlb
backing and the restructuring policies, the per-step level samples and the huge-page measures
in the result record, the built-in huge-* scenarios, and `gmem compare --huge-policies` with its
level chart and table."""
import json

import pytest

import gmem
from gmem import results, scenario, schema
from gmem.__main__ import HUGE_POLICY_SETS, main

pytest.importorskip("jsonschema", reason="validation needs the cli extra (pip install '.[test]')")

MB, GB = 1 << 20, 1 << 30


def policy(text):
    return dict(kv.split("=") for kv in text.split(","))


def run(name, text):
    r = scenario.run(scenario.BUILTIN[name], policy(text), name=name)
    assert r.status == "ok", r.error
    return r


def guest_spec(pool, size, steps, vm_type="sw_protected", **gmem_keys):
    return {"host": {"memory": "4G", "platform": "amd", "hugetlb_pages": pool},
            "vms": [{"name": "g", "type": vm_type, "gmem": [dict(size=size, **gmem_keys)],
                     "memslots": [{"size": size, "gmem": "ram"}]}],
            "steps": steps}


# ---------------------------------------------------------------- schema and keys

def test_schema_huge_enums_are_what_host_accepts():
    host = schema.load("scenario")["properties"]["host"]["properties"]
    for key in ("gmem_backing", "huge_split", "huge_merge"):
        for value in host[key]["enum"]:
            assert gmem.Host(memory=GB, platform="none", **{key: value}).options[key] == value
        with pytest.raises(ValueError):
            gmem.Host(memory=GB, platform="none", **{key: "bogus"})
    from gmem import sweep
    for key in ("gmem_backing", "huge_split", "huge_merge", "tdx_huge_page"):
        assert key in scenario.HOST_KEYS and key in scenario.POLICY_KEYS and key in sweep.OPTION_KEYS
    assert "hugetlb_pages" in scenario.HOST_KEYS
    # every key the scenario runner takes, the schema lets through (it lacked the in-place ones)
    assert set(schema.load("scenario")["properties"]["host"]["properties"]) == scenario.HOST_KEYS
    scenario.validate({"host": {"kernel": "next", "gmem_in_place_conversion": True, "content_modes": True}})


@pytest.mark.parametrize("spec, message", [
    (guest_spec({"4K": 1}, "2M", []), "host.hugetlb_pages: Additional properties are not allowed"),
    (guest_spec({"2M": 1}, "2M", [], page_order=12), "vms[0].gmem[0].page_order: 12 is not one of [0, 9, 18]"),
    (guest_spec({"2M": 1}, "2M", [{"op": "accept", "size": "2M", "level": 3}]), "steps[0].level: 3 is not one of"),
    (guest_spec({"2M": 1}, "2M", [{"op": "convert", "size": "4K", "discard": 1}]),
     "steps[0].discard: 1 is not of type 'boolean'"),
])
def test_huge_keys_are_validated(spec, message):
    with pytest.raises(scenario.ScenarioError) as e:
        scenario.validate(spec)
    assert str(e.value).startswith(message)


def test_a_stride_that_is_not_whole_pages_is_refused():
    spec = guest_spec({"2M": 2}, "4M", [{"op": "faults", "size": "4M", "stride": "6K"}])
    with pytest.raises(scenario.ScenarioError, match="stride: 6144 is not a positive multiple of 4096"):
        scenario.run(spec)


def test_gmem_flags_and_page_order_reach_create():
    """[[vms.gmem]] page_order (the WIP tree's field) takes the file from the pool at that size,
    under either backing; a pool too small is the kernel's ENOMEM at create."""
    spec = guest_spec({"2M": 4, "1G": 1}, "4M", [{"op": "attributes", "size": "4M"},
                                                 {"op": "faults", "size": "4M", "stride": "2M"}],
                      flags=gmem.uapi.GUEST_MEMFD_FLAG_HUGETLB, page_order=9)
    r = scenario.run(spec)
    f = r.files["g", "ram"]
    assert sorted(o for _, o, _ in f.folios()) == [9, 9]
    assert r.host.hugetlb["2M"]["free"] == 2 and r.host.hugetlb["1G"]["free"] == 1
    assert r.result()["huge"]["measures"]["pages_2m"] == 2
    spec["vms"][0]["gmem"][0]["size"] = spec["vms"][0]["memslots"][0]["size"] = "16M"
    with pytest.raises(scenario.ScenarioError, match=r"vms\[0\].*subpool"):
        scenario.run(spec)


# ------------------------------------------------------------- samples and measures

def test_levels_are_sampled_after_every_step_and_measures_match_the_host():
    r = run("huge-bounce-buffers", HUGE_POLICY_SETS[1])           # hugetlb, fresh, eager
    rec = r.result()
    samples = rec["huge"]["samples"]
    assert [s["step"] for s in samples] == list(range(len(r.spec["steps"])))
    assert samples[1]["vm"]["sw"] == {"pages_4k": 0, "pages_2m": 0, "pages_1g": 1}   # one fault maps the 1G
    assert samples[1]["vm"]["snp"]["pages_1g"] == 0                  # SNP: the RMP caps private at 2M
    m = rec["huge"]["measures"]
    assert m["folio_splits"] == r.host.stats["folio_splits"] > 0
    assert m["folio_merges"] == r.host.stats["folio_merges"]
    assert m["rmpupdate"] == r.host.rmp.stats["rmpupdate"] and m["psmash"] == r.host.rmp.stats["psmash"]
    assert m["rmp_flush_equivalent"] == m["rmpupdate"] + m["psmash"]
    assert m["remote_tlb_flush"] == sum(vm.stats["remote_tlb_flush"] for vm in r.vms.values())
    assert m["stranded_bytes"] == r.host.hugetlb["stranded_bytes"]
    for k in ("pages_4k", "pages_2m", "pages_1g"):
        assert m[k] == sum(vm.stats[k] for vm in r.vms.values()) == sum(samples[-1]["vm"][v][k] for v in r.vms)
    assert abs(m["share_4k"] + m["share_2m"] + m["share_1g"] - 1) < 1e-9
    assert rec["huge"]["pool"]["1G"] == dict(r.host.hugetlb["1G"])
    results.validate(results.document("run", [rec]))


def test_bounce_buffers_shatter_1g_under_fresh_and_keep_2m_under_never():
    """What the model shows: one 64 KiB shared window restructures the whole 1G folio to 4K
    under "fresh" (the WIP tree's rule), so every later private fault maps 4K; "convert-2m"
    splits the 1G folio to 2M and only the touched 2M to 4K; "never" keeps the folio and maps 2M
    around the windows (lpage_info's mixed ranges at 4K). No policy keeps a 1G mapping while a
    window in its range is shared."""
    end = {}
    for text in (HUGE_POLICY_SETS[1], HUGE_POLICY_SETS[3], HUGE_POLICY_SETS[4]):
        m = run("huge-bounce-buffers", text).result()["huge"]["measures"]
        end[policy(text)["huge_split"]] = m
    fresh, c2m, never = end["fresh"], end["convert-2m"], end["never"]
    assert fresh["pages_1g"] == c2m["pages_1g"] == never["pages_1g"] == 0
    assert fresh["pages_2m"] == 0 and fresh["share_4k"] == 1.0
    assert never["pages_2m"] > 0 and never["pages_4k"] < fresh["pages_4k"]
    assert never["folio_splits"] == 0 and fresh["folio_splits"] == 2           # one per guest's 1G folio
    assert c2m["folio_splits"] > fresh["folio_splits"] and c2m["pages_2m"] == never["pages_2m"]
    assert c2m["mean_share_2m"] > fresh["mean_share_2m"]


def test_boot_accept_psmashes_each_2m_validated_at_4k():
    r = run("huge-boot-accept", HUGE_POLICY_SETS[1])
    m = r.result()["huge"]["measures"]
    assert m["psmash"] == 32                    # 64M at 4K: one PSMASH per 2M RMP entry
    assert m["pages_2m"] == 32 and m["pages_4k"] == 32 * 512      # the 4K half stays 4K
    assert r.host.rmp.stats["pvalidate"] == 64 * 256 + 32


# --------------------------------------------------------------------- compare

def test_compare_huge_policies_table_levels_chart_and_report(tmp_path, capsys):
    lv, out = tmp_path / "lv.svg", tmp_path / "c.json"
    assert main(["compare", "huge-balloon", "--huge-policies", "--levels", str(lv), "-o", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert [r["label"] for r in doc["runs"]] == HUGE_POLICY_SETS
    for r in doc["runs"]:
        m = r["huge"]["measures"]
        assert m["folio_splits"] == r["counters"]["host"]["folio_splits"]
        assert m["rmpupdate"] == r["counters"]["rmp"]["rmpupdate"]
    splits = [r["huge"]["measures"]["folio_splits"] for r in doc["runs"]]
    merges = [r["huge"]["measures"]["folio_merges"] for r in doc["runs"]]
    assert splits[0] == splits[4] == 0 and splits[1] > 0 and merges[1] == splits[1]   # merged before the free
    row = next(line for line in text.splitlines() if line.strip().startswith("huge.folio_splits"))
    assert [int(x) for x in row.split()[1:]] == splits
    assert "huge.rmp_flush_equivalent" in text and "huge.tdx_demote" not in text
    svg = lv.read_text()
    assert "share of mapped bytes" in svg and "huge_split=convert-2m" in svg
    html = tmp_path / "r.html"
    assert main(["report", str(out), "--out", str(html)]) == 0
    assert "share of mapped bytes per level" in html.read_text()


def test_compare_huge_policies_across_kernels(tmp_path):
    out = tmp_path / "c.json"
    assert main(["compare", "huge-boot-accept", "--huge-policies", "--kernel", "6.18,7.2", "--json",
                 "-o", str(out), "--quiet"]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["runs"]) == 10 and all(r["status"] == "ok" for r in doc["runs"])
    assert {r["host"]["kernel"] for r in doc["runs"]} == {"6.18", "7.2"}


def test_the_readme_example_runs():
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Huge pages (proposed upstream)"):]
    exec(re.search(r"```python\n(.*?)```", section, re.S).group(1), {})


def test_in_place_private_fault_keeps_shared_pages_of_a_huge_folio():
    """A huge folio over private and shared pages (huge_split="never"): a private fault makes
    only its private runs private (kvm_gmem_make_private_runs), the shared page stays shared."""
    from gmem import uapi as u
    h = gmem.Host(memory=GB, platform="amd", kernel="next", gmem_in_place_conversion=True, huge_folios=True)
    vm = h.create_vm(u.KVM_X86_SNP_VM)
    f = vm.create_guest_memfd(4 * MB)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, 4 * MB, 0, f, 0)
    vm.launch()
    v = vm.create_vcpu(0)
    ec = u.PFERR_WRITE_MASK | u.PFERR_GUEST_ENC_MASK
    assert v.page_fault(0, ec).level == 2
    f.set_memory_attributes(MB, 4096, 0)            # make_shared: PSMASH, the page shared in the RMP
    h.check()
    v.page_fault(0x1000, ec)                        # a private fault elsewhere in the folio
    h.check()
    assert not h.rmp.lookup(v.page_fault(0, ec).pfn + 0x100).assigned


def test_tdx_accept_levels_and_demote_reach_the_measures():
    """The accept op at level 1 then 2 on a running TD with 2M S-EPT leaves (TDX huge pages v3):
    4K ACCEPTs map 4K, 2M ACCEPTs 2M; a 4K ACCEPT inside a pending 2M leaf demotes it (BLOCK,
    TRACK, kick, DEMOTE), which the run's measures count."""
    spec = {"host": {"memory": "1G", "platform": "intel", "huge_folios": True, "tdx_huge_page": True},
            "vms": [{"name": "td", "type": "tdx", "gmem": [{"size": "16M"}],
                     "memslots": [{"size": "16M", "gmem": "ram"}]}],
            "steps": [{"op": "attributes", "size": "16M"},
                      {"op": "accept", "size": "4M", "level": 1},
                      {"op": "accept", "gpa": "4M", "size": "4M", "level": 2},
                      {"op": "faults", "gpa": "8M", "size": "2M", "stride": "2M"},
                      {"op": "accept", "gpa": "8M", "size": "2M", "level": 1},
                      {"op": "check"}]}
    rec = scenario.run(spec).result()
    assert rec["status"] == "ok", rec["error"]
    levels = [s["vm"]["td"] for s in rec["huge"]["samples"]]
    assert levels[1] == {"pages_4k": 1024, "pages_2m": 0, "pages_1g": 0}
    assert levels[2]["pages_2m"] == 2 and levels[3]["pages_2m"] == 3
    assert levels[4] == {"pages_4k": 1024 + 512, "pages_2m": 2, "pages_1g": 0}
    m = rec["huge"]["measures"]
    assert (m["tdx_block"], m["tdx_track"], m["tdx_demote"], m["tdx_kick"]) == (1, 1, 1, 1)
    assert m["tdx_demote"] == rec["counters"]["tdx"]["td"]["demote"]


def test_huge_tdx_boot_keeps_acceptance_across_a_bounce_buffer():
    """The built-in TD: 4K accepts leave 4K leaves, 2M accepts 2M leaves, and one 4K page made
    shared inside an accepted 2M leaf costs one demote: 511 pages stay mapped (and accepted)."""
    rec = scenario.run(scenario.BUILTIN["huge-tdx-boot"], name="huge-tdx-boot").result()
    assert rec["status"] == "ok", rec["error"]
    levels = [s["vm"]["td"] for s in rec["huge"]["samples"]]
    assert levels[0] == {"pages_4k": 256, "pages_2m": 0, "pages_1g": 0}       # built at 4K
    assert levels[2]["pages_4k"] == 256 + 30 * 256 and levels[2]["pages_2m"] == 0
    assert levels[3]["pages_2m"] == 16
    assert levels[4] == {"pages_4k": levels[3]["pages_4k"] + 511, "pages_2m": 15, "pages_1g": 0}
    m = rec["huge"]["measures"]
    assert (m["tdx_demote"], m["tdx_block"], m["tdx_track"]) == (1, 2, 2) and m["zapped_sptes"] == 1
