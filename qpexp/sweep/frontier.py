"""The frontier: every sweep point's record gathered into one table, a Pareto plot and summary numbers.

``write_frontier(dirs, out_dir, reference=None)`` (called by :class:`qpexp.callbacks.FrontierCallback`
at the end of every multirun) and ``qpexp-frontier DIR [DIR...] [--out DIR] [--reference CSV]``
(on demand; merges several sweeps) read every point under ``dirs`` (every folder holding a
``record.json`` or a Hydra ``.hydra/config.yaml``: also points left by an earlier sweep into the same
folder) and write into ``out_dir``:

- ``frontier.csv``: one row per point: ``point`` (``run``, or ``dense`` for the reference rows
  below), ``run_dir``, the config axes, ``status``/``error``, every record key (nested ones such as
  ``config`` flattened with dots), ``pareto`` and ``pareto_bops`` (see below), and ``pareto_config``
  (the same test as ``pareto`` on the seed means of each config). A point that failed is listed
  with ``status=failed`` and its error; a point folder without a record (a killed job) with
  ``status=missing``: nothing is dropped.
- ``frontier.png``: test accuracy against compression ratio (log axis), colour by weight bits,
  marker by pruning scope; several seeds of one config are drawn as their mean with a std error
  bar and the seed count in the legend; the Pareto front (of the config means) as a step line; the
  dense reference as a horizontal line (dotted lines 1 and 2 points below it); a reference front
  (``--reference``) in grey beside it.
- ``frontier.json``: the summary numbers below (also the W&B run's summary).
- a W&B run (``job_type="frontier"``) in the sweep's group, holding the table, the plot and the
  summary, when the points logged to W&B (``logger=wandb``, offline unless ``WANDB_MODE`` says so).

Choose on validation, report test once: ``select`` (``frontier.select``, ``--select``; default
``final/val_acc``) is the metric that decides the Pareto flags, the best ratio within N points (against
dense's value of the same metric) and the hypervolume; the **test** accuracy of the configurations so
chosen is reported beside each (``best_ratio_within_1pt_test_acc``, ``..._val_acc``, ``hypervolume_test``,
the front's ``acc``) and drawn. ``select=final/test_acc`` gives the old, test-selected numbers.
``deploy_mismatch``/``deploy_error`` points are drawn and listed but kept off the front unless
``include_failed_deploy``; ``not_deployed`` points (no deployment check ran) count, flagged in the
``not_deployed`` column.

Definitions (``acc`` = the selection metric, ``ratio`` = ``final/compression_ratio``):

- **Dense reference**: the baseline of each point *is* the dense fp32 model (same data, model,
  baseline training and seed), so each distinct baseline among the points gives one ``dense`` row:
  ``final/test_acc`` = its ``baseline/test_acc``, ratio 1, ``final/size_bits`` = ``dense/size_bits``,
  ``final/bops`` = MACs x 32 x 32. A sweep point that *is* dense (``quant.bits_w=32``,
  ``prune.ratio=0``) replaces the derived row. ``dense_acc`` is the mean over these rows (seeds).
- **pareto**: no other ok row dominates it: has an acc and a ratio at least as high, and one of them
  higher. **pareto_bops**: the same with fewer-or-equal ``final/bops`` in place of the ratio.
  Identical rows count once (the first of them is flagged). Failed rows are never Pareto points.
- **best_ratio_within_{1,2}pt**: the highest seed-mean ratio of a config whose seed-mean acc is at
  least ``dense_acc - 0.01`` (``- 0.02``).
- **hypervolume** (= **hypervolume_relative**): the area dominated by the config means in the plane
  (x = log2 ratio, y = acc in percentage points), above the reference point (x = 0, i.e. ratio 1;
  y = 100 * (dense_acc - window)), with ``window`` = 0.05 unless told (``hv_window``): the union of
  the rectangles ``[0, log2 ratio_i] x [y_ref, 100 acc_i]`` over configs with ``ratio_i > 1`` and
  ``acc_i > y_ref``. Unit: accuracy points x doublings of compression. Each front (``reference/``
  too) is measured against its *own* dense accuracy: this compares compression methods (accuracy
  lost from one's own baseline) and hides a difference between the baselines.
- **hypervolume_absolute**: the same area, but every front given (this one and ``--reference``)
  against ONE shared reference point ``hv_reference_point`` (ratio 1, ``hv_reference_acc``: the
  lowest dense accuracy among the fronts minus ``window`` unless told), so a stronger baseline
  counts. Without a reference front it equals the relative one.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

from qpexp.run.config_defaults import ADDED_LATER
from qpexp.run.status import ACCURACY_STANDS
from qpexp.sweep.dashboard import write_html
from qpexp.sweep.values import (  # noqa: F401 (qpexp.frontier's names, as before)
    ACC,
    AXES,
    BASELINE_KEYS,
    BOPS,
    DEPLOY_FAILED,
    HV_WINDOW,
    RATIO,
    SELECT,
    SIZES,
    VAL,
    _absolute_hypervolume,
    _describe,
    _fmt,
    _front_numbers,
    _mean,
    _num,
    _ok,
    _selected_numbers,
    best_within,
    eligible,
    group_key,
    groups,
    hypervolume,
    hypervolume_above,
    pareto_flags,
    read_reference,
    summarize,
)
from qpexp.track.loggers import wandb_init
from qpexp.track.wandb_views import frontier_charts

log = logging.getLogger("qpexp")

# config keys that never change what a point computes: not axes, not part of a config's identity
NEUTRAL = ("cache", "cache_dir", "checkpoint_every_s", "threads", "name", "logger.", "export.", "frontier.")
MARKERS = {"global": "o", "layer": "s", "none": "*"}
COLORS = {2: "tab:red", 3: "tab:orange", 4: "tab:blue", 8: "tab:green", 16: "tab:purple", 32: "black"}


# -- reading the points -----------------------------------------------------------------------------
def _flatten(d: dict, prefix: str = "", sep: str = ".") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key, sep))
        else:
            out[key] = v
    return out


def _point_dirs(root: Path) -> list[Path]:
    """Folders under ``root`` that hold a point: a ``record.json`` or a Hydra ``.hydra/config.yaml``."""
    found = set()
    for p in root.rglob("record.json"):
        found.add(p.parent)
    for p in root.rglob(".hydra/config.yaml"):
        found.add(p.parent.parent)
    skip = ("wandb", "cache", ".qpexp")
    return sorted(d for d in found if not any(part in skip for part in d.relative_to(root).parts[:-1]))


def _load_point(path: Path, root: Path) -> dict:
    rel = os.path.relpath(path, root.parent)
    rec_path = path / "record.json"
    if rec_path.exists():
        try:
            rec = json.loads(rec_path.read_text())
        except ValueError as e:
            rec = {"status": "failed", "error": f"unreadable record.json: {e}"}
    else:
        rec = {
            "status": "missing",
            "error": "no record.json: the job did not finish (killed or still running)",
        }
    if not rec.get("config"):
        cfg_path = path / ".hydra" / "config.yaml"
        if cfg_path.exists():
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(cfg_path)
            try:
                rec["config"] = OmegaConf.to_container(cfg, resolve=True)
            except Exception:  # an interpolation that needs Hydra's runtime: keep it unresolved
                rec["config"] = OmegaConf.to_container(cfg, resolve=False)
    return {"rec": legacy_status(rec), "run_dir": rel}


def legacy_status(rec: dict) -> dict:
    """Records written before ``deploy/checks`` existed said ``ok`` whether or not anything was
    deployed: such a record without any ``deploy/`` key is read as ``not_deployed``."""
    if rec.get("status") == "ok" and not any(k.startswith("deploy/") for k in rec):
        return {**rec, "status": "not_deployed"}
    return rec


def _identity(config: dict, keys) -> str:
    return json.dumps({k: config.get(k) for k in keys}, sort_keys=True, default=str)


def _is_neutral(key: str) -> bool:
    return any(key == n or key.startswith(n) for n in NEUTRAL)


def collect(dirs) -> tuple[list[dict], list[str]]:
    """All points under ``dirs`` as flat rows (plus derived dense rows), and the varying config axes."""
    points = []
    seen = set()
    for d in dirs:
        root = Path(d).resolve()
        if not root.exists():
            raise FileNotFoundError(f"qpexp-frontier: {d} does not exist")
        for p in _point_dirs(root):
            if p not in seen:
                seen.add(p)
                points.append(_load_point(p, root))
    flat_cfgs = [_flatten(p["rec"].get("config") or {}) for p in points]
    for f in flat_cfgs:  # a record from before a key existed: the value it computed with
        if f:
            for k, v in ADDED_LATER.items():
                f.setdefault(k, v)
    # axes: the config keys that vary between points (seed-derived copies such as data.seed left out)
    keys = sorted({k for f in flat_cfgs for k in f})
    varying = []
    for k in keys:
        if _is_neutral(k) or k in AXES:
            continue
        known = [f for f in flat_cfgs if not (isinstance(f.get(k), str) and "${" in f[k])]
        vals = [json.dumps(f.get(k), sort_keys=True, default=str) for f in known]
        if len(set(vals)) > 1 and not all(f.get(k) == f.get("seed") for f in known):
            varying.append(k)
    axes = list(AXES) + varying
    rows = []
    for p, f in zip(points, flat_cfgs):
        rec = p["rec"]
        row = OrderedDict(point="run", run_dir=p["run_dir"])
        for a in axes:
            row[a] = f.get(a)
        row["status"] = rec.get("status", "failed" if "error" in rec else "unknown")
        row["error"] = rec.get("error") or rec.get("status_reason")
        for k, v in rec.items():
            if k in ("status", "error"):
                continue
            if isinstance(v, dict):
                for fk, fv in _flatten(v, k).items():
                    row[fk] = _cell(fv)
            else:
                row[k] = _cell(v)
        rows.append(row)
    rows.extend(_dense_rows(points, flat_cfgs, axes))
    return rows, axes


def _cell(v):
    return json.dumps(v) if isinstance(v, (list, tuple)) else v


def _dense_rows(points, flat_cfgs, axes) -> list[dict]:
    """One ``dense`` row per distinct baseline among the ok points (unless a point is dense itself)."""
    real, derived = set(), OrderedDict()
    for p, f in zip(points, flat_cfgs):
        rec, cfg = p["rec"], p["rec"].get("config") or {}
        if rec.get("status") not in ACCURACY_STANDS:
            continue
        ident = _identity(cfg, BASELINE_KEYS)
        if f.get("quant.bits_w") == 32 and not f.get("prune.ratio"):
            real.add(ident)
        elif ident not in derived and "baseline/test_acc" in rec:
            derived[ident] = (p, f)
    rows = []
    for ident, (p, f) in derived.items():
        if ident in real:
            continue
        rec = p["rec"]
        row = OrderedDict(point="dense", run_dir=f"baseline of {p['run_dir']}")
        for a in axes:
            keep = a == "seed" or a.split(".")[0] in ("data", "model", "baseline", "trainer")
            row[a] = f.get(a) if keep else None
        row.update({"quant.bits_w": 32, "prune.ratio": 0.0, "prune.scope": "none"})
        row.update(status="ok", error=None)
        row.update(
            {
                "seed": rec.get("seed", f.get("seed")),
                "final/val_acc": rec.get("baseline/val_acc"),
                "final/test_acc": rec.get("baseline/test_acc"),
                "baseline/val_acc": rec.get("baseline/val_acc"),
                "baseline/test_acc": rec.get("baseline/test_acc"),
                "final/compression_ratio": 1.0,
                "final/compression_ratio_huffman": 1.0,  # no compressed tensor: nothing to code
                "final/size_bits": rec.get("dense/size_bits"),
                "final/size_bits_huffman": rec.get("dense/size_bits"),
                "dense/size_bits": rec.get("dense/size_bits"),
                "final/bits_w": 32,
                "final/bits_a": 32,
                "final/macs": rec.get("final/macs")
                if f.get("prune.structure", "unstructured") == "unstructured"
                else None,
                "cache/baseline_hit": rec.get("cache/baseline_hit"),
                "artifacts/baseline": rec.get("artifacts/baseline"),
            }
        )
        macs = row["final/macs"]
        row["final/bops"] = macs * 32 * 32 if macs is not None else None
        rows.append(row)
    return rows


# -- outputs ----------------------------------------------------------------------------------------
def write_csv(rows: list[dict], axes: list[str], path: Path) -> list[str]:
    first = [
        "point",
        "run_dir",
        *axes,
        "status",
        "not_deployed",
        "error",
        "pareto",
        "pareto_bops",
        "pareto_config",
    ]
    cols = list(first)
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    os.replace(tmp, path)
    return cols


def plot(gs: list[dict], summary: dict, path: Path, ref: dict | None = None, title: str = "") -> None:
    """Two panels: the whole front, and a zoom on the region within a few points of dense."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    full, zoom = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    dense = summary.get("dense_acc")
    accs = [100 * g["acc"] for g in gs]
    _draw(full, gs, summary, ref)
    if accs:
        full.set_ylim(max(min(accs) - 3, 0), min(100.5, max(accs + [100 * (dense or 0)]) + 2))
    _draw(zoom, gs, summary, ref)
    if dense is not None:
        zoom.set_ylim(100 * dense - 6, 100 * dense + 1.5)
        zoom.set_title("zoom: within 6 points of dense", fontsize=9)
    failed = summary.get("points_failed", 0)
    full.set_title(f"{title}: {summary.get('points', 0)} points, {failed} failed or missing", fontsize=9)
    handles, labels = full.get_legend_handles_labels()
    fig.legend(
        handles, labels, fontsize=8, loc="lower center", ncol=min(5, max(len(labels), 1)), frameon=False
    )
    rows = -(-len(labels) // 5) if labels else 0
    fig.tight_layout(rect=(0, 0.045 * rows + 0.01, 1, 1))
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def _draw(ax, gs: list[dict], summary: dict, ref: dict | None) -> None:
    from matplotlib.ticker import FuncFormatter

    _draw_groups(ax, gs)
    _draw_dense(ax, summary)
    if ref is not None:
        _draw_reference(ax, ref)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("compression ratio (dense fp32 bits / compressed bits, log)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.25)


def _draw_groups(ax, gs: list[dict]) -> None:
    """The config means (error bars over seeds) by bits and scope, and their Pareto front as a step."""
    by_legend: dict[tuple, list[dict]] = OrderedDict()
    for g in sorted(gs, key=lambda g: (_num(g.get("quant.bits_w")) or 0, str(g.get("prune.scope")))):
        by_legend.setdefault((g.get("quant.bits_w"), g.get("prune.scope"), g.get("point")), []).append(g)
    for (bits, scope, point), members in by_legend.items():
        ns = sorted({g["n"] for g in members})
        nlab = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]}"
        label = f"dense fp32 ({nlab})" if point == "dense" else f"w{_fmt(bits)} {scope} ({nlab})"
        color = COLORS.get(int(bits) if _num(bits) is not None else -1, "tab:gray")
        ax.errorbar(
            [g["ratio"] for g in members],
            [100 * g["acc"] for g in members],
            yerr=[100 * g["acc_std"] for g in members] if max(ns) > 1 else None,
            fmt=MARKERS.get(str(scope), "^"),
            color=color,
            ms=10 if point == "dense" else 6,
            capsize=3,
            alpha=0.85,
            label=label,
            linestyle="none",
        )
    front = sorted((g for g in gs if g["pareto"]), key=lambda g: g["ratio"])
    if front:
        ax.step(
            [g["ratio"] for g in front],
            [100 * g["acc"] for g in front],
            where="pre",
            color="black",
            lw=1.2,
            alpha=0.7,
            label="qpexp Pareto front (config means)",
        )


