"""The numbers of a frontier: Pareto flags, seed groups, hypervolumes, the summary, reference fronts.

Pure functions of the rows :func:`qpexp.sweep.frontier.collect` reads (standard library only);
:mod:`qpexp.sweep.frontier` writes the files, :mod:`qpexp.sweep.dashboard` draws them.
"""

from __future__ import annotations

import csv
import json
import math
from collections import OrderedDict
from pathlib import Path

from qpexp.run.status import ACCURACY_STANDS

# accuracy stands but the deployed model failed its check: drawn, but left out of the front, best-within
# and hypervolume unless ``include_failed_deploy``
DEPLOY_FAILED = ("deploy_mismatch", "deploy_error")
ACC, RATIO, BOPS = "final/test_acc", "final/compression_ratio", "final/bops"
VAL = "final/val_acc"
# the metric that SELECTS (Pareto flags, best ratio within N points, hypervolume); the test accuracy of
# what it selects is reported beside it, so the test split is read once, never to choose
SELECT = VAL
# frontier.size: which size the ratio axis uses (honest fixed-width count, or Huffman-coded weights)
SIZES = {"honest": "", "huffman": "_huffman"}  # suffix of final/compression_ratio and final/size_bits
AXES = ("quant.bits_w", "prune.ratio", "prune.scope", "seed")
# what determines the baseline (= the dense model); mirrors the stage cache key in qpexp.run.pipeline
BASELINE_KEYS = ("data", "model", "baseline", "trainer", "seed")
HV_WINDOW = 0.05


