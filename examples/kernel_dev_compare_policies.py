"""Kernel developer: one workload under the RFC's policies and 6.18's, counts side by side.

    python examples/kernel_dev_compare_policies.py [--json result.json]

Runs the built-in SEV-SNP scenario (launch, private faults, PVALIDATE, conversions both ways,
a 2M RMP split, shutdown) under three policy sets and prints what each costs: gmem_prepare
calls, RMPUPDATEs, zapped SPTEs, 2M mappings. The same comparison as `gmem compare snp-life`,
written against the library so that a design can be scripted.
"""
import argparse
import json

from gmem import results, scenario

POLICY_SETS = {
    "6.18 (prepare at fault, gmem tracks)": dict(prepare="fault", prepared_tracking="gmem"),
    "RFC 2023 (prepare at alloc, arch tracks)": dict(prepare="alloc", prepared_tracking="arch"),
    "post-6.18 (prepare at fault, arch tracks)": dict(prepare="fault", prepared_tracking="arch"),
}
COUNTERS = ("vm.gmem_prepare", "rmp.rmpupdate", "rmp.psmash", "vm.zapped_sptes", "vm.pages_2m",
            "host.folio_splits", "rmp.assigned_pages")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="FILE", help="write the result document (for gmem report)")
    args = ap.parse_args()
    spec = scenario.BUILTIN["snp-life"]
    runs = []
    for label, options in POLICY_SETS.items():
        r = scenario.run(spec, options, name="snp-life")
        assert r.status == "ok", r.error
        runs.append(r.result(label=label))
    width = max(map(len, COUNTERS))
    print(f"{'counter':<{width}}  " + "  ".join(f"{i + 1:>12}" for i in range(len(runs))))
    for key in COUNTERS:
        print(f"{key:<{width}}  " + "  ".join(f"{results.totals(r['counters']).get(key, 0):>12,}" for r in runs))
    for i, r in enumerate(runs):
        print(f"  {i + 1}: {r['label']}")
    moment = runs[0]["counters"]["moment"]["label"]
    print(f"(counters {moment}; the guest's just before its shutdown)")
    prepares = [results.totals(r["counters"])["vm.gmem_prepare"] for r in runs]
    print(f"the RFC's preparation at allocation calls the arch hook {prepares[1] / prepares[0]:.0f}x as often as "
          "6.18;\nRMPUPDATEs are the same because the arch hook is idempotent")
    if args.json:
        doc = results.validate(results.document("compare", runs, scenario={
            "name": "snp-life", "description": spec["description"], "spec": spec}))
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
