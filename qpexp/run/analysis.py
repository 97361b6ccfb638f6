"""The run's side of the per-layer analyses: sensitivity (``analysis=sensitivity``) and the mixed
precision assignment (``quant.bits_w=auto``) as record keys, W&B rows and ``sensitivity.png``.
The measurements themselves are in :mod:`qpexp.core.sensitivity` and :mod:`qpexp.core.mixed`."""

from __future__ import annotations

import logging
import time
from itertools import islice
from pathlib import Path

from qpexp.core.analysis.mixed import assign_bits
from qpexp.core.analysis.sensitivity import evaluate, prune_sensitivity, quant_sensitivity
from qpexp.track.loggers import KEY, sensitivity_rows  # noqa: F401 (qpexp.analysis's names, as before)

log = logging.getLogger("qpexp")


def setting_name(kind: str, value) -> str:
    return f"w{value}" if kind == "w" else f"p{value:g}"


def sensitivity(model, dm, qcfg, pcfg, widths, ratios, example, structure: str) -> dict:
    """Record keys ``sensitivity/<layer>/w<bits>/val_acc|val_loss``, ``sensitivity/<layer>/p<ratio>/...``,
    ``sensitivity/reference/...`` (the model as it is) and ``seconds/sensitivity``. Pruning is measured
    for unstructured pruning only (channel-pruned models: widths only)."""
    start = time.perf_counter()
    val = list(dm.loader("val"))
    out: dict = {}
    q = quant_sensitivity(model, val, qcfg, widths, example) if widths else {"": {}}
    acc, loss = evaluate(model, val)
    out["sensitivity/reference/val_acc"], out["sensitivity/reference/val_loss"] = acc, loss
    for layer, per in q.items():
        for b, (a, l) in per.items():
            if layer:
                out[f"sensitivity/{layer}/w{b}/val_acc"] = a
                out[f"sensitivity/{layer}/w{b}/val_loss"] = l
    if ratios and structure == "unstructured":
        for layer, per in prune_sensitivity(model, val, pcfg, ratios).items():
            for r, (a, l) in per.items():
                out[f"sensitivity/{layer}/p{r:g}/val_acc"] = a
                out[f"sensitivity/{layer}/p{r:g}/val_loss"] = l
    out["seconds/sensitivity"] = time.perf_counter() - start
    return out


def plot_sensitivity(record: dict, path: Path) -> Path | None:
    """Heatmap of the accuracy drop (points) per layer (rows) and setting (columns) into ``path``."""
    rows = sensitivity_rows(record)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = list(dict.fromkeys(r[0] for r in rows))
    settings = list(dict.fromkeys(r[1] for r in rows))
    grid = np.full((len(layers), len(settings)), np.nan)
    for layer, s, _, _, drop in rows:
        grid[layers.index(layer), settings.index(s)] = drop
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(settings), 1.2 + 0.45 * len(layers)))
    im = ax.imshow(grid, cmap="Reds", aspect="auto", vmin=min(0.0, np.nanmin(grid)))
    ax.set_xticks(range(len(settings)), settings)
    ax.set_yticks(range(len(layers)), layers)
    for i in range(len(layers)):
        for j in range(len(settings)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8)
    ref = record.get("sensitivity/reference/val_acc", 0)
    ax.set_title(f"val accuracy drop (points) from {100 * ref:.1f}%, one layer at a time")
    ax.set_xlabel("w<bits>: weights quantized; p<ratio>: pruned")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def mixed_precision(model, dm, qcfg, q, dense_bits: int, example) -> tuple[dict, dict]:
    """(``{layer: bits}``, record keys) for ``quant.bits_w=auto``: the budget is ``budget_bits`` or
    ``dense_bits / target_ratio``; the loss increases measured on the validation split with the
    run's activation quantizers calibrated on ``calib_batches`` training batches."""
    start = time.perf_counter()
    budget = int(q.budget_bits) if q.budget_bits is not None else int(dense_bits / q.target_ratio)
    val = list(dm.loader("val"))
    calib = list(islice(dm.loader("train", shuffle=False), q.calib_batches))
    found = assign_bits(model, val, qcfg, budget, example=example, calib=calib)
    a = found["assignment"]
    if not found["feasible"]:
        log.warning(
            "quant.bits_w=auto: no widths fit %d bits (smallest: %d bits); every layer takes its smallest width",
            budget,
            found["planned_bits"],
        )
    rec = {
        "quant/target_ratio": q.target_ratio,
        "quant/budget_bits": budget,
        "quant/assignment": ",".join(f"{n}:{b}" for n, b in a.items()),
        "quant/planned_size_bits": found["planned_bits"],
        "quant/planned_compression_ratio": dense_bits / found["planned_bits"],
        "quant/budget_feasible": found["feasible"],
        "quant/assignment_cost": found["cost"],
        "seconds/mixed_precision": time.perf_counter() - start,
    }
    return a, rec
