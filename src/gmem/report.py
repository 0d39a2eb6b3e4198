"""`gmem report RESULT`: one self-contained HTML page (tables, charts inlined as PNG) of a
result document (gmem/schemas/result-1.schema.json) of a run, a comparison, a replay or a
sweep, for sharing: it opens in any browser with no other file.
"""
import base64
import html
import json
import os

from gmem import plots, results, schema

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.8em; text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.differs td { background: #fff4d6; }
th { background: #f4f4f4; }
.ok { color: #1a7f37; } .violation, .error, .interrupted { color: #c62828; font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


class ReportError(ValueError):
    """A RESULT that cannot be reported (missing, not JSON, not a result document)."""


def load(path):
    """The result document at path: a JSON file, or a sweep's output directory (sweep.json)."""
    if os.path.isdir(path):
        path = os.path.join(path, "sweep.json")
    if not os.path.exists(path):
        raise ReportError(f"no such file: {path}")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: not a JSON result document: {e}") from None
    try:
        return results.validate(doc), os.path.dirname(os.path.abspath(path))
    except schema.SchemaError as e:
        raise ReportError(f"{path}: not a gmem result document: {e}") from None


def _table(rows, headers, numeric=(), highlight=()):
    """An HTML table; columns whose index is in numeric are right-aligned, rows whose index is
    in highlight are marked (the counters that differ between runs)."""
    def cls(i):
        return ' class="n"' if i in numeric else ""
    head = "".join(f"<th{cls(i)}>{html.escape(str(h))}</th>" for i, h in enumerate(headers))
    marked = ' class="differs"'
    body = "".join(f"<tr{marked if j in highlight else ''}>" +
                   "".join(f"<td{cls(i)}>{html.escape(str(x))}</td>" for i, x in enumerate(r)) + "</tr>"
                   for j, r in enumerate(rows))
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(draw):
    """An <img> of what draw(path) writes, inlined (PNG, base64)."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "chart.png")
        draw(p)
        with open(p, "rb") as f:
            data = base64.b64encode(f.read()).decode()
    return f'<img alt="chart" src="data:image/png;base64,{data}">'


def _img_file(path):
    with open(path, "rb") as f:
        return f'<img alt="{html.escape(os.path.basename(path))}" src="data:image/png;base64,' \
               f'{base64.b64encode(f.read()).decode()}">'


def _num(v):
    return f"{v:.3f}" if isinstance(v, float) else f"{v:,}"


def _status(s):
    return f'<span class="{html.escape(s)}">{html.escape(s)}</span>'


def render(doc, base_dir="."):
    """The HTML page of a result document (sweep charts are read from base_dir)."""
    from gmem.__main__ import _huge, compare_keys
    runs = doc["runs"]
    title = f"gmem {doc['kind']}" + (f": {doc['scenario']['name']}" if doc.get("scenario") else "")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>status {_status(doc['status'])} · gmem {html.escape(doc['gmem_version'])} · "
             f"{html.escape(doc['created'])} · {len(runs)} run(s) · {doc['seconds']:.3f} s</p>"]
    if doc.get("scenario"):
        parts.append(f"<p>{html.escape(doc['scenario']['description'])}</p>")
    parts.append("<h2>Runs</h2>" + _table(
        [(i + 1, r["label"], r["status"], r["host"]["kernel"], r["host"]["platform"],
          ", ".join(f"{k}={v}" for k, v in r["host"]["options"].items()), f"{r['seconds']:.3f}",
          (f"{r['error']['type']}: {r['error']['message']}" if r["error"] else ""))
         for i, r in enumerate(runs[:200])],
        ("#", "label", "status", "kernel", "platform", "options", "seconds", "error"), numeric={0, 6}))
    ok = [r for r in runs if r["status"] != "error"]
    if doc["kind"] == "sweep":
        parts.append(_sweep_section(doc, base_dir))
    elif ok:
        keys = compare_keys(ok)
        tot = [results.row(r) for r in ok]
        moment = ok[0]["counters"]["moment"]["label"]
        names = sorted(set().union(*tot))
        differs = {j for j, k in enumerate(names) if len({t.get(k, 0) for t in tot}) > 1}
        parts.append(f"<h2>Counters</h2><p>taken {html.escape(moment)}; VMs closed earlier: just before their "
                     f"close. Columns: the runs above, by number" +
                     ("; highlighted: the counters that differ between runs" if len(ok) > 1 else "") + ".</p>")
        parts.append(_table([(k, *[_num(t.get(k, 0)) for t in tot]) for k in names],
                            ("counter", *[f"run {i + 1}" for i in range(len(ok))]),
                            numeric=set(range(1, len(ok) + 1)), highlight=differs))
        if len(ok) > 1 and plots.have_matplotlib():
            parts.append(_img(lambda p: plots.compare_chart([r["label"] for r in ok], tot, keys, p,
                                                            title="runs compared")))
        if any(_huge(r) for r in ok) and plots.have_matplotlib():
            parts.append("<h2>Huge pages: share of mapped bytes per level</h2><p>after each step, the VMs summed "
                         "(huge.* rows above: the measures; rmp_flush_equivalent = RMPUPDATE + PSMASH is a model "
                         "parameter, not a measured cost).</p>" +
                         _img(lambda p: plots.level_share_chart([r["label"] for r in ok],
                                                                [r["huge"]["samples"] for r in ok], p)))
    for r in runs[:20]:
        if r.get("stream") and r["stream"]["chunks"] and plots.have_matplotlib():
            ch = r["stream"]["chunks"]
            parts.append("<h2>Replay throughput</h2>" + _img(lambda p: plots.replay_chart(
                [a for a, _ in ch], [b for _, b in ch], p, r["label"])))
        if r["events"] or r["timings"]:
            parts.append(f"<h2>{html.escape(r['label'])}: events and step timings</h2><ul>" +
                         "".join(f"<li>{html.escape(e)}</li>" for e in r["events"]) + "</ul>")
            parts.append(_table([(t["step"], t["op"], f"{t['seconds'] * 1e3:.2f}") for t in r["timings"]],
                                ("step", "op", "ms"), numeric={0, 2}))
    parts.append("</body></html>")
    return "\n".join(parts)


def _sweep_section(doc, base_dir):
    sw = doc.get("sweep", {})
    parts = [f"<h2>Sweep</h2><p>{sw.get('cells', len(doc['runs']))} cells "
             f"({sw.get('skipped', 0)} reused from an earlier run) on {sw.get('workers', '?')} worker(s) "
             f"({html.escape(str(sw.get('scheduler', '')))}); table: <code>{html.escape(str(sw.get('table')))}</code></p>"]
    for c in sw.get("charts", []):
        p = os.path.join(base_dir, c)
        if os.path.exists(p):
            parts.append(f"<h3>{html.escape(os.path.splitext(c)[0])}</h3>" + _img_file(p))
    return "\n".join(parts)


def write(result_path, out_path):
    """Write the HTML page of the result at result_path to out_path."""
    doc, base = load(result_path)
    text = render(doc, base)
    with open(out_path, "w") as f:
        f.write(text)
    return out_path

