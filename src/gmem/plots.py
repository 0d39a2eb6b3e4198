"""Pictures, drawn with matplotlib (in the `kvm-gmem[cli]` and `[plot]` extras): the guest
memory map, policy comparisons, mapped-level shares over time, replay throughput, trace
timelines and sweep summaries.

Each function writes one file whose format follows its extension (.png, .svg, .pdf) and
returns the path. Without matplotlib, `require()` raises PlotError with the install hint.
"""
import os
import textwrap

import numpy as np

# (label, RGB) per page category of classify()
CATEGORIES = (
    ("shared, unmapped", (222, 235, 247)),
    ("shared, mapped", (66, 146, 198)),
    ("private, no folio", (240, 240, 240)),
    ("private, folio not prepared", (253, 208, 162)),
    ("private, prepared (RMP assigned)", (241, 105, 19)),
    ("private, validated / mapped 4K", (116, 196, 118)),
    ("private, mapped 2M", (0, 109, 44)),
)
FORMATS = (".png", ".svg", ".pdf")


class PlotError(ValueError):
    """No picture can be made (matplotlib missing, an unknown file format)."""


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def require(path=None):
    """PlotError unless matplotlib is importable and path (if given) has a known extension."""
    if path is not None and os.path.splitext(path)[1].lower() not in FORMATS:
        raise PlotError(f"{path}: a picture is {', '.join(FORMATS)}")
    if not have_matplotlib():
        raise PlotError("pictures need matplotlib: pip install 'kvm-gmem[cli]'")


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    require(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def classify(states):
    """A category index (into CATEGORIES) per page of gmem.page_states()."""
    cat = np.zeros(len(states), dtype=np.uint8)
    shared = states["private"] == 0
    cat[shared & (states["level"] > 0)] = 1
    priv = ~shared
    cat[priv] = 2
    cat[priv & (states["backed"] == 1)] = 3
    cat[priv & (states["prepared"] == 1)] = 4
    cat[priv & ((states["rmp"] == 2) | ((states["level"] == 1) & (states["rmp"] != 1)))] = 5
    cat[priv & (states["level"] >= 2)] = 6
    return cat


def memory_map(states, path, title="guest memory"):
    """One row per 2 MiB of guest-physical memory, one column per 4 KiB page, a colour per
    page state (legend), with the guest-physical address on the y axis."""
    require(path)
    width = 512
    cat = classify(states)
    rows = max(1, -(-len(cat) // width))
    grid = np.full(rows * width, 255, dtype=np.uint8)
    grid[:len(cat)] = cat
    grid = grid.reshape(rows, width)
    palette = np.array([c for _, c in CATEGORIES] + [(255, 255, 255)] * (256 - len(CATEGORIES)), dtype=np.uint8)
    plt = _pyplot()
    from matplotlib.patches import Patch
    g0 = (int(states["gfn"][0]) << 12) / (1 << 20) if len(states) else 0.0
    fig, ax = plt.subplots(figsize=(11, 2.2 + 0.11 * rows))
    ax.imshow(palette[grid], aspect="auto", interpolation="nearest",
              extent=(0, width, g0 + 2 * rows, g0))
    ax.set_xlabel("4 KiB page within the 2 MiB region")
    ax.set_ylabel("guest physical address (MiB)")
    ax.set_title(title)
    present = sorted(set(np.unique(cat).tolist()))
    ax.legend(handles=[Patch(color=np.array(CATEGORIES[i][1]) / 255, label=f"{CATEGORIES[i][0]}: "
                             f"{int((cat == i).sum())} pages") for i in present],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, title="page state")
    return _save(fig, path)


def compare_chart(names, counters, keys, path, title="policy comparison"):
    """One small bar chart per counter (keys, chosen by the caller for the VM types that ran),
    one bar per run, each bar labelled with its run's name (policy set or kernel)."""
    require(path)
    plt = _pyplot()
    zero = [k for k in keys if not any(c.get(k, 0) for c in counters)]
    keys = [k for k in keys if k not in zero] or keys[:1]
    ncols = min(4, len(keys))
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.1 + 2.6 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    x = np.arange(len(names))
    for ax, key in zip(axes.flat, keys):
        vals = [c.get(key, 0) for c in counters]
        bars = ax.bar(x, vals, color=[colors[i % len(colors)] for i in range(len(names))])
        ax.bar_label(bars, labels=[f"{v:.2f}" if isinstance(v, float) else f"{v:,}" for v in vals], fontsize=7,
                     padding=1)
        ax.set_title(key, fontsize=9)
        ax.set_xticks(x, [str(i + 1) for i in x], fontsize=8)
        ax.set_ylim(0, max(max(vals) * 1.18, 1))
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    from matplotlib.patches import Patch
    fig.legend(handles=[Patch(color=colors[i % len(colors)], label=f"{i + 1}: {n}") for i, n in enumerate(names)],
               loc="lower center", ncol=1, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02 * len(names)))
    fig.suptitle(title + (f"\n(zero in every run: {', '.join(zero)})" if zero else ""), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


LEVEL_COLORS = (("4K", "#c6dbef"), ("2M", "#4292c6"), ("1G", "#08306b"))


def level_share_chart(names, samples, path, title="mapped bytes per level"):
    """One panel per run: the share of mapped guest bytes at 4K, 2M and 1G (stacked, the VMs
    summed) after each step, from the runs' level samples (gmem.results.level_sample)."""
    require(path)
    from gmem.results import sample_shares
    plt = _pyplot()
    n = max(1, len(names))
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 1.2 + 2.4 * nrows), squeeze=False, sharey=True)
    for ax, name, run in zip(axes.flat, names, samples):
        steps = [s["step"] for s in run]
        shares = [sample_shares(s) for s in run]
        ax.stackplot(steps, *[[sh[f"share_{lv.lower()}"] for sh in shares] for lv, _ in LEVEL_COLORS],
                     colors=[c for _, c in LEVEL_COLORS], labels=[lv for lv, _ in LEVEL_COLORS], step="post")
        ax.set_title(textwrap.fill(name.replace(",", ", "), 48), fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("share of mapped bytes", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.04))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def replay_chart(chunk_sizes, chunk_seconds, path, title="replay throughput"):
    """Faults per second over the replay, one point per chunk."""
    require(path)
    plt = _pyplot()
    done = np.cumsum(chunk_sizes)
    rate = np.asarray(chunk_sizes) / np.maximum(np.asarray(chunk_seconds, dtype=float), 1e-9) / 1e6
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(done, rate, marker="o", clip_on=False)
    ax.set_xlabel("faults replayed")
    ax.set_ylabel("million faults / s")
    ax.set_title(title)
    ax.set_xlim(0, done[-1] * 1.03 if len(done) else 1)
    ax.set_ylim(0, max(rate.max() * 1.15, 1e-3) if len(rate) else 1)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def trace_timeline(recs, path, title="trace"):
    """Three panels over the trace's sequence numbers: the faults (gpa, coloured by what
    followed them), the guest-side events (SPTE zaps, preparations, memory-fault exits by gpa;
    gmem invalidations by host pfn, on the right axis), and the guest memory mapped per
    SPTE level."""
    from gmem import tracing
    require(path)
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True)
    ev = tracing.events(recs)
    mib = float(1 << 20)
    ax = axes[0]
    faults = recs[ev == "kvm_page_fault"]
    outcome = tracing.fault_outcomes(recs)
    # the rare outcomes last, so that thousands of spurious faults do not hide them
    for name, color, size in (("no change", "tab:gray", 2), ("fixed", "tab:green", 6), ("exit", "tab:red", 9)):
        m = outcome == name
        if m.any():
            ax.scatter(faults["seq"][m], faults["a"][m] / mib, s=size, color=color, label=f"{name} ({int(m.sum())})")
    ax.set_ylabel("fault gpa (MiB)")
    ax.legend(fontsize=8, markerscale=2, loc="upper left", bbox_to_anchor=(1.08, 1.0), frameon=False,
              title="fault, then")
    ax = axes[1]
    handles = []
    for name, color in (("spte_zap", "tab:orange"), ("gmem_prepare", "tab:blue"), ("memory_fault_exit", "tab:red")):
        r = recs[ev == name]
        if len(r):
            gpa = r["a"] if name == "memory_fault_exit" else r["a"] << np.uint64(12)
            handles.append(ax.scatter(r["seq"], gpa / mib, s=5, color=color, label=f"{name} ({len(r)})"))
    ax.set_ylabel("gpa (MiB)")
    r = recs[ev == "gmem_invalidate"]
    if len(r):
        ax2 = ax.twinx()
        handles.append(ax2.scatter(r["seq"], r["a"] * 4096 / mib, s=12, marker="|", color="tab:purple",
                                   label=f"gmem_invalidate ({len(r)}), right axis"))
        ax2.set_ylabel("host pfn invalidated (MiB)", color="tab:purple")
    ax.legend(handles=handles, fontsize=8, markerscale=2, loc="upper left", bbox_to_anchor=(1.08, 1.0),
              frameon=False)
    ax = axes[2]
    levels = tracing.mapped_levels(recs)
    seq = recs["seq"].astype(np.int64)
    for lvl, name in ((1, "4K"), (2, "2M"), (3, "1G")):
        if levels[lvl].any():
            ax.step(seq, levels[lvl] * tracing.LEVEL_PAGES[lvl] * 4096 / mib, where="post",
                    label=f"by {name} SPTEs (peak {int(levels[lvl].max())})")
    ax.set_ylabel("guest memory mapped (MiB)")
    ax.set_xlabel("trace sequence number")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.08, 1.0), frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def sweep_chart(table, metric, path, title=None):
    """One panel per scenario: the metric (median over seeds) against the guest size, one line
    per policy set and kernel."""
    require(path)
    plt = _pyplot()
    # only the scenarios that have this metric (no RMP panel for a TD, no TDX panel for SNP)
    scen = sorted({s for s, v in zip(table["scenario"], table[metric]) if v is not None}) or sorted(set(table["scenario"]))
    fig, axes = plt.subplots(1, len(scen), figsize=(max(6.0, 4.6 * len(scen)), 3.8), squeeze=False)
    for ax, s in zip(axes[0], scen):
        rows = [i for i, x in enumerate(table["scenario"]) if x == s]
        labels = sorted({table["label"][i] for i in rows})
        for j, lab in enumerate(labels):
            pts = {}
            for i in rows:
                if table["label"][i] == lab and table[metric][i] is not None:
                    pts.setdefault(table["size"][i] or 0, []).append(table[metric][i])
            xs = sorted(pts)
            # lines that coincide stay visible: each its own marker size and dash pattern
            ax.plot([x / 2**20 for x in xs], [float(np.median(pts[x])) for x in xs], label=lab, clip_on=False,
                    marker="osD^vx"[j % 6], markersize=9 - 1.5 * (j % 4), linestyle=("-", "--", ":", "-.")[j % 4],
                    linewidth=2.2 - 0.4 * (j % 4))
        ax.set_title(os.path.basename(s), fontsize=10)
        ax.set_xlabel("guest memory (MiB)")
        ax.set_xscale("log", base=2)
        from matplotlib.ticker import ScalarFormatter
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_ylabel(metric)
        ax.set_ylim(bottom=0)
        ax.margins(y=0.1)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", fontsize=8, frameon=False, ncol=2,
               bbox_to_anchor=(0.5, -0.04 * max(1, len(labels) // 2 + 1)))
    fig.suptitle(title or f"{metric} (median over seeds)")
    fig.tight_layout()
    return _save(fig, path)