# -- Pareto, groups, summary ------------------------------------------------------------------------
def _num(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _ok(row: dict, select: str = ACC) -> bool:
    """A row whose accuracy stands and holds a test accuracy (and the selection metric's value)."""
    return (
        row.get("status") in ACCURACY_STANDS
        and _num(row.get(ACC)) is not None
        and _num(row.get(select)) is not None
    )


def eligible(row: dict, select: str = SELECT, include_failed_deploy: bool = False) -> bool:
    """May ``row`` be on the front (Pareto flags, best-within, hypervolume)? Deploy failures only if asked."""
    return _ok(row, select) and (include_failed_deploy or row.get("status") not in DEPLOY_FAILED)


def pareto_flags(points: list[tuple[float | None, float | None]], higher_better_x: bool = True) -> list[bool]:
    """``True`` for each (acc, x) that no other point dominates (``None`` entries: never Pareto).

    A point is dominated by another that is at least as good in both objectives and strictly better
    in one (higher acc; higher x, or lower x with ``higher_better_x=False``). Identical points count
    once: of a set of identical points only the first is flagged.
    """
    out = []
    for i, (a, x) in enumerate(points):
        if a is None or x is None:
            out.append(False)
            continue
        beaten = False
        for j, (b, y) in enumerate(points):
            if j == i or b is None or y is None:
                continue
            x_ge = y >= x if higher_better_x else y <= x
            if b >= a and x_ge and (b != a or y != x or j < i):  # dominates, or an earlier duplicate
                beaten = True
                break
        out.append(not beaten)
    return out


def group_key(row: dict, axes: list[str]) -> tuple:
    return tuple(json.dumps(row.get(a), default=str) for a in axes if a != "seed") + (row.get("point"),)


def groups(
    rows: list[dict],
    axes: list[str],
    select: str = SELECT,
    include_failed_deploy: bool = False,
    suffix: str = "",
) -> list[dict]:
    """Seed means of each config over its ok rows: ``acc`` (test) mean/std, ``sel`` (the selection
    metric) and ``val_acc`` means, ratio and bops means, seed count. ``pareto`` is decided on ``sel``
    among the eligible configs (a config with a failed deployment is not, unless asked). ``suffix``:
    ``_huffman`` takes the ratio and size of the Huffman-coded weights (frontier.size)."""
    buckets: dict[tuple, list[dict]] = OrderedDict()
    for r in rows:
        if _ok(r, select):
            buckets.setdefault(group_key(r, axes), []).append(r)
    out = []
    for key, rs in buckets.items():
        accs = [_num(r[ACC]) for r in rs]
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
        g = {a: rs[0].get(a) for a in axes if a != "seed"}
        g.update(
            key=key,
            point=rs[0].get("point"),
            n=len(rs),
            seeds=sorted({r.get("seed") for r in rs}, key=str),
            acc=mean,
            acc_std=std,
            sel=_mean([_num(r.get(select)) for r in rs]),
            val_acc=_mean([_num(r.get(VAL)) for r in rs]),
            ratio=_mean([_num(r.get(RATIO + suffix)) for r in rs]),
            bops=_mean([_num(r.get(BOPS)) for r in rs]),
            sparsity=_mean([_num(r.get("final/sparsity")) for r in rs]),
            size_bits=_mean([_num(r.get("final/size_bits" + suffix)) for r in rs]),
            eligible=all(eligible(r, select, include_failed_deploy) for r in rs),
            not_deployed=any(r.get("status") == "not_deployed" for r in rs),
            statuses=sorted({str(r.get("status")) for r in rs}),
            first_bits=rs[0].get("config.quant.first_bits"),
            last_bits=rs[0].get("config.quant.last_bits"),
        )
        out.append(g)
    flags = pareto_flags([(g["sel"], g["ratio"]) if g["eligible"] else (None, None) for g in out])
    for g, f in zip(out, flags):
        g["pareto"] = f
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def hypervolume(front: list[tuple[float, float]], dense_acc: float, window: float = HV_WINDOW) -> float:
    """The relative hypervolume: area dominated by ``front`` [(acc, ratio)] in (log2 ratio, acc
    points) above the front's own reference point (0, dense - window)."""
    return hypervolume_above(front, dense_acc - window)


def hypervolume_above(front: list[tuple[float, float]], ref_acc: float) -> float:
    """Area dominated by ``front`` [(acc, ratio)] in (log2 ratio, acc points) above the reference
    point (log2 ratio 0, i.e. ratio 1; ``100 * ref_acc`` points)."""
    y0 = 100 * ref_acc
    pts = sorted(
        ((math.log2(r), 100 * a) for a, r in front if r is not None and r > 1 and 100 * a > y0),
        key=lambda p: -p[0],
    )
    area, best_y = 0.0, y0
    # sweep from the largest x down: each strip [x_next, x] is covered up to the best acc seen so far
    for i, (x, y) in enumerate(pts):
        best_y = max(best_y, y)
        x_next = pts[i + 1][0] if i + 1 < len(pts) else 0.0
        area += (x - x_next) * (best_y - y0)
    return area


def best_within(gs: list[dict], dense_acc: float, points: float, key: str = "acc") -> dict | None:
    """The config of highest ratio whose ``key`` (``"sel"``: the selection metric) is at least
    ``dense_acc - points / 100`` (ineligible configs, e.g. failed deployments, left out)."""
    cands = [
        g
        for g in gs
        if g.get("eligible", True) and g["ratio"] is not None and g[key] >= dense_acc - points / 100 - 1e-12
    ]
    return max(cands, key=lambda g: (g["ratio"], g[key])) if cands else None


def summarize(rows: list[dict], gs: list[dict], hv_window: float = HV_WINDOW, select: str = SELECT) -> dict:
    """Counts, the dense reference (test, validation and selection metric) and the front's numbers,
    chosen on ``select`` and reported with the test accuracy of what was chosen."""
    dense_rows = [
        r for r in rows if _ok(r, select) and r.get("quant.bits_w") == 32 and not _num(r.get("prune.ratio"))
    ]
    runs = [r for r in rows if r["point"] == "run"]
    s: dict = {
        "select": select,
        "points": len(runs),
        "points_ok": sum(r["status"] == "ok" for r in runs),
        "points_failed": sum(r["status"] not in ACCURACY_STANDS for r in runs),
        "points_not_deployed": sum(r["status"] == "not_deployed" for r in runs),
        "points_deploy_mismatch": sum(r["status"] == "deploy_mismatch" for r in runs),
        "points_deploy_error": sum(r["status"] == "deploy_error" for r in runs),
        "configs": len(gs),
    }
    if dense_rows:
        s["dense_acc"] = _mean([_num(r[ACC]) for r in dense_rows])  # test: the plot's dense line
        s["dense_test_acc"] = s["dense_acc"]
        s["dense_val_acc"] = _mean([_num(r.get(VAL)) for r in dense_rows])
        s["dense_select_acc"] = _mean([_num(r[select]) for r in dense_rows])
        s["dense_n"] = len(dense_rows)
        s.update(_selected_numbers(gs, s, hv_window))
    s["pareto_points"] = sum(1 for g in gs if g["pareto"])
    return s


def _selected_numbers(gs: list[dict], s: dict, hv_window: float) -> dict:
    """Best ratio within 1 and 2 points and hypervolume, chosen on the selection metric (dense too),
    each with the test (and validation) accuracy of the chosen configs beside it."""
    front = [g for g in gs if g["pareto"]]
    hv = hypervolume([(g["sel"], g["ratio"]) for g in front], s["dense_select_acc"], hv_window)
    out = {"hypervolume": hv, "hypervolume_relative": hv, "hv_window": hv_window}
    # the same area for the SELECTED front at its test accuracies, against dense's test accuracy
    out["hypervolume_test"] = hypervolume([(g["acc"], g["ratio"]) for g in front], s["dense_acc"], hv_window)
    for pts in (1, 2):
        b = best_within(gs, s["dense_select_acc"], pts, key="sel")
        out[f"best_ratio_within_{pts}pt"] = b["ratio"] if b else None
        if b is not None:
            out[f"best_ratio_within_{pts}pt_test_acc"] = b["acc"]
            out[f"best_ratio_within_{pts}pt_val_acc"] = b["val_acc"]
            out[f"best_within_{pts}pt/config"] = _describe(b)
            out[f"best_within_{pts}pt/acc"] = b["acc"]
            out[f"best_within_{pts}pt/select_acc"] = b["sel"]
            out[f"best_within_{pts}pt/n"] = b["n"]
    return out


def _front_numbers(front: list[tuple[float, float]], dense_acc: float, hv_window: float) -> dict:
    """A reference front's numbers (one accuracy per point, e.g. a peer's test accuracy)."""
    hv = hypervolume(front, dense_acc, hv_window)
    out = {"hypervolume": hv, "hypervolume_relative": hv, "hv_window": hv_window}
    for pts in (1, 2):
        ok = [r for a, r in front if r is not None and a >= dense_acc - pts / 100 - 1e-12]
        out[f"best_ratio_within_{pts}pt"] = max(ok) if ok else None
    return out


def _absolute_hypervolume(gs, summary: dict, ref: dict | None, hv_window: float, ref_acc=None) -> dict:
    """Every front (this one, and ``--reference``) against ONE shared reference point: ratio 1 and
    ``ref_acc`` (default: the lowest dense accuracy among the fronts minus ``hv_window``)."""
    if ref_acc is None:
        dense = [d for d in (summary.get("dense_acc"), (ref or {}).get("dense_acc")) if d is not None]
        if not dense:
            return {}
        ref_acc = min(dense) - hv_window
    out = {
        "hv_reference_point": {"compression_ratio": 1.0, "test_acc": ref_acc},
        "hv_reference_acc": ref_acc,
        # the selected front (Pareto on the selection metric) at its test accuracies
        "hypervolume_absolute": hypervolume_above(
            [(g["acc"], g["ratio"]) for g in gs if g["pareto"]], ref_acc
        ),
    }
    if ref is not None:
        front = [(p["acc"], p["ratio"]) for p in ref["points"]]
        out["reference/hypervolume_absolute"] = hypervolume_above(front, ref_acc)
    return out


def _describe(g: dict) -> str:
    if g.get("point") == "dense":
        return "dense fp32"
    bits = g.get("quant.bits_w")
    parts = [f"w{_fmt(bits)}", f"{g.get('prune.scope')} {_fmt(g.get('prune.ratio'))}"]
    extra = [f"{k}={_fmt(v)}" for k, v in g.items() if "." in k and k not in AXES and v is not None]
    layers = [
        f"{where} layer {_fmt(b)}-bit"
        for where, b in (("first", g.get("first_bits")), ("last", g.get("last_bits")))
        if _num(b) is not None and _num(bits) is not None and _num(b) != _num(bits)
    ]
    return ", ".join([" ".join(parts + extra), *layers])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# -- reference fronts -------------------------------------------------------------------------------
def read_reference(path: str | Path) -> dict:
    """A front to draw beside: a CSV with ``test_acc`` and ``compression_ratio`` columns (optional
    ``acc_std``, ``n``, ``bits_w``, ``target_sparsity``, ``method``), or another ``frontier.csv``."""
    path = Path(path)
    with path.open(newline="") as f:
        raw = list(csv.DictReader(f))
    pts = []
    for r in raw:
        if r.get("point") is not None:  # a qpexp frontier.csv
            if r.get("status") not in ACCURACY_STANDS:
                continue
            acc, ratio, std, n = _num(r.get(ACC)), _num(r.get(RATIO)), 0.0, 1
            bits, sp = _num(r.get("quant.bits_w")), _num(r.get("prune.ratio"))
        else:
            acc, ratio = _num(r.get("test_acc")), _num(r.get("compression_ratio"))
            std, n = _num(r.get("acc_std")) or 0.0, int(_num(r.get("n")) or 1)
            bits, sp = _num(r.get("bits_w")), _num(r.get("target_sparsity"))
        if acc is None or ratio is None:
            continue
        pts.append(
            {
                "acc": acc,
                "ratio": ratio,
                "std": std,
                "n": n,
                "dense": bits == 32 and not sp,
                "label": r.get("method") or r.get("run_dir") or "",
            }
        )
    if not pts:
        raise ValueError(f"{path}: no rows with test_acc and compression_ratio")
    dense = [p["acc"] for p in pts if p["dense"]]
    flags = pareto_flags([(p["acc"], p["ratio"]) for p in pts])
    for p, fl in zip(pts, flags):
        p["pareto"] = fl
    return {
        "name": path.stem,
        "path": str(path),
        "points": pts,
        "dense_acc": sum(dense) / len(dense) if dense else None,
    }
