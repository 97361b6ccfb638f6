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

ACC, RATIO, BOPS = "final/test_acc", "final/compression_ratio", "final/bops"
# frontier.size: which size the ratio axis uses (honest fixed-width count, or Huffman-coded weights)
SIZES = {"honest": "", "huffman": "_huffman"}  # suffix of final/compression_ratio and final/size_bits
AXES = ("quant.bits_w", "prune.ratio", "prune.scope", "seed")
# what determines the baseline (= the dense model); mirrors the stage cache key in qpexp.pipeline
BASELINE_KEYS = ("data", "model", "baseline", "trainer", "seed")
HV_WINDOW = 0.05


# -- Pareto, groups, summary ------------------------------------------------------------------------
def _num(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _ok(row: dict) -> bool:
    return row.get("status") in ACCURACY_STANDS and _num(row.get(ACC)) is not None


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


def groups(rows: list[dict], axes: list[str], suffix: str = "") -> list[dict]:
    """Seed means of each config over its ok rows: acc mean/std, ratio and bops means, seed count.
    ``suffix``: ``_huffman`` takes the ratio and size of the Huffman-coded weights (frontier.size)."""
    buckets: dict[tuple, list[dict]] = OrderedDict()
    for r in rows:
        if _ok(r):
            buckets.setdefault(group_key(r, axes), []).append(r)
    out = []
    for key, rs in buckets.items():
        accs = [_num(r[ACC]) for r in rs]
        ratios = [_num(r.get(RATIO + suffix)) for r in rs]
        bops = [_num(r.get(BOPS)) for r in rs]
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
            ratio=_mean(ratios),
            bops=_mean(bops),
            sparsity=_mean([_num(r.get("final/sparsity")) for r in rs]),
            size_bits=_mean([_num(r.get("final/size_bits" + suffix)) for r in rs]),
        )
        out.append(g)
    flags = pareto_flags([(g["acc"], g["ratio"]) for g in out])
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


def best_within(gs: list[dict], dense_acc: float, points: float) -> dict | None:
    cands = [g for g in gs if g["ratio"] is not None and g["acc"] >= dense_acc - points / 100 - 1e-12]
    return max(cands, key=lambda g: (g["ratio"], g["acc"])) if cands else None


def summarize(rows: list[dict], gs: list[dict], hv_window: float = HV_WINDOW) -> dict:
    dense_rows = [
        r for r in rows if _ok(r) and r.get("quant.bits_w") == 32 and not _num(r.get("prune.ratio"))
    ]
    s: dict = {
        "points": sum(r["point"] == "run" for r in rows),
        "points_ok": sum(r["point"] == "run" and r["status"] == "ok" for r in rows),
        "points_failed": sum(r["point"] == "run" and r["status"] not in ACCURACY_STANDS for r in rows),
        "points_deploy_mismatch": sum(r["point"] == "run" and r["status"] == "deploy_mismatch" for r in rows),
        "points_deploy_error": sum(r["point"] == "run" and r["status"] == "deploy_error" for r in rows),
        "configs": len(gs),
    }
    if dense_rows:
        accs = [_num(r[ACC]) for r in dense_rows]
        s["dense_acc"] = sum(accs) / len(accs)
        s["dense_n"] = len(accs)
        s.update(_front_numbers([(g["acc"], g["ratio"]) for g in gs], s["dense_acc"], hv_window))
        for pts in (1, 2):
            b = best_within(gs, s["dense_acc"], pts)
            if b is not None:
                s[f"best_within_{pts}pt/config"] = _describe(b)
                s[f"best_within_{pts}pt/acc"] = b["acc"]
                s[f"best_within_{pts}pt/n"] = b["n"]
    s["pareto_points"] = sum(1 for g in gs if g["pareto"])
    return s


def _front_numbers(front: list[tuple[float, float]], dense_acc: float, hv_window: float) -> dict:
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
        "hypervolume_absolute": hypervolume_above([(g["acc"], g["ratio"]) for g in gs], ref_acc),
    }
    if ref is not None:
        front = [(p["acc"], p["ratio"]) for p in ref["points"]]
        out["reference/hypervolume_absolute"] = hypervolume_above(front, ref_acc)
    return out


def _describe(g: dict) -> str:
    if g.get("point") == "dense":
        return "dense fp32"
    parts = [f"w{_fmt(g.get('quant.bits_w'))}", f"{g.get('prune.scope')} {_fmt(g.get('prune.ratio'))}"]
    extra = [f"{k}={_fmt(v)}" for k, v in g.items() if "." in k and k not in AXES and v is not None]
    return " ".join(parts + extra)


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
