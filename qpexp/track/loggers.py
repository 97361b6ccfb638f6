"""Experiment tracking: W&B (offline unless WANDB_MODE says otherwise), CSV, or nothing.

W&B never blocks a run: without a network, an online init that fails falls back to offline mode
with a warning, and the run is always finished (also when the pipeline fails).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

from qpexp.core.warning import QpexpWarning
from qpexp.track.wandb_views import point_axes

KEY = re.compile(r"sensitivity/(.+)/([wp][0-9.]+)/val_acc")  # a sensitivity measurement's record key

log = logging.getLogger("qpexp")


class Tracker:
    """One tracking run per pipeline run: a Lightning logger for the stages, a summary, a finish."""

    def __init__(self, kind: str, run_dir: Path, run=None, logger=None):
        self.kind, self.run_dir, self.run, self.logger = kind, run_dir, run, logger

    def summary(self, record: dict) -> None:
        if self.run is not None:
            self.run.summary.update({k: v for k, v in record.items() if k != "config" and _scalar(v)})

    def log_layers(self, record: dict) -> None:
        """Per-layer sparsity as a W&B table and bar chart; per-layer weight widths likewise when
        they differ (``quant.bits_w=auto``); the sensitivity table and heatmap when measured."""
        if self.run is None:
            return

        if "quant/assignment" in record:  # quant.bits_w=auto: the chosen widths
            self._layer_bar(record, "bits_w", "weight bits per layer (quant.bits_w=auto)")
        self.log_sensitivity(record)
        self._layer_bar(record, "sparsity", "realized sparsity per layer")

    def _layer_bar(self, record: dict, key: str, title: str) -> None:
        """``layers/<key>_table`` and its bar chart ``layers/<key>_bar`` from ``layers/<name>/<key>``."""
        import wandb

        rows = [
            [k.split("/")[1], v]
            for k, v in record.items()
            if k.startswith("layers/") and k.endswith(f"/{key}")
        ]
        if rows:
            table = wandb.Table(columns=["layer", key], data=rows)
            self.run.log(
                {
                    f"layers/{key}_table": table,
                    f"layers/{key}_bar": wandb.plot.bar(table, "layer", key, title=title),
                }
            )

    def log_sensitivity(self, record: dict) -> None:
        """``sensitivity/table`` (layer, setting, val_acc, val_loss, acc_drop in points) and its
        heatmap (W&B's confusion-matrix preset: layer x setting, cell = acc_drop), as
        :func:`qpexp.wandb_views.build_workspace` expects; ``sensitivity.png`` as an image."""
        rows = sensitivity_rows(record)
        if self.run is None or not rows:
            return
        import wandb

        table = wandb.Table(columns=["layer", "setting", "val_acc", "val_loss", "acc_drop"], data=rows)
        out = {
            "sensitivity/table": table,
            "sensitivity/heatmap": wandb.plot_table(
                "wandb/confusion_matrix/v1",
                table,
                {"Actual": "layer", "Predicted": "setting", "nPredictions": "acc_drop"},
                {"title": "val accuracy drop (points), one layer at a time"},
            ),
        }
        png = Path(self.run_dir) / "sensitivity.png"
        if png.exists():
            out["sensitivity/plot"] = wandb.Image(str(png))
        self.run.log(out)

    def finish(self, ok: bool) -> None:
        if self.run is not None:
            try:
                self.run.finish(exit_code=0 if ok else 1)
            except Exception as e:  # never lose the local record over a tracking error
                warnings.warn(f"W&B finish failed: {e}", QpexpWarning, stacklevel=2)


def _scalar(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def wandb_init(
    run_dir: Path,
    project: str,
    group: str | None,
    job_type: str,
    name: str | None,
    config: dict,
    mode: str | None = None,
    tags=None,
    init_timeout: float = 20,
):
    """``wandb.init`` that honours WANDB_MODE, defaults to offline and falls back to offline on failure."""
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    mode = mode or os.environ["WANDB_MODE"]
    run_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(
        project=project,
        group=group,
        job_type=job_type,
        name=name,
        config=config,
        dir=str(run_dir),
        reinit="finish_previous",
        tags=tags,
    )
    try:
        return wandb.init(
            mode=mode, settings=wandb.Settings(init_timeout=init_timeout, silent=True), **kwargs
        )
    except Exception as e:
        if mode == "offline":
            raise
        warnings.warn(
            f"W&B init in mode {mode!r} failed ({e}); logging offline instead", QpexpWarning, stacklevel=2
        )
        return wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kwargs)


def make_tracker(
    logger_cfg, run_dir: Path, config: dict, name: str | None = None, sweep: str | None = None
) -> Tracker:
    """``sweep``: the sweep folder's name in a multirun: the W&B group unless ``logger.group`` is set
    (the frontier run of that folder lands in the same group). W&B runs get the point's config axes
    as top-level config keys (``bits_w``, ``ratio``, ``scope``, ...; :func:`qpexp.wandb_views.point_axes`)."""
    kind = (logger_cfg or {}).get("kind", "none") if logger_cfg is not None else "none"
    if kind == "none":
        return Tracker("none", run_dir)
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return Tracker("csv", run_dir, logger=CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        group = logger_cfg.get("group") or sweep
        run = wandb_init(
            run_dir,
            project=logger_cfg.get("project") or "qpexp",
            group=group,
            job_type=logger_cfg.get("job_type") or "pipeline",
            name=name,
            config={**point_axes(config, group), **config},
            mode=logger_cfg.get("mode"),
            tags=list(logger_cfg.get("tags") or []),
            init_timeout=float(logger_cfg.get("init_timeout") or 20),
        )
        return Tracker("wandb", run_dir, run=run, logger=WandbLogger(experiment=run))
    raise ValueError(f"logger.kind={kind!r} is unknown: use wandb, csv or none")


def sensitivity_rows(record: dict) -> list[list]:
    """``[layer, setting, val_acc, val_loss, acc_drop]`` per measurement (acc_drop in points against
    ``sensitivity/reference/val_acc``): the W&B table ``sensitivity/table``."""
    ref = record.get("sensitivity/reference/val_acc")
    rows = []
    for k, v in record.items():
        m = KEY.fullmatch(k)
        if m and m.group(1) != "reference":
            layer, setting = m.groups()
            loss = record.get(f"sensitivity/{layer}/{setting}/val_loss")
            rows.append([layer, setting, v, loss, 100 * (ref - v) if ref is not None else None])
    return rows
