"""``frontier.html``: an interactive, self-contained page of one or more frontiers.

``write_dashboard(out_dir, summary, reference)`` reads ``frontier.csv`` in ``out_dir`` (and the summary
that :func:`qpexp.frontier.write_frontier` computed, or ``frontier.json``) and writes one HTML file
with plotly.js bundled inline, so the page opens without a network. ``python -m qpexp.dashboard DIR
[--reference CSV]`` rebuilds it from the files alone.

The page shows:

- test accuracy against compression ratio (log axis), against BOPs and against measured onnxruntime
  latency (where recorded); one trace per front (each sweep folder, split further by ``config.name``
  when it varies; each method of a ``--reference`` CSV), switched on and off in the legend; seed means
  with a std error bar (single seeds as small dots beside them); each front's Pareto front as a step
  line; each front's dense reference line (and 1 and 2 points below the first one's);
- hover: the config axes, accuracy, ratio, size, status; a click: per-layer sparsity and weight bits,
  and where the bits go (weights with their index format, scales and zero points, float biases,
  other float tensors) as bar charts;
- a sortable table of every front's best ratio within 1 and 2 points of its dense accuracy and its
  hypervolumes (relative: above its own dense minus the window; absolute: above the ONE shared
  reference point of ``frontier.json``), with the numbers of ``frontier.json`` for the whole merged
  set when several sweeps are given;
- every point whose status is not ``ok`` (failed, missing, ``deploy_mismatch``, ``deploy_error``)
  with its error.

The page embeds ``frontier.csv`` verbatim as JSON (``<script id="frontier-csv">``: ``columns`` and
``rows`` of strings, exactly the CSV's cells) and the derived view (``<script id="frontier-view">``):
the numbers drawn are computed here, in Python, with :mod:`qpexp.frontier`'s own functions.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import os
import re
import sys
from collections import OrderedDict
from pathlib import Path

from qpexp.core.warning import QpexpWarning
from qpexp.sweep import values as fr

LATENCY = "deploy/onnx_latency_ms"
FP32_LATENCY = "deploy/fp32_onnx_latency_ms"
# one colour per front (sweeps first, then reference methods in muted tones)
FRONT_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
REF_COLORS = ["#7f7f7f", "#a6761d", "#666666", "#b3a05b", "#8da0cb", "#bdbdbd", "#c49c94", "#9c9ede"]
BIT_COLORS = {2: "#d62728", 3: "#ff7f0e", 4: "#1f77b4", 5: "#17becf", 6: "#8c564b", 8: "#2ca02c"}
BIT_COLORS.update({16: "#9467bd", 32: "#000000"})


# -- reading ---------------------------------------------------------------------------------------
def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """The CSV's header and its rows as the exact cell strings."""
    with Path(path).open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        return header, [r for r in reader]


_INT = re.compile(r"[-+]?\d+")


def typed(v: str):
    """A CSV cell back to the value ``write_csv`` wrote: '' -> None, 'True' -> True, '4' -> 4, '0.5' -> 0.5."""
    if v == "":
        return None
    if v in ("True", "False"):
        return v == "True"
    if _INT.fullmatch(v):
        return int(v)
    try:
        return float(v)
    except ValueError:
        return v


def _clean(v):
    """JSON-safe: non-finite floats become None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def sweep_of(run_dir: str) -> str:
    """The sweep folder a row comes from: the first part of its ``run_dir`` (``baseline of a/p`` -> ``a``)."""
    rd = run_dir[len("baseline of ") :] if run_dir.startswith("baseline of ") else run_dir
    return rd.replace("\\", "/").split("/")[0] or rd


# -- the view --------------------------------------------------------------------------------------
def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _front_labels(rows: list[dict]) -> list[str]:
    """Each row's front: its sweep folder, plus ``config.name`` where that varies within the sweep."""
    sweeps = [sweep_of(str(r.get("run_dir") or "")) for r in rows]
    names: dict[str, set] = {}
    for s, r in zip(sweeps, rows):
        if r.get("point") == "run":
            names.setdefault(s, set()).add(r.get("config.name"))
    out = []
    for s, r in zip(sweeps, rows):
        if len(names.get(s, ())) > 1 and r.get("point") == "run":
            out.append(f"{s} · {r.get('config.name')}")
        else:
            out.append(s)
    return out  # dense rows of a split sweep belong to each of its fronts (see build_view)


def _layer_detail(row: dict) -> dict:
    layers: OrderedDict[str, dict] = OrderedDict()
    for k, v in row.items():
        m = re.fullmatch(r"(layers|size)/(.+)/(sparsity|bits_w|format|weight_bits|qparam_bits|bias_bits)", k)
        if m and v is not None:
            layers.setdefault(m.group(2), {"name": m.group(2)})[m.group(3)] = v
    return {"layers": list(layers.values()), "other_bits": row.get("size/other_bits")}


def _group_points(
    rows: list[dict], idx: list[int], axes: list[str], select: str = fr.SELECT, include: bool = False
) -> list[dict]:
    """Seed means of the rows ``idx`` (indices into ``rows``) with their members and Pareto flags
    (chosen on ``select``; ``acc`` is the test accuracy, ``select_acc`` the selection metric's)."""
    sub = [rows[i] for i in idx]
    gs = fr.groups(sub, axes, select, include)
    by_key = {g["key"]: g for g in gs}
    members: dict[tuple, list[int]] = {g["key"]: [] for g in gs}
    for i in idx:
        if fr._ok(rows[i], select):
            members[fr.group_key(rows[i], axes)].append(i)
    out = []
    for key, g in by_key.items():
        mem = members[key]
        lat = _mean([fr._num(rows[i].get(LATENCY)) for i in mem])
        out.append(
            {
                "label": fr._describe(g) + (" (not deployed)" if g["not_deployed"] else ""),
                "select_acc": g["sel"],
                "not_deployed": g["not_deployed"],
                "axes": {a: g.get(a) for a in axes if a != "seed"},
                "seeds": g["seeds"],
                "acc": g["acc"],
                "acc_std": g["acc_std"],
                "n": g["n"],
                "ratio": g["ratio"],
                "bops": g["bops"],
                "latency_ms": lat,
                "fp32_latency_ms": _mean([fr._num(rows[i].get(FP32_LATENCY)) for i in mem]),
                "size_bits": g["size_bits"],
                "sparsity": g["sparsity"],
                "bits": g.get("quant.bits_w"),
                "scope": g.get("prune.scope"),
                "dense": g.get("point") == "dense",
                "pareto": g["pareto"],
                "statuses": sorted({str(rows[i].get("status")) for i in mem}),
                "members": mem,
            }
        )
    for flag, field in (("pareto_bops", "bops"), ("pareto_latency", "latency_ms")):
        flags = fr.pareto_flags([(p["acc"], p[field]) for p in out], higher_better_x=False)
        for p, f in zip(out, flags):
            p[flag] = f
    return out