def _draw_dense(ax, summary: dict) -> None:
    """The dense reference line, the 1- and 2-point lines below it and the best ratio within each."""
    dense = summary.get("dense_acc")
    if dense is not None:
        ax.axhline(100 * dense, color="black", ls="--", lw=1, label=f"dense reference {100 * dense:.2f}%")
        for k in (1, 2):
            ax.axhline(100 * dense - k, color="black", ls=":", lw=0.7, alpha=0.6)
            best = summary.get(f"best_ratio_within_{k}pt")
            if best and best > 1:
                ax.annotate(
                    f"{best:.2f}x within {k} pt",
                    (best, 100 * dense - k),
                    textcoords="offset points",
                    xytext=(4, -10 if k == 2 else 3),
                    fontsize=8,
                )


def _draw_reference(ax, ref: dict) -> None:
    """A reference front (``--reference``) in grey: its points, its Pareto step and its dense line."""
    pts = ref["points"]
    ax.errorbar(
        [p["ratio"] for p in pts],
        [100 * p["acc"] for p in pts],
        yerr=[100 * p["std"] for p in pts],
        fmt="x",
        color="tab:gray",
        alpha=0.45,
        capsize=2,
        linestyle="none",
        label=f"reference: {ref['name']} (n={max(p['n'] for p in pts)})",
    )
    rfront = sorted((p for p in pts if p["pareto"]), key=lambda p: p["ratio"])
    ax.step(
        [p["ratio"] for p in rfront],
        [100 * p["acc"] for p in rfront],
        where="pre",
        color="tab:gray",
        ls="--",
        lw=1,
        label="reference Pareto front",
    )
    if ref.get("dense_acc") is not None:
        ax.axhline(
            100 * ref["dense_acc"],
            color="tab:gray",
            ls="-.",
            lw=0.8,
            label=f"reference dense {100 * ref['dense_acc']:.2f}%",
        )


