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
the numbers drawn are computed here, in Python, with :mod:`qpexp.frontier`'s own functions. The
page's template, style sheet and script are package data: ``qpexp/sweep/assets/frontier.html``,
``frontier.css`` and ``frontier.js``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import html
import json
import math
import os
import re
import sys
from collections import OrderedDict
from importlib import resources
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
    fronts = _sweep_fronts(rows, axes, summary)
    if reference:
        fronts.append(_reference_front(reference, summary, 0))
    return _clean(_view(fronts, rows, axes, summary, title))


def _sweep_fronts(rows: list[dict], axes: list[str], summary: dict) -> list[dict]:
    """One front per sweep folder (or sweep and ``config.name``): its groups, single points and numbers,
    chosen as the summary says (``select``, ``include_failed_deploy``, ``hv_window``)."""
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
    return fronts


def _view(fronts: list[dict], rows: list[dict], axes: list[str], summary: dict, title: str | None) -> dict:
    """The view of ``fronts`` (not yet JSON-cleaned): its title, the summary's scalars, the numbers
    table, the points not ok and every ok run row's per-layer detail."""
    table = _numbers_table(fronts, summary)
    failed, details = _failed_and_details(rows)
    scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {
        "title": title or "qpexp frontier: " + ", ".join(f["name"] for f in fronts if f["kind"] == "sweep"),
        "axes": axes,
        "summary": scalars,
        "hv_window": summary.get("hv_window", fr.HV_WINDOW),
        "hv_reference_acc": summary.get("hv_reference_acc"),
        "fronts": fronts,
        "table": table,
        "failed": failed,
        "details": details,
        "bit_colors": {str(k): v for k, v in BIT_COLORS.items()},
    }


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


# the page's template, style sheet and script: package data files (qpexp/sweep/assets), read as text and
# pasted into the page, never executed here; ``PAGE``, ``STYLE`` and ``APP`` (Python strings before)
# name them still
ASSETS = {"PAGE": "frontier.html", "STYLE": "frontier.css", "APP": "frontier.js"}


@functools.cache
def asset(name: str) -> str:
    """The text of ``qpexp/sweep/assets/<name>`` (UTF-8), read once."""
    return (resources.files("qpexp.sweep") / "assets" / name).read_text(encoding="utf-8")


def __getattr__(name: str) -> str:
    """``PAGE``, ``STYLE`` and ``APP``: the asset files' text (read on first use, not at import)."""
    if name in ASSETS:
        return asset(ASSETS[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def render(view: dict, header: list[str], raw: list[list[str]]) -> str:
    """The page: the template with its style sheet, script, plotly.js, ``view`` and the CSV's cells
    (``header`` and ``raw``) filled in."""
    from plotly import __version__ as plotly_version
    from plotly.offline import get_plotlyjs

    fill = {
        "TITLE": html.escape(view["title"]),
        "PLOTLY_VERSION": html.escape(plotly_version),
        "STYLE": asset(ASSETS["STYLE"]),
        "APP": asset(ASSETS["APP"]),
        "CSV": _script_json({"columns": header, "rows": raw}),
        "VIEW": _script_json(view),
        "PLOTLYJS": get_plotlyjs(),
    }
    # one pass over the template: a placeholder inside the data (a CSV cell, a title) stays as written
    return re.sub(r"%%([A-Z_]+)%%", lambda m: fill[m.group(1)], asset(ASSETS["PAGE"]))


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


if __name__ == "__main__":
    sys.exit(cli())