def _numbers(
    rows: list[dict],
    idx: list[int],
    axes: list[str],
    hv_window: float,
    ref_acc,
    select=fr.SELECT,
    include=False,
) -> dict:
    """A front's headline numbers, computed as ``frontier.summarize`` computes the merged ones: chosen
    on ``select``, with the test accuracy of the chosen config beside each."""
    sub = [rows[i] for i in idx]
    gs = fr.groups(sub, axes, select, include)
    s = fr.summarize(sub, gs, hv_window, select)
    out = {
        "configs": s["configs"],
        "points": s["points"],
        "points_ok": s["points_ok"],
        "points_failed": s["points_failed"],
        "dense_acc": s.get("dense_acc"),
        "best_ratio_within_1pt": s.get("best_ratio_within_1pt"),
        "best_ratio_within_1pt_test_acc": s.get("best_ratio_within_1pt_test_acc"),
        "best_within_1pt/config": s.get("best_within_1pt/config"),
        "best_ratio_within_2pt": s.get("best_ratio_within_2pt"),
        "best_ratio_within_2pt_test_acc": s.get("best_ratio_within_2pt_test_acc"),
        "best_within_2pt/config": s.get("best_within_2pt/config"),
        "hypervolume_relative": s.get("hypervolume_relative", s.get("hypervolume")),
        "hypervolume_absolute": None,
    }
    if ref_acc is not None:  # the chosen front at its test accuracies
        out["hypervolume_absolute"] = fr.hypervolume_above(
            [(g["acc"], g["ratio"]) for g in gs if g["pareto"]], ref_acc
        )
    return out


def _reference_front(reference, summary: dict, color_start: int) -> dict | None:
    """The ``--reference`` CSV as a front: one group per row (its seed mean), methods kept apart."""
    ref = fr.read_reference(reference)
    kept = _reference_rows(reference, len(ref["points"]))
    groups = [_reference_group(p, r) for p, r in zip(ref["points"], kept)]
    numbers = _reference_numbers(groups, summary, ref)
    return {
        "name": f"reference: {ref['name']}",
        "kind": "reference",
        "path": str(reference),
        "color": REF_COLORS[color_start % len(REF_COLORS)],
        "dense_acc": numbers["dense_acc"],
        "groups": groups,
        "points": [],
        "numbers": numbers,
    }


def _reference_rows(reference, n_points: int) -> list[dict]:
    """The rows read_reference kept, in order (the same test), for their extra columns; empty dicts
    when they do not line up with its ``n_points`` points."""
    header, raw = read_csv(Path(reference))
    raw_rows = [dict(zip(header, r)) for r in raw]
    kept = []
    for r in raw_rows:
        if r.get("point") is not None:
            if r.get("status") not in getattr(fr, "ACCURACY_STANDS", ("ok",)):
                continue
            acc, ratio = fr._num(r.get(fr.ACC)), fr._num(r.get(fr.RATIO))
        else:
            acc, ratio = fr._num(r.get("test_acc")), fr._num(r.get("compression_ratio"))
        if acc is not None and ratio is not None:
            kept.append(r)
    if len(kept) != n_points:
        kept = [{} for _ in range(n_points)]
    return kept


def _reference_group(p: dict, r: dict) -> dict:
    """One reference point ``p`` (with its CSV row ``r``) as a page group."""
    bits = fr._num(r.get("bits_w", r.get("quant.bits_w")))
    sp = fr._num(r.get("target_sparsity", r.get("prune.ratio")))
    ax = {k: typed(r[k]) for k in ("method", "scope", "bits_w", "bits_a", "target_sparsity") if k in r}
    size = fr._num(r.get("size_bits", r.get("final/size_bits")))
    label = p["label"] or "reference"
    desc = f"{label} w{fr._fmt(bits)}" + (f" {fr._fmt(sp)}" if sp else "") if bits is not None else label
    return {
        "label": desc,
        "axes": ax,
        "seeds": [],
        "acc": p["acc"],
        "acc_std": p["std"],
        "n": p["n"],
        "ratio": p["ratio"],
        "bops": None,
        "latency_ms": None,
        "size_bits": size,
        "sparsity": fr._num(r.get("realized_sparsity")),
        "bits": int(bits) if bits is not None and bits == int(bits) else bits,
        "scope": r.get("scope"),
        "method": label,
        "dense": p["dense"],
        "pareto": p["pareto"],
        "pareto_bops": False,
        "pareto_latency": False,
        "statuses": ["ok"],
        "members": [],
    }


def _reference_numbers(groups: list[dict], summary: dict, ref: dict) -> dict:
    """The reference front's numbers (from the summary's ``reference/`` keys) and its best rows."""
    numbers = {
        "configs": len(groups),
        "points": len(groups),
        "points_ok": len(groups),
        "points_failed": 0,
        "dense_acc": summary.get("reference/dense_acc", ref["dense_acc"]),
        "best_ratio_within_1pt": summary.get("reference/best_ratio_within_1pt"),
        "best_within_1pt/config": None,
        "best_ratio_within_2pt": summary.get("reference/best_ratio_within_2pt"),
        "best_within_2pt/config": None,
        "hypervolume_relative": summary.get(
            "reference/hypervolume_relative", summary.get("reference/hypervolume")
        ),
        "hypervolume_absolute": summary.get("reference/hypervolume_absolute"),
    }
    dense = numbers["dense_acc"]
    for k in (1, 2):  # which row gives the best ratio (frontier.py reports only the number)
        best = numbers[f"best_ratio_within_{k}pt"]
        cands = [g for g in groups if dense is not None and g["acc"] >= dense - k / 100 - 1e-12]
        if best is not None and cands:
            numbers[f"best_within_{k}pt/config"] = max(cands, key=lambda g: (g["ratio"], g["acc"]))["label"]
    return numbers


