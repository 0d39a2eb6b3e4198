"""Pictures: the guest memory map, policy comparisons, replay throughput.

matplotlib (the `kvm-gmem[plot]` extra) draws them with labels and legends; without it the
memory map is still written as a bare PNG (numpy + zlib), and the charts are skipped.
"""
import struct
import zlib

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


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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


def _grid(states, width=512):
    cat = classify(states)
    rows = -(-len(cat) // width)
    grid = np.zeros(rows * width, dtype=np.uint8)
    grid[:len(cat)] = cat
    return grid.reshape(rows, width)


def write_png(path, rgb):
    """A minimal PNG writer for an (h, w, 3) uint8 array."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def memory_map(states, path, title="guest memory"):
    """One row per 2 MiB of guest-physical memory, one column per 4 KiB page."""
    grid = _grid(states)
    palette = np.array([c for _, c in CATEGORIES], dtype=np.uint8)
    if not have_matplotlib():
        scale = max(1, 256 // max(1, grid.shape[0]))
        write_png(path, np.repeat(palette[grid], scale, axis=0))
        return path
    plt = _pyplot()
    from matplotlib.patches import Patch
    g0 = int(states["gfn"][0]) << 12 if len(states) else 0
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.12 * grid.shape[0]))
    ax.imshow(palette[grid], aspect="auto", interpolation="nearest",
              extent=(0, grid.shape[1], g0 / (1 << 20) + 2 * grid.shape[0], g0 / (1 << 20)))
    ax.set_xlabel("4 KiB page within the 2 MiB region")
    ax.set_ylabel("guest physical address (MiB)")
    ax.set_title(title)
    present = sorted(set(np.unique(grid).tolist()))
    ax.legend(handles=[Patch(color=np.array(CATEGORIES[i][1]) / 255, label=CATEGORIES[i][0]) for i in present],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


def compare_chart(names, counters, keys, path, title="policy comparison"):
    """Grouped bars: one group per counter, one bar per policy set (symmetric log scale)."""
    if not have_matplotlib():
        return None
    plt = _pyplot()
    x = np.arange(len(keys))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(keys) + 3), 4.5))
    for i, (name, c) in enumerate(zip(names, counters)):
        ax.bar(x + i * width, [c.get(k, 0) for k in keys], width, label=name)
    ax.set_yscale("symlog", linthresh=1)       # zeros stay at zero
    ax.set_xticks(x + width * (len(names) - 1) / 2, keys, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("count (log; 0 = no bar)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def replay_chart(chunk_sizes, chunk_seconds, path, title="replay throughput"):
    """Faults per second over the replay, one point per chunk."""
    if not have_matplotlib():
        return None
    plt = _pyplot()
    done = np.cumsum(chunk_sizes)
    rate = np.asarray(chunk_sizes) / np.maximum(np.asarray(chunk_seconds), 1e-9)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(done, rate / 1e6, marker=".")
    ax.set_xlabel("faults replayed")
    ax.set_ylabel("million faults / s")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    return _save(fig, path)