def log_wandb(rows, cols, summary, png: Path, out_dir: Path, wb: dict) -> str | None:
    """The frontier W&B run: table, scatter, plot image and summary; returns the run's folder."""
    import wandb

    run = wandb_init(
        out_dir,
        project=wb.get("project") or "qpexp",
        group=wb.get("group"),
        job_type="frontier",
        name=wb.get("name") or "frontier",
        config={"dirs": wb.get("dirs"), "hv_window": summary.get("hv_window")},
        mode=wb.get("mode"),
        tags=["frontier"],
    )
    ok = False
    try:
        data = [[_wb_cell(r.get(c)) for c in cols] for r in rows]
        table = wandb.Table(columns=cols, data=data, allow_mixed_types=True)
        run.log(
            {
                "frontier/table": table,
                "frontier/plot": wandb.Image(str(png)),
                "frontier/scatter": wandb.plot.scatter(
                    table, RATIO, ACC, title="test acc vs compression ratio"
                ),
            }
        )
        if wb.get("view"):  # per-front means coloured by bits / by front, one line per front
            run.log(frontier_charts(wb["view"]))
        run.summary.update(
            {f"frontier/{k}": v for k, v in summary.items() if isinstance(v, (int, float, str, dict))}
        )
        ok = True
        return run.dir
    finally:
        run.finish(exit_code=0 if ok else 1)