def build_view(out_dir, summary: dict | None = None, reference=None, title: str | None = None) -> dict:
    """Everything the page draws, from ``out_dir/frontier.csv``, the summary and the reference CSV."""
    out = Path(out_dir)
    header, raw = read_csv(out / "frontier.csv")
    if summary is None:
        js = out / "frontier.json"
        summary = json.loads(js.read_text()) if js.exists() else {}
    rows = [{k: typed(v) for k, v in zip(header, r)} for r in raw]
    status_at = header.index("status") if "status" in header else len(header)
    axes = header[2:status_at]
    hv_window = summary.get("hv_window", fr.HV_WINDOW)
    ref_acc = summary.get("hv_reference_acc")
    select, include = summary.get("select", fr.SELECT), bool(summary.get("include_failed_deploy", False))
    labels = _front_labels(rows)
    # a dense row is the baseline of every front with an ok point of the same baseline (the merged
    # CSV has one dense row per distinct baseline, named after the first point that trained it)
    base_axes = [a for a in axes if a == "seed" or a.split(".")[0] in fr.BASELINE_KEYS]
    fronts = []
    for fi, name in enumerate(_front_order(labels, rows)):
        idx = _front_rows(name, labels, rows, base_axes, select)
        numbers = _numbers(rows, idx, axes, hv_window, ref_acc, select, include)
        fronts.append(
            {
                "name": name,
                "kind": "sweep",
                "color": FRONT_COLORS[fi % len(FRONT_COLORS)],
                "dense_acc": numbers["dense_acc"],
                "groups": _group_points(rows, idx, axes, select, include),
                "points": _front_points(rows, idx),
                "numbers": numbers,
            }
        )
    if reference:
        fronts.append(_reference_front(reference, summary, 0))
    table = _numbers_table(fronts, summary)
    failed, details = _failed_and_details(rows)
    scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return _clean(
        {
            "title": title
            or "qpexp frontier: " + ", ".join(f["name"] for f in fronts if f["kind"] == "sweep"),
            "axes": axes,
            "summary": scalars,
            "hv_window": hv_window,
            "hv_reference_acc": ref_acc,
            "fronts": fronts,
            "table": table,
            "failed": failed,
            "details": details,
            "bit_colors": {str(k): v for k, v in BIT_COLORS.items()},
        }
    )


def _failed_and_details(rows: list[dict]) -> tuple[list[dict], dict]:
    """The failed or missing run rows, and each ok run row's per-layer detail by row index."""
    failed = [
        {"row": i, "run_dir": r.get("run_dir"), "status": r.get("status"), "error": r.get("error")}
        for i, r in enumerate(rows)
        if r.get("point") == "run" and r.get("status") not in ("ok", "not_deployed")
    ]
    details = {
        str(i): {"run_dir": r.get("run_dir"), "seed": r.get("seed"), **_layer_detail(r)}
        for i, r in enumerate(rows)
        if fr._ok(r) and r.get("point") == "run"
    }
    return failed, details


def _front_order(labels: list[str], rows: list[dict]) -> list[str]:
    """The fronts' names in the order their first run row appears; a label with only dense rows
    (a sweep whose every point failed: no baseline row then) after them unless a front covers it."""
    order: list[str] = []
    for lab, r in zip(labels, rows):
        if r.get("point") == "run" and lab not in order:
            order.append(lab)
    for lab in labels:
        if lab not in order and not any(o.split(" · ")[0] == lab for o in order):
            order.append(lab)
    return order


def _base_id(r: dict, base_axes: list[str]) -> tuple:
    return tuple(json.dumps(r.get(a), default=str) for a in base_axes)


def _front_rows(name: str, labels, rows, base_axes: list[str], select: str) -> list[int]:
    """The rows of front ``name``: its run rows and the dense rows of the baselines its ok points
    share (the sweep's own dense rows when none is ok)."""
    sweep = name.split(" · ")[0]
    own = {_base_id(r, base_axes) for lab, r in zip(labels, rows) if lab == name and fr._ok(r, select)}
    return [
        i
        for i, (lab, r) in enumerate(zip(labels, rows))
        if (lab == name and r.get("point") == "run")
        or (r.get("point") == "dense" and (_base_id(r, base_axes) in own or (not own and lab == sweep)))
    ]


def _front_points(rows: list[dict], idx: list[int]) -> list[dict]:
    """The ok rows among ``idx`` as the page's single points (one per seed)."""
    return [
        {
            "row": i,
            "run_dir": rows[i].get("run_dir"),
            "seed": rows[i].get("seed"),
            "acc": fr._num(rows[i].get(fr.ACC)),
            "ratio": fr._num(rows[i].get(fr.RATIO)),
            "bops": fr._num(rows[i].get(fr.BOPS)),
            "latency_ms": fr._num(rows[i].get(LATENCY)),
            "status": rows[i].get("status"),
        }
        for i in idx
        if fr._ok(rows[i])
    ]