def _wb_cell(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _wandb_settings(rows: list[dict], out_dir: Path, force: bool | None) -> dict | None:
    """Project, group and mode from the points' logger config; None when no W&B run is wanted
    (``force`` None: only when the points themselves logged to W&B)."""
    cfg = next((r for r in rows if r.get("point") == "run" and r.get("config.logger.kind") is not None), {})
    enabled = cfg.get("config.logger.kind") == "wandb" if force is None else force
    if not enabled:
        return None
    return {
        "project": cfg.get("config.logger.project"),
        "group": cfg.get("config.logger.group") or out_dir.name,
        "mode": cfg.get("config.logger.mode"),
    }


def write_frontier(
    dirs,
    out_dir,
    reference=None,
    wandb: bool | None = None,
    hv_window: float = HV_WINDOW,
    quiet: bool = False,
    hv_reference_acc: float | None = None,
    select: str = SELECT,
    include_failed_deploy: bool = False,
    size: str = "honest",
) -> dict:
    """Aggregate the points under ``dirs`` into ``out_dir`` (see the module docstring); returns the summary.

    ``wandb``: None follows the points' logger (a W&B run when they used ``logger=wandb``), True/False
    forces it. ``reference``: a CSV front drawn beside (its summary numbers land under ``reference/``).
    ``hv_reference_acc``: the accuracy of the shared point of the absolute hypervolume (default: the
    lowest dense accuracy among the fronts minus ``hv_window``). ``select``: the metric that chooses
    (Pareto flags, best-within, hypervolume; default the validation accuracy); the test accuracy of
    the chosen configs is reported beside it. ``include_failed_deploy``: let ``deploy_mismatch`` and
    ``deploy_error`` points onto the front (they are always drawn and listed). ``size``
    (``frontier.size``): ``honest`` ranks by ``final/compression_ratio``, ``huffman`` by
    ``final/compression_ratio_huffman`` (the weights Huffman-coded; points without it have no ratio).
    """
    if size not in SIZES:
        raise ValueError(f"frontier.size={size!r} is unknown: use one of {sorted(SIZES)}")
    suffix = SIZES[size]
    dirs = [Path(d) for d in dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, axes = collect(dirs)
    _check_select(rows, select)
    _flag_pareto(rows, select, include_failed_deploy, suffix)
    gs = groups(rows, axes, select, include_failed_deploy, suffix)
    _flag_configs(rows, gs, axes, select)
    summary = summarize(rows, gs, hv_window, select)
    summary["include_failed_deploy"] = include_failed_deploy
    summary["size"] = size
    ref = _add_reference(summary, reference, hv_window) if reference else None
    summary.update(_absolute_hypervolume(gs, summary, ref, hv_window, hv_reference_acc))
    cols = write_csv(rows, axes, out / "frontier.csv")
    title = "qpexp frontier: " + ", ".join(d.name for d in dirs) + f" (front chosen on {select})"
    png = out / "frontier.png"
    plot(gs, summary, png, ref, title)
    summary["front"] = _front_list(gs)
    summary["failed"] = _failed_list(rows)
    summary["files"] = {"csv": str(out / "frontier.csv"), "png": str(png)}
    view = write_html(out, summary, reference, title)  # frontier.html (interactive, self-contained)
    wb = _wandb_settings(rows, out, wandb)
    if wb is not None:
        wb["dirs"] = [str(d) for d in dirs]
        wb["view"] = view  # the fronts drawn on the page, logged as native W&B charts too
        _try_wandb(rows, cols, summary, png, out, wb)
    tmp = out / "frontier.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out / "frontier.json")
    if not quiet:
        print(report(summary), flush=True)
    return summary


def _check_select(rows: list[dict], select: str) -> None:
    """Refuse a selection metric that no finished point's record holds."""
    runs = [r for r in rows if r["point"] == "run" and r.get("status") in ACCURACY_STANDS]
    if runs and not any(_num(r.get(select)) is not None for r in runs):
        raise ValueError(
            f"frontier.select={select!r}: no finished point's record holds this key (e.g. {VAL!r} or {ACC!r})"
        )


def _flag_configs(rows: list[dict], gs: list[dict], axes, select: str) -> None:
    """Set each row's ``pareto_config`` (its config's seed mean is on the front) and ``not_deployed``."""
    on_front = {g["key"] for g in gs if g["pareto"]}
    for r in rows:
        r["pareto_config"] = _ok(r, select) and group_key(r, axes) in on_front
        r["not_deployed"] = r.get("status") == "not_deployed"


def _flag_pareto(rows: list[dict], select: str, include_failed_deploy: bool, suffix: str) -> None:
    """Set each row's ``pareto`` (select vs ratio, higher better) and ``pareto_bops`` (fewer better)."""
    for flag, x, higher in (("pareto", RATIO + suffix, True), ("pareto_bops", BOPS, False)):
        vals = [
            (_num(r.get(select)), _num(r.get(x)))
            if eligible(r, select, include_failed_deploy)
            else (None, None)
            for r in rows
        ]
        for r, f in zip(rows, pareto_flags(vals, higher)):
            r[flag] = f


def _add_reference(summary: dict, reference, hv_window: float) -> dict:
    """Read the reference front; its name and (with a dense accuracy) its numbers go under ``reference/``."""
    ref = read_reference(reference)
    summary["reference/name"] = ref["name"]
    if ref["dense_acc"] is not None:
        summary["reference/dense_acc"] = ref["dense_acc"]
        rn = _front_numbers([(p["acc"], p["ratio"]) for p in ref["points"]], ref["dense_acc"], hv_window)
        summary.update({f"reference/{k}": v for k, v in rn.items() if k != "hv_window"})
    return ref


def _failed_list(rows: list[dict]) -> list[dict]:
    """The run rows that failed or are missing, as listed in ``frontier.json``'s ``failed``."""
    return [
        {"run_dir": r["run_dir"], "status": r["status"], "error": r["error"]}
        for r in rows
        if r["point"] == "run" and r["status"] not in ("ok", "not_deployed")
    ]


def _front_list(gs: list[dict]) -> list[dict]:
    """The Pareto configs (seed means), by ratio, as listed in ``frontier.json``'s ``front``."""
    return [
        {
            "config": _describe(g),
            "acc": g["acc"],
            "acc_std": g["acc_std"],
            "select_acc": g["sel"],
            "val_acc": g["val_acc"],
            "not_deployed": g["not_deployed"],
            "n": g["n"],
            "ratio": g["ratio"],
            "sparsity": g["sparsity"],
            "size_bits": g["size_bits"],
            "bops": g["bops"],
        }
        for g in sorted((g for g in gs if g["pareto"]), key=lambda g: g["ratio"])
    ]


def _try_wandb(rows, cols, summary: dict, png: Path, out: Path, wb: dict) -> None:
    """Log the frontier W&B run; a failure warns (the local files are the record), never raises."""
    try:
        wb_summary = {**_scalars(summary), "hv_reference_point": summary.get("hv_reference_point")}
        summary["files"]["wandb"] = log_wandb(rows, cols, wb_summary, png, out, wb)
    except Exception as e:  # the local files are the record; never lose them over W&B
        warnings.warn(f"frontier W&B run failed: {e}", stacklevel=3)


def _scalars(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) or v is None}


def report(summary: dict) -> str:
    """The Pareto table and the headline numbers, as printed at the end of a sweep."""
    lines = [
        f"frontier: {summary['points']} points, {summary['points_ok']} ok, {summary['points_failed']} failed"
    ]
    sel = summary.get("select", ACC)
    if "dense_acc" in summary:
        lines.append(f"selected on {sel}; test accuracy (final/test_acc) of what it selects reported beside")
        lines.append(
            f"dense reference: {sel} {100 * summary['dense_select_acc']:.2f}%, "
            f"test {100 * summary['dense_acc']:.2f}% (n={summary['dense_n']})"
        )
        for k in (1, 2):
            b = summary.get(f"best_ratio_within_{k}pt")
            if b is not None:
                lines.append(
                    f"best ratio within {k} pt (on {sel}): {b:.2f}x ({summary.get(f'best_within_{k}pt/config')}; "
                    f"{sel} {100 * summary[f'best_within_{k}pt/select_acc']:.2f}%, "
                    f"test {100 * summary[f'best_within_{k}pt/acc']:.2f}%)"
                )
        lines.append(
            f"hypervolume relative (on {sel}, above own dense - {100 * summary['hv_window']:g} pt): "
            f"{summary['hypervolume']:.2f}; the selected front at test accuracy: {summary['hypervolume_test']:.2f}"
        )
    if "hypervolume_absolute" in summary:
        lines.append(
            f"hypervolume absolute (above the shared point {100 * summary['hv_reference_acc']:.2f}% at 1x): "
            f"{summary['hypervolume_absolute']:.2f}"
        )
    if "reference/name" in summary and "reference/hypervolume" in summary:
        r1, r2 = (
            summary.get("reference/best_ratio_within_1pt"),
            summary.get("reference/best_ratio_within_2pt"),
        )
        lines.append(
            f"reference {summary['reference/name']}: dense {100 * summary['reference/dense_acc']:.2f}%, "
            f"within 1 pt {r1 or 0:.2f}x, within 2 pt {r2 or 0:.2f}x, "
            f"hypervolume relative {summary['reference/hypervolume']:.2f}, "
            f"absolute {summary.get('reference/hypervolume_absolute', float('nan')):.2f}"
        )
    w = max([20] + [len(f["config"]) for f in summary.get("front", [])])
    head = f"{'config':<{w}} {'n':>2} {'select acc':>10} {'test acc':>15} {'ratio':>7} {'sparsity':>8} {'size bits':>9}"
    lines += ["Pareto front:", head, "-" * len(head)]
    for f in summary.get("front", []):
        acc = f"{100 * f['acc']:.2f}" + (f" ± {100 * f['acc_std']:.2f}" if f["n"] > 1 else "")
        sp = "" if f["sparsity"] is None else f"{f['sparsity']:.3f}"
        size = "" if f["size_bits"] is None else f"{f['size_bits']:,.0f}"
        sa = f"{100 * f['select_acc']:.2f}"
        mark = " (not deployed)" if f.get("not_deployed") else ""
        lines.append(
            f"{f['config']:<{w}} {f['n']:>2} {sa:>10} {acc:>15} {f['ratio']:>6.2f}x {sp:>8} {size:>9}{mark}"
        )
    for f in summary.get("failed", []):
        lines.append(f"{f['status'].upper()}: {f['run_dir']}: {f['error']}")
    return "\n".join(lines)


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="qpexp-frontier",
        description="Aggregate qpexp sweeps into a frontier "
        "(frontier.csv, frontier.png, frontier.json and a W&B run).",
    )
    p.add_argument("dirs", nargs="+", help="sweep folders (several: merged into one frontier)")
    p.add_argument("--out", help="output folder (default: the sweep folder when only one is given)")
    p.add_argument("--reference", help="a CSV front to draw beside (test_acc, compression_ratio columns)")
    p.add_argument(
        "--hv-window", type=float, default=HV_WINDOW, help="hypervolume window below dense (fraction)"
    )
    p.add_argument(
        "--hv-reference-acc",
        type=float,
        default=None,
        help="accuracy (fraction) of the absolute hypervolume's shared reference point "
        "(default: the lowest dense accuracy among the fronts minus the window)",
    )
    p.add_argument(
        "--select",
        default=SELECT,
        help=f"the metric that chooses: Pareto flags, best ratio within N points, hypervolume "
        f"(default {SELECT}; the test accuracy of what it chooses is reported beside it)",
    )
    p.add_argument(
        "--include-failed-deploy",
        action="store_true",
        help="let deploy_mismatch / deploy_error points onto the front (always drawn and listed)",
    )
    p.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="honest",
        help="the ratio axis: honest (final/compression_ratio) or huffman (final/compression_ratio_huffman)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--wandb", dest="wandb", action="store_true", default=None, help="always log a W&B run")
    g.add_argument("--no-wandb", dest="wandb", action="store_false", help="never log a W&B run")
    a = p.parse_args(argv)
    if a.out is None and len(a.dirs) > 1:
        p.error("--out is required when merging several sweeps")
    for d in a.dirs:
        if not Path(d).is_dir():
            p.error(f"{d} is not a folder")
    if a.reference and not Path(a.reference).is_file():
        p.error(f"--reference {a.reference}: no such file")
    write_frontier(
        a.dirs,
        a.out or a.dirs[0],
        reference=a.reference,
        wandb=a.wandb,
        hv_window=a.hv_window,
        hv_reference_acc=a.hv_reference_acc,
        select=a.select,
        include_failed_deploy=a.include_failed_deploy,
        size=a.size,
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli())