def _numbers_table(fronts: list[dict], summary: dict) -> list[dict]:
    """One row of numbers per front, and the merged set (as frontier.json has it) when several sweeps."""
    table = [{"front": f["name"], "kind": f["kind"], **f["numbers"]} for f in fronts]
    n_sweeps = sum(f["kind"] == "sweep" for f in fronts)
    if n_sweeps > 1 and "points" in summary:
        table.append(
            {
                "front": "all sweeps merged (frontier.json)",
                "kind": "merged",
                "configs": summary.get("configs"),
                "points": summary.get("points"),
                "points_ok": summary.get("points_ok"),
                "points_failed": summary.get("points_failed"),
                "dense_acc": summary.get("dense_acc"),
                "best_ratio_within_1pt": summary.get("best_ratio_within_1pt"),
                "best_ratio_within_1pt_test_acc": summary.get("best_ratio_within_1pt_test_acc"),
                "best_within_1pt/config": summary.get("best_within_1pt/config"),
                "best_ratio_within_2pt": summary.get("best_ratio_within_2pt"),
                "best_ratio_within_2pt_test_acc": summary.get("best_ratio_within_2pt_test_acc"),
                "best_within_2pt/config": summary.get("best_within_2pt/config"),
                "hypervolume_relative": summary.get("hypervolume_relative", summary.get("hypervolume")),
                "hypervolume_absolute": summary.get("hypervolume_absolute"),
            }
        )
    return table


# -- the page --------------------------------------------------------------------------------------
def _script_json(obj) -> str:
    """JSON safe inside a <script> element: no ``<`` at all (no ``</script>``, no ``<!--``, which
    would change how the HTML parser ends the element), no ``>``/``&``, no line separators; every
    escape is a JSON string escape, so ``JSON.parse`` gives the same values."""
    text = json.dumps(obj, allow_nan=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(ch, esc)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def render(view: dict, header: list[str], raw: list[list[str]]) -> str:
    from plotly import __version__ as plotly_version
    from plotly.offline import get_plotlyjs

    csv_json = _script_json({"columns": header, "rows": raw})
    return (
        PAGE.replace("%%TITLE%%", html.escape(view["title"]))
        .replace("%%PLOTLY_VERSION%%", html.escape(plotly_version))
        .replace("%%STYLE%%", STYLE)
        .replace("%%APP%%", APP)
        .replace("%%CSV%%", csv_json)
        .replace("%%VIEW%%", _script_json(view))
        .replace("%%PLOTLYJS%%", get_plotlyjs())
    )


def write_dashboard(out_dir, summary: dict | None = None, reference=None, title: str | None = None) -> dict:
    """Write ``out_dir/frontier.html`` (beside ``frontier.csv``); returns the view it draws."""
    out = Path(out_dir)
    header, raw = read_csv(out / "frontier.csv")
    view = build_view(out, summary, reference, title)
    path = out / "frontier.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render(view, header, raw), encoding="utf-8")
    os.replace(tmp, path)
    return view


def write_html(out_dir, summary: dict, reference=None, title: str | None = None) -> dict | None:
    """The hook :func:`qpexp.frontier.write_frontier` calls: ``frontier.html`` beside the CSV, its path
    in ``summary["files"]["html"]``; a failure is a warning (the CSV and JSON are the record)."""
    try:
        view = write_dashboard(out_dir, summary, reference, title)
    except Exception as e:
        import warnings

        warnings.warn(f"frontier.html not written: {type(e).__name__}: {e}", QpexpWarning, stacklevel=2)
        return None
    summary.setdefault("files", {})["html"] = str(Path(out_dir) / "frontier.html")
    return view


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m qpexp.dashboard",
        description="(Re)build frontier.html from a folder's frontier.csv and frontier.json.",
    )
    p.add_argument("dir", help="a folder holding frontier.csv (written by qpexp-frontier)")
    p.add_argument("--reference", help="the reference CSV front drawn beside")
    a = p.parse_args(argv)
    if not (Path(a.dir) / "frontier.csv").is_file():
        p.error(f"{a.dir}: no frontier.csv")
    write_dashboard(a.dir, reference=a.reference)
    print(Path(a.dir) / "frontier.html")
    return 0


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{padding:14px 22px 6px;background:#fff;border-bottom:1px solid #ddd}
h1{font-size:19px;margin:0 0 4px}h2{font-size:15px;margin:18px 0 6px}
.sub{color:#555;font-size:13px}
main{padding:6px 22px 30px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 10px;margin-top:12px}
.row{display:flex;gap:12px;flex-wrap:wrap}.row>.card{flex:1 1 520px;min-width:420px}
.plot{width:100%;height:560px}.plot.small{height:380px}
.controls{font-size:13px;margin:8px 0 0}.controls select{margin-left:4px}
table{border-collapse:collapse;font-size:13px;width:100%}
th,td{border-bottom:1px solid #e3e3e3;padding:4px 8px;text-align:left;vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
th.sortable{cursor:pointer;user-select:none}
.scroll{overflow-x:auto}
th.sortable:after{content:" \\2195";color:#aaa}
th[aria-sort=ascending]:after{content:" \\2191";color:#333}
th[aria-sort=descending]:after{content:" \\2193";color:#333}
.status{font-weight:600}.status.failed,.status.missing{color:#b00}
.status.deploy_mismatch,.status.deploy_error{color:#b60}
.err{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;color:#444}
.note{color:#666;font-size:12px}.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px}
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%%TITLE%%</title>
<meta name="generator" content="qpexp.dashboard (plotly.js %%PLOTLY_VERSION%% inline)">
<style>%%STYLE%%</style>
<script>%%PLOTLYJS%%</script>
</head><body>
<header><h1 id="title">%%TITLE%%</h1><div class="sub" id="subtitle"></div>
<div class="controls">colour points by <select id="colour-by"><option value="front">front</option>
<option value="bits">weight bits</option></select>
<span class="note">&nbsp;click a legend entry to hide a trace, double-click to isolate it;
click a point for its layers</span></div></header>
<main>
<div class="card"><div id="plot-ratio" class="plot"></div></div>
<div class="row">
<div class="card"><div id="plot-bops" class="plot small"></div></div>
<div class="card"><div id="plot-latency" class="plot small"></div></div>
</div>
<div class="card" id="detail"><h2 id="detail-title">click a point to see its layers</h2>
<div class="sub" id="detail-sub"></div>
<div class="row"><div style="flex:1 1 520px"><div id="detail-layers" class="plot small"></div></div>
<div style="flex:1 1 520px"><div id="detail-size" class="plot small"></div></div></div></div>
<div class="card"><h2>Fronts</h2><div class="note" id="table-note"></div>
<div class="scroll"><table id="fronts"><thead></thead><tbody></tbody></table></div></div>
<div class="card"><h2 id="failed-title">Points not ok</h2>
<table id="failed"><thead><tr><th>run</th><th>status</th><th>error</th></tr></thead><tbody></tbody></table></div>
</main>
<script type="application/json" id="frontier-csv">%%CSV%%</script>
<script type="application/json" id="frontier-view">%%VIEW%%</script>
<script>%%APP%%</script>
</body></html>
"""

APP = r"""
"use strict";
const VIEW = JSON.parse(document.getElementById("frontier-view").textContent);
const CSV = JSON.parse(document.getElementById("frontier-csv").textContent);
const SYMBOLS = {global: "circle", layer: "square", none: "star", null: "diamond"};
const PLOT_CONFIG = {responsive: true, displaylogo: false, modeBarButtonsToRemove: ["select2d", "lasso2d",
  "zoomIn2d", "zoomOut2d", "toggleSpikelines", "hoverClosestCartesian", "hoverCompareCartesian"]};
let colourBy = "front";

function fmt(v, d) { return (v === null || v === undefined) ? "" : Number(v).toFixed(d); }
function pct(v, d) { return (v === null || v === undefined) ? "" : (100 * v).toFixed(d === undefined ? 2 : d); }
function esc(s) {
  return String(s === null || s === undefined ? "" : s).replace(/[&<>"]/g,
    c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]);
}
function bitColour(b) { return VIEW.bit_colors[String(b)] || "#7f7f7f"; }
function symbol(g) {
  if (g.dense) return "star";
  const s = SYMBOLS[g.scope];
  return s || (g.method !== undefined ? "x" : "triangle-up");
}
function hoverText(front, g) {
  const lines = [`<b>${esc(g.label)}</b>`, `front: ${esc(front.name)}`];
  for (const [k, v] of Object.entries(g.axes || {})) lines.push(`${esc(k)} = ${esc(v)}`);
  let acc = `test acc ${pct(g.acc)}%`;
  if (g.n > 1) acc += ` ± ${pct(g.acc_std)} (n=${g.n}, seeds ${esc(g.seeds.join(", "))})`;
  lines.push(acc);
  lines.push(`ratio ${fmt(g.ratio, 2)}x`);
  if (g.size_bits !== null && g.size_bits !== undefined)
    lines.push(`size ${Math.round(g.size_bits).toLocaleString("en-US")} bits`);
  if (g.bops) lines.push(`BOPs ${Number(g.bops).toExponential(3)}`);
  if (g.latency_ms) lines.push(`latency ${fmt(g.latency_ms, 3)} ms`);
  lines.push(`status ${esc(g.statuses.join(", "))}` + (g.pareto ? " · Pareto" : ""));
  return lines.join("<br>");
}

// x of a group on one of the three plots
const XS = {
  ratio: {key: "ratio", title: "compression ratio (dense fp32 bits / compressed bits, log)", flag: "pareto",
          shape: "vh", higher: true},
  bops: {key: "bops", title: "BOPs per sample (MACs x weight bits x activation bits, log)", flag: "pareto_bops",
         shape: "hv", higher: false},
  latency: {key: "latency_ms", title: "onnxruntime latency (ms per batch, log)", flag: "pareto_latency",
            shape: "hv", higher: false},
};

function traces(kind) {
  const X = XS[kind];
  const out = [];
  let lo = Infinity, hi = -Infinity;
  const fronts = VIEW.fronts.filter(f => kind === "ratio" || f.kind === "sweep");
  fronts.forEach(f => f.groups.forEach(g => {
    const x = g[X.key];
    if (x) { lo = Math.min(lo, x); hi = Math.max(hi, x); }
    if (kind === "latency" && g.fp32_latency_ms) {
      lo = Math.min(lo, g.fp32_latency_ms); hi = Math.max(hi, g.fp32_latency_ms);
    }
  }));
  if (!isFinite(lo)) return {data: [], lo: 1, hi: 2};
  fronts.forEach((f, fi) => {
    // one trace per method of a reference, one per front otherwise
    const parts = {};
    f.groups.forEach((g, gi) => {
      if (!g[X.key]) return;
      const key = f.kind === "reference" ? (g.method || "reference") : "";
      (parts[key] = parts[key] || []).push(gi);
    });
    Object.entries(parts).forEach(([method, gis], pi) => {
      const gs = gis.map(i => f.groups[i]);
      const colour = f.kind === "reference" && pi > 0 ? REF_SHADES[pi % REF_SHADES.length] : f.color;
      out.push({
        type: "scatter", mode: "markers", x: gs.map(g => g[X.key]), y: gs.map(g => 100 * g.acc),
        name: f.kind === "reference" ? `${f.name} · ${method}` : `${f.name} (config means)`,
        legendgroup: f.name, legendgrouptitle: {text: f.name},
        error_y: {type: "data", array: gs.map(g => 100 * (g.acc_std || 0)), visible: gs.some(g => g.n > 1),
                  thickness: 1.2, width: 3},
        marker: {size: gs.map(g => g.dense ? 14 : 9), symbol: gs.map(symbol),
                 color: gs.map(g => colourBy === "bits" ? bitColour(g.bits) : colour),
                 line: {width: 1, color: colour}},
        text: gs.map(g => hoverText(f, g)), hovertemplate: "%{text}<extra></extra>",
        customdata: gis.map(gi => [VIEW.fronts.indexOf(f), gi]),
        meta: {role: "means", front: VIEW.fronts.indexOf(f), baseColour: colour},
      });
    });
    // single seeds behind the means, where a config has several
    if (f.points.length && f.groups.some(g => g.n > 1)) {
      const ps = f.points.filter(p => p[X.key]);
      out.push({
        type: "scatter", mode: "markers", x: ps.map(p => p[X.key]), y: ps.map(p => 100 * p.acc),
        name: `${f.name} (single seeds)`, legendgroup: f.name,
        marker: {size: 5, color: f.color, opacity: 0.35}, hoverinfo: "text",
        text: ps.map(p => `${esc(p.run_dir)}<br>seed ${esc(p.seed)}: ${pct(p.acc)}%`),
        meta: {role: "seeds", front: VIEW.fronts.indexOf(f)},
      });
    }
    // the Pareto front of the config means as a step line
    const front = f.groups.filter(g => g[X.flag] && g[X.key]).sort((a, b) => a[X.key] - b[X.key]);
    if (front.length) {
      out.push({
        type: "scatter", mode: "lines", x: front.map(g => g[X.key]), y: front.map(g => 100 * g.acc),
        line: {shape: X.shape, color: f.color, width: 2, dash: f.kind === "reference" ? "dash" : "solid"},
        name: `${f.name} Pareto front`, legendgroup: f.name, hoverinfo: "skip",
        meta: {role: "front", front: VIEW.fronts.indexOf(f)},
      });
    }
  });
  const x0 = lo / 1.15, x1 = hi * 1.15;
  // dense reference lines (and 1 and 2 points below the first front's)
  fronts.forEach((f, fi) => {
    if (f.dense_acc === null || f.dense_acc === undefined) return;
    out.push({
      type: "scatter", mode: "lines", x: [x0, x1], y: [100 * f.dense_acc, 100 * f.dense_acc],
      line: {color: f.color, dash: "dash", width: 1.2}, name: `${f.name} dense ${pct(f.dense_acc)}%`,
      legendgroup: f.name, hovertemplate: `${esc(f.name)} dense fp32: ${pct(f.dense_acc)}%<extra></extra>`,
      meta: {role: "dense", front: VIEW.fronts.indexOf(f)},
    });
    if (fi === 0 && kind === "ratio") {
      [1, 2].forEach(k => out.push({
        type: "scatter", mode: "lines", x: [x0, x1], y: [100 * f.dense_acc - k, 100 * f.dense_acc - k],
        line: {color: f.color, dash: "dot", width: 0.8}, name: `${k} pt below dense`,
        legendgroup: f.name, showlegend: false, hovertemplate: `${k} point below dense<extra></extra>`,
        meta: {role: "within", front: VIEW.fronts.indexOf(f)},
      }));
    }
  });
  if (kind === "latency") {  // the fp32 ONNX model, measured beside every point
    VIEW.fronts.filter(f => f.kind === "sweep").forEach(f => {
      const fp = f.groups.map(g => g.fp32_latency_ms).filter(v => v);
      if (!fp.length || f.dense_acc === null) return;
      const m = fp.reduce((a, b) => a + b, 0) / fp.length;
      out.push({
        type: "scatter", mode: "markers", x: [m], y: [100 * f.dense_acc], name: `${f.name} fp32 ONNX`,
        legendgroup: f.name, marker: {symbol: "star", size: 14, color: f.color},
        hovertemplate: `fp32 ONNX model: ${fmt(m, 3)} ms (mean over the points' measurements)<extra></extra>`,
        meta: {role: "fp32", front: VIEW.fronts.indexOf(f)},
      });
    });
  }
  return {data: out, lo: x0, hi: x1};
}
const REF_SHADES = ["#7f7f7f", "#a6761d", "#666666", "#b3a05b", "#8da0cb", "#bdbdbd", "#c49c94", "#9c9ede",
                    "#e7ba52", "#637939"];

function yRange(kind) {
  const ys = [];
  VIEW.fronts.forEach(f => {
    if (f.dense_acc !== null && f.dense_acc !== undefined) ys.push(100 * f.dense_acc);
    f.groups.forEach(g => { if (g[XS[kind].key]) ys.push(100 * g.acc); });
  });
  if (!ys.length) return undefined;
  const top = Math.max(...ys), dense = VIEW.fronts[0] && VIEW.fronts[0].dense_acc;
  // the interesting region: down to 12 points under dense (lower points stay reachable by zooming out)
  const floor = dense ? 100 * dense - 12 : Math.min(...ys);
  return [Math.max(Math.min(...ys, floor), floor) - 1, Math.min(top + 1.5, 100.5)];
}

function draw(kind, el, height) {
  const t = traces(kind);
  const div = document.getElementById(el);
  if (!t.data.length) {
    const why = {ratio: "point with an accuracy yet (every point failed or is missing)",
                 bops: "BOPs (final/bops) in these records",
                 latency: "measured latency (deploy/onnx_latency_ms) in these records: export was off"};
    div.innerHTML = `<div class="note" style="padding:20px">no ${why[kind]}</div>`;
    div.style.height = "auto";
    return false;
  }
  const zoom = yRange(kind);
  const layout = {
    title: {text: kind === "ratio" ? "test accuracy vs compression ratio" :
            kind === "bops" ? "test accuracy vs BOPs" : "test accuracy vs measured latency", font: {size: 14}},
    xaxis: {type: "log", title: {text: XS[kind].title}},
    yaxis: {title: {text: "test accuracy (%)"}, range: zoom},
    legend: {groupclick: "toggleitem", font: {size: 11}},
    margin: {l: 60, r: 10, t: 40, b: 50}, hovermode: "closest",
    updatemenus: [{type: "buttons", direction: "right", x: 0, xanchor: "left", y: 1.0, yanchor: "bottom",
                   pad: {t: 0, b: 2}, font: {size: 11}, showactive: true, active: 0, buttons: [
      {label: "near dense", method: "relayout", args: [{"yaxis.range": zoom, "yaxis.autorange": false}]},
      {label: "all points", method: "relayout", args: [{"yaxis.autorange": true}]}]}],
  };
  if (kind === "ratio") {  // ticks at doublings of compression
    const ticks = [];
    for (let v = 1; v <= t.hi * 1.01; v *= 2) if (v >= t.lo * 0.99) ticks.push(v);
    if (ticks.length >= 2) Object.assign(layout.xaxis, {tickvals: ticks, ticktext: ticks.map(v => v + "x")});
  }
  Plotly.newPlot(div, t.data, layout, PLOT_CONFIG);
  div.on("plotly_click", ev => {
    const p = ev.points && ev.points[0];
    if (p && p.customdata) showDetail(p.customdata[0], p.customdata[1]);
  });
  return true;
}

function recolour() {
  ["plot-ratio", "plot-bops", "plot-latency"].forEach(id => {
    const div = document.getElementById(id);
    if (!div.data) return;
    div.data.forEach((tr, i) => {
      if (!tr.meta || tr.meta.role !== "means") return;
      const f = VIEW.fronts[tr.meta.front];
      const colours = tr.customdata.map(([fi, gi]) =>
        colourBy === "bits" ? bitColour(VIEW.fronts[fi].groups[gi].bits) : tr.meta.baseColour);
      Plotly.restyle(div, {"marker.color": [colours]}, [i]);
    });
  });
}

function showDetail(fi, gi) {
  const f = VIEW.fronts[fi], g = f.groups[gi];
  const members = g.members.map(r => VIEW.details[String(r)]).filter(d => d);
  document.getElementById("detail-title").textContent = `${g.label} (${f.name})`;
  let sub = `test acc ${pct(g.acc)}%` + (g.n > 1 ? ` ± ${pct(g.acc_std)} (n=${g.n})` : "") +
    `, ratio ${fmt(g.ratio, 2)}x` + (g.size_bits ? `, ${Math.round(g.size_bits).toLocaleString("en-US")} bits` : "") +
    `, status ${g.statuses.join(", ")}`;
  const layersDiv = document.getElementById("detail-layers"), sizeDiv = document.getElementById("detail-size");
  if (!members.length || !members[0].layers.length) {
    sub += g.dense ? ": the dense fp32 model (every layer 32-bit, nothing pruned)" :
      ": no per-layer record for this point";
    document.getElementById("detail-sub").textContent = sub;
    Plotly.purge(layersDiv); Plotly.purge(sizeDiv);
    layersDiv.innerHTML = ""; sizeDiv.innerHTML = "";
    return;
  }
  document.getElementById("detail-sub").textContent = sub + ` · ${members.map(m => m.run_dir).join(", ")}`;
  const names = members[0].layers.map(l => l.name);
  const lt = [];
  members.forEach((m, k) => {
    lt.push({type: "bar", x: m.layers.map(l => l.name), y: m.layers.map(l => l.sparsity),
             name: `sparsity${members.length > 1 ? " seed " + m.seed : ""}`, marker: {color: f.color},
             opacity: members.length > 1 ? 0.5 + 0.5 / (k + 1) : 0.85,
             hovertemplate: "%{x}: %{y:.3f} pruned<extra></extra>"});
  });
  lt.push({type: "scatter", mode: "markers+text", x: members[0].layers.map(l => l.name),
           y: members[0].layers.map(l => l.bits_w), yaxis: "y2", name: "weight bits",
           text: members[0].layers.map(l => `${l.bits_w}b`), textposition: "top center",
           marker: {symbol: "diamond", size: 11, color: "#333"},
           hovertemplate: "%{x}: %{y} bits<extra></extra>"});
  Plotly.newPlot(layersDiv, lt, {
    title: {text: "per-layer sparsity and weight bits", font: {size: 13}}, barmode: "group",
    yaxis: {title: {text: "pruned fraction"}, range: [0, 1.05]},
    yaxis2: {title: {text: "weight bits"}, overlaying: "y", side: "right", range: [0, 34],
             showgrid: false},
    legend: {orientation: "h", y: -0.2}, margin: {l: 55, r: 55, t: 36, b: 40},
  }, PLOT_CONFIG);
  const m = members[0];
  const cats = m.layers.map(l => `${l.name} (${l.format || "?"})`).concat(["other float tensors"]);
  const part = (key, label, colour) => ({
    type: "bar", x: cats, y: m.layers.map(l => l[key] || 0).concat([0]), name: label,
    marker: {color: colour}, hovertemplate: `%{x}: %{y:,} bits ${label}<extra></extra>`});
  const sizeData = [
    part("weight_bits", "weights (incl. index/mask format)", f.color),
    part("qparam_bits", "scales and zero points", "#ff7f0e"),
    part("bias_bits", "float biases", "#7f7f7f"),
    {type: "bar", x: cats, y: m.layers.map(() => 0).concat([m.other_bits || 0]), name: "other float tensors",
     marker: {color: "#bcbd22"}, hovertemplate: "%{x}: %{y:,} bits<extra></extra>"},
  ];
  Plotly.newPlot(sizeDiv, sizeData, {
    title: {text: `where the bits go${members.length > 1 ? " (seed " + m.seed + ")" : ""}`, font: {size: 13}},
    barmode: "stack", yaxis: {title: {text: "bits"}}, legend: {orientation: "h", y: -0.25},
    margin: {l: 60, r: 10, t: 36, b: 40},
  }, PLOT_CONFIG);
  window.qpexpDetail = {front: fi, group: gi, layers: names, members: members.map(x => x.run_dir)};
}

const COLUMNS = [
  ["front", "front", false], ["configs", "configs", true], ["points_failed", "failed or missing", true],
  ["dense_acc", "dense acc %", true, v => pct(v)],
  ["best_ratio_within_1pt", "best ratio within 1 pt", true, v => v === null ? "" : fmt(v, 2) + "x"],
  ["best_ratio_within_1pt_test_acc", "its test acc % (1 pt)", true, v => v === null ? "" : pct(v)],
  ["best_within_1pt/config", "config (1 pt)", false],
  ["best_ratio_within_2pt", "best ratio within 2 pt", true, v => v === null ? "" : fmt(v, 2) + "x"],
  ["best_ratio_within_2pt_test_acc", "its test acc % (2 pt)", true, v => v === null ? "" : pct(v)],
  ["best_within_2pt/config", "config (2 pt)", false],
  ["hypervolume_relative", "hypervolume (own dense − window)", true, v => fmt(v, 2)],
  ["hypervolume_absolute", "hypervolume (shared point)", true, v => fmt(v, 2)],
];

function buildTable() {
  const t = document.getElementById("fronts");
  t.tHead.innerHTML = "<tr>" + COLUMNS.map(([k, label, num], i) =>
    `<th class="sortable${num ? " num" : ""}" data-col="${i}" aria-sort="none">${esc(label)}</th>`).join("") + "</tr>";
  const fill = rows => {
    t.tBodies[0].innerHTML = rows.map(r => "<tr>" + COLUMNS.map(([k, label, num, f]) => {
      const v = r[k] === undefined ? null : r[k];
      const text = f ? f(v) : esc(v);
      const sw = k === "front" ? `<span class="swatch" style="background:${frontColour(r.front)}"></span>` : "";
      return `<td class="${num ? "num" : ""}" data-value="${v === null ? "" : esc(v)}">${sw}${text}</td>`;
    }).join("") + "</tr>").join("");
  };
  let rows = VIEW.table.slice();
  fill(rows);
  t.tHead.querySelectorAll("th").forEach(th => th.addEventListener("click", () => {
    const i = +th.dataset.col, [key, , num] = COLUMNS[i];
    const dir = th.getAttribute("aria-sort") === "descending" ? "ascending" : "descending";
    t.tHead.querySelectorAll("th").forEach(o => o.setAttribute("aria-sort", "none"));
    th.setAttribute("aria-sort", dir);
    const s = dir === "ascending" ? 1 : -1;
    rows.sort((a, b) => {
      const x = a[key], y = b[key];
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return num ? s * (x - y) : s * String(x).localeCompare(String(y));
    });
    fill(rows);
  }));
  const ref = VIEW.hv_reference_acc;
  document.getElementById("table-note").textContent =
    `Best ratio: the highest seed-mean ratio within 1 / 2 points of the front's own dense accuracy. ` +
    `Hypervolume: area in (log2 ratio, accuracy points) dominated by the config means, above ratio 1 and ` +
    `the front's own dense accuracy − ${pct(VIEW.hv_window, 0)} points (relative), or above ONE shared ` +
    `point for every front (absolute: ratio 1, ${ref === null ? "n/a" : pct(ref) + "%"}). Click a header to sort.`;
}
function frontColour(name) {
  const f = VIEW.fronts.find(x => x.name === name);
  return f ? f.color : "#fff";
}

function buildFailed() {
  const tb = document.querySelector("#failed tbody");
  document.getElementById("failed-title").textContent =
    `Points not ok (${VIEW.failed.length}: failed, missing, or a deployment that does not match)`;
  tb.innerHTML = VIEW.failed.length ? VIEW.failed.map(f =>
    `<tr data-run-dir="${esc(f.run_dir)}"><td>${esc(f.run_dir)}</td>` +
    `<td class="status ${esc(f.status)}">${esc(f.status)}</td><td class="err">${esc(f.error)}</td></tr>`).join("")
    : '<tr><td colspan="3" class="note">every point is ok</td></tr>';
}

function subtitle() {
  const s = VIEW.summary;
  const parts = [`${s.points ?? "?"} points, ${s.points_ok ?? "?"} ok, ${s.points_failed ?? 0} failed or missing`];
  if (s.points_deploy_mismatch) parts.push(`${s.points_deploy_mismatch} deploy mismatch`);
  if (s.points_deploy_error) parts.push(`${s.points_deploy_error} deploy error`);
  if (s.points_not_deployed) parts.push(`${s.points_not_deployed} not deployed`);
  if (s.dense_acc !== undefined) parts.push(`dense ${pct(s.dense_acc)}% (test)`);
  if (s.select) parts.push(`front chosen on ${s.select}, test accuracy shown`);
  parts.push(`${VIEW.fronts.length} front${VIEW.fronts.length > 1 ? "s" : ""}`);
  parts.push(`${CSV.rows.length} rows in frontier.csv`);
  document.getElementById("subtitle").textContent = parts.join(" · ");
}

// what the page shows, for tests and for a reader's console
window.qpexpReport = function () {
  const plots = {};
  ["plot-ratio", "plot-bops", "plot-latency"].forEach(id => {
    const div = document.getElementById(id);
    const rows = new Set(), groups = [];
    (div.data || []).forEach(tr => {
      if (!tr.meta || tr.meta.role !== "means") return;
      tr.customdata.forEach(([fi, gi], k) => {
        const g = VIEW.fronts[fi].groups[gi];
        g.members.forEach(r => rows.add(r));
        groups.push({front: VIEW.fronts[fi].name, label: g.label, x: tr.x[k], y: tr.y[k], members: g.members});
      });
    });
    plots[id] = {traces: (div.data || []).length, names: (div.data || []).map(t => t.name),
                 rows: Array.from(rows).sort((a, b) => a - b), groups: groups};
  });
  return {
    plots: plots,
    failed: Array.from(document.querySelectorAll("#failed tbody tr[data-run-dir]")).map(tr => tr.dataset.runDir),
    table: Array.from(document.querySelectorAll("#fronts tbody tr")).map(tr =>
      Array.from(tr.cells).map(td => td.dataset.value)),
    csvRows: CSV.rows.length,
    detail: window.qpexpDetail || null,
  };
};
window.qpexpShowDetail = showDetail;

subtitle();
draw("ratio", "plot-ratio");
draw("bops", "plot-bops");
draw("latency", "plot-latency");
buildTable();
buildFailed();
document.getElementById("colour-by").addEventListener("change", ev => { colourBy = ev.target.value; recolour(); });
// start with the detail of the first front's best point within 1 point of dense (else its first Pareto point)
(function () {
  const f0 = VIEW.fronts.findIndex(f => f.kind === "sweep");
  if (f0 < 0) return;
  const f = VIEW.fronts[f0];
  let gi = f.groups.findIndex(g => g.label === f.numbers["best_within_1pt/config"] && !g.dense);
  if (gi < 0) gi = f.groups.findIndex(g => g.label === f.numbers["best_within_2pt/config"] && !g.dense);
  if (gi < 0) gi = f.groups.findIndex(g => g.pareto && !g.dense);
  if (gi < 0) gi = f.groups.findIndex(g => !g.dense);
  if (gi >= 0) showDetail(f0, gi);
})();
window.qpexpReady = true;
"""


if __name__ == "__main__":
    sys.exit(cli())
