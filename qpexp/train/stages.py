"""The three stages as LightningModules: baseline training, iterative prune-and-finetune, QAT.

They share :class:`Stage` (training/validation/test steps, one torchmetrics object per split,
best-epoch selection on validation, masks kept after every optimizer step); each subclass adds
only what its stage does.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from qpexp.core.accounting import layer_sparsity, sparsity
from qpexp.core.modules import clone_state
from qpexp.core.prune import MaskKeeper, PruneConfig, ensure_masks, make_criterion, prune_step, schedule
from qpexp.core.prune.channel import physically_prune
from qpexp.core.prune.compact import remove_dead_units
from qpexp.core.prune.masks import prunable_layers, strip_masks
from qpexp.core.quant.adaround import adaround_
from qpexp.core.quant.gptq import gptq_
from qpexp.core.quant.layers import warn_symmetric_nonnegative
from qpexp.train.ddp import all_reduce, rank_batches, reduce_weight_grads, sync_masks, sync_quant_state
from qpexp.train.optim import adamw


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


class Stage(L.LightningModule):
    """Trains ``model`` with AdamW (label smoothing optional) and a cosine schedule (restarted every ``cycle_epochs``),
    logs ``<stage>/train/loss``, ``<stage>/train/acc``, ``<stage>/val/acc``, ``<stage>/test/acc``
    and keeps the weights of the best validation epoch (``select_best``)."""

    stage = "stage"

    def __init__(
        self,
        model: torch.nn.Module,
        num_classes: int,
        lr: float = 1e-2,
        epochs: int = 10,
        weight_decay: float = 0.0,
        cycle_epochs: int | None = None,
        min_lr_frac: float = 0.0,
        label_smoothing: float = 0.0,
        distiller=None,
    ):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.distiller = distiller  # qpexp.distill.Distiller: also learn from the baseline's logits
        self.model = model
        self.lr, self.epochs, self.weight_decay = lr, epochs, weight_decay
        self.cycle_epochs = cycle_epochs or max(epochs, 1)
        self.min_lr_frac = min_lr_frac
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.keeper = MaskKeeper(model)
        self.best_val, self.best_epoch, self.best_state = -1.0, -1, None

    def forward(self, x):
        return self.model(x)

    # -- steps ------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x, y, *teacher = batch  # a third tensor: the teacher's logits, precomputed (qpexp.distill)
        logits = self.model(x)
        if self.distiller is not None:
            loss = self.distiller.loss(logits, x, y, self.label_smoothing, *teacher)
        else:
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise DivergenceError(
                f"{self.stage}: training loss became {value} at epoch {self.current_epoch}, batch {batch_idx}"
            )
        # summed here and logged once per epoch: self.log or a torchmetrics update per step costs
        # more than a small model's step (python -m qpexp.bench epoch)
        self._correct += int((logits.detach().argmax(1) == y).sum())
        self._loss_sum += value * len(y)
        self._seen += len(y)
        return loss

    def on_train_epoch_start(self):
        self._loss_sum, self._seen, self._correct = 0.0, 0, 0

    def on_train_epoch_end(self):
        loss_sum, correct, seen = all_reduce(
            torch.tensor([self._loss_sum, self._correct, self._seen], dtype=torch.float64)
        ).tolist()
        if seen:  # every rank's share (one collective per epoch under DDP)
            self.log(f"{self.stage}/train/loss", loss_sum / seen)
            self.log(f"{self.stage}/train/acc", correct / seen)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.keeper()  # pruned weights back to exactly zero after the optimizer step

    def on_validation_epoch_start(self):
        self._val_correct, self._val_seen = 0, 0

    def validation_step(self, batch, batch_idx):
        x, y = batch  # counted here, logged once per epoch (a torchmetrics object in self.log costs ~50 ms)
        self._val_correct += int((self.model(x).argmax(1) == y).sum())
        self._val_seen += len(y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self.model(x), y)
        self.log(f"{self.stage}/test/acc", self.test_acc, on_step=False, on_epoch=True, batch_size=len(y))

    def on_validation_epoch_end(self):
        counts = torch.tensor([self._val_correct, self._val_seen], dtype=torch.float64)
        correct, seen = all_reduce(counts).tolist()  # every rank's share under DDP
        acc = correct / seen if seen else -1.0
        if seen:
            self.log(f"{self.stage}/val/acc", acc)
        if not (self.trainer.sanity_checking or self.trainer.state.fn != "fit"):
            self.epoch_end(acc)

    def epoch_end(self, val_acc: float) -> None:
        if val_acc > self.best_val:
            self.best_val, self.best_epoch, self.best_state = (
                val_acc,
                self.current_epoch,
                clone_state(self.model),
            )

    def select_best(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
            self.keeper.refresh(self.model)

    # -- optimizer --------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = adamw(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        cycle, floor = self.cycle_epochs, self.min_lr_frac

        def factor(epoch: int) -> float:
            t = (epoch % cycle) / cycle
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor)}

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        checkpoint["qpexp"] = self.extra_state()

    def on_load_checkpoint(self, checkpoint):
        ensure_masks(self.model, checkpoint["state_dict"], prefix="model.")
        self.keeper.refresh(self.model)
        self.load_extra_state(checkpoint.get("qpexp", {}))

    def extra_state(self) -> dict:
        return {"best_val": self.best_val, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load_extra_state(self, s: dict) -> None:
        self.best_val = s.get("best_val", -1.0)
        self.best_epoch = s.get("best_epoch", -1)
        self.best_state = s.get("best_state")
        if self.best_state is not None:
            ensure_masks(self.model, self.best_state)


class BaselineStage(Stage):
    """Trains from scratch; also keeps the initial weights and those after ``rewind_epoch`` (lottery-ticket rewinding)."""

    stage = "baseline"

    def __init__(self, *args, rewind_epoch: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.rewind_epoch = rewind_epoch
        self.rewind = {"init": clone_state(self.model)}

    def epoch_end(self, val_acc: float) -> None:
        super().epoch_end(val_acc)
        if self.current_epoch + 1 == self.rewind_epoch:
            self.rewind["epoch"] = clone_state(self.model)

    def extra_state(self) -> dict:
        return {**super().extra_state(), "rewind": self.rewind}

    def stage_state(self) -> dict:
        return {"rewind": self.rewind}

    def load_extra_state(self, s: dict) -> None:
        super().load_extra_state(s)
        self.rewind = s.get("rewind", self.rewind)


class PruneStage(Stage):
    """Iterative prune-and-finetune: ``steps`` pruning steps along ``schedule`` toward ``cfg.ratio``,
    ``finetune_epochs`` of fine-tuning after each (AGP: pruning every ``agp_dt`` batches instead).

    Each step's candidate is its best validation epoch; the stage keeps the last step's candidate.
    With ``max_acc_drop`` set, a step whose best validation accuracy falls more than that below
    ``reference_val`` stops the stage and the last step within budget is kept (none within budget:
    the unpruned model the stage started from). AGP prunes during fine-tuning, so its budget is
    checked at the end: the highest sparsity level whose best epoch-end validation accuracy was
    within budget is kept. ``stage_meta`` says which step was kept and why.
    """

    stage = "prune"

    def __init__(
        self,
        *args,
        prune: PruneConfig,
        finetune_epochs: int = 10,
        max_acc_drop: float | None = None,
        reference_val: float = 0.0,
        rewind_state: dict | None = None,
        agp_dt: int = 10,
        pruner=None,
        **kwargs,
    ):
        super().__init__(*args, cycle_epochs=finetune_epochs, **kwargs)
        self.cfg = prune
        self.finetune_epochs = finetune_epochs
        self.max_acc_drop, self.reference_val = max_acc_drop, reference_val
        self.rewind_state = rewind_state
        self.agp_dt = agp_dt
        self.targets = schedule(prune.schedule, prune.ratio, prune.steps)
        self.criterion = make_criterion(prune)
        self.pruner = pruner or prune_step
        self.start_state = clone_state(self.model)  # the unpruned model, kept when no step is within budget
        self.step_best: dict[int, tuple[float, dict, int]] = {}  # step -> (val acc, state, epoch)
        self.done_step = -1  # last pruning step applied
        self.stop_reason = "target reached"
        self.layer_sparsity: dict[str, float] = {}
        self.realized_ratio = 0.0

    # -- pruning ----------------------------------------------------------------------------------
    def _grads(self) -> dict[str, list[torch.Tensor]] | None:
        if not getattr(self.criterion, "needs_grads", False):
            return None
        loader = self.trainer.datamodule.loader("train", shuffle=True)
        # BatchNorm statistics kept; under DDP each rank its share, averaged per batch across ranks
        return reduce_weight_grads(self.model, loader, self.cfg.taylor_batches)

    def _example(self) -> torch.Tensor:
        """One input sample, for pruners that trace the model (channel pruning)."""
        dm = self.trainer.datamodule
        splits = getattr(dm, "splits", None)
        if splits and "val" in splits:
            return splits["val"][0][:1]
        return next(iter(dm.loader("train", shuffle=False)))[0][:1]

    def _val_batches(self) -> list:
        """``prune.auto_batches`` validation batches: ``scope=auto`` measures sensitivity on them."""
        loader = self.trainer.datamodule.loader("val", shuffle=False)
        return [b[:2] for b, _ in zip(loader, range(self.cfg.auto_batches))]

    def _calib(self, loader, extra: dict) -> None:
        """One-shot methods: ``prune.calib_batches`` unlabeled training batches (the same first ones
        on every DDP rank) for a criterion that reads input norms (wanda) or a pruner that needs them
        (sparsegpt); their calibration record is kept for the stage's meta."""
        wants = getattr(self.criterion, "needs_inputs", False) or getattr(self.pruner, "needs_calib", False)
        if not wants:
            return
        batches = [x for _, (x, _) in zip(range(self.cfg.calib_batches), loader)]
        if getattr(self.criterion, "needs_inputs", False):
            self.oneshot_info = self.criterion.calibrate(self.model, batches)
        if getattr(self.pruner, "needs_calib", False):
            extra["calib"] = batches

    def prune_to(self, step: int, loader=None, example=None) -> None:
        oneshot = loader is not None  # prune.finetune_epochs=0: no trainer
        target = self.targets[step]
        grads = None
        if getattr(self.criterion, "needs_grads", False):
            grads = (
                reduce_weight_grads(self.model, loader, self.cfg.taylor_batches) if oneshot else self._grads()
            )
        extra = {"batches": self._val_batches()} if self.cfg.scope == "auto" else {}
        self._calib(loader if oneshot else self.trainer.datamodule.loader("train", shuffle=False), extra)
        self.layer_sparsity = self.pruner(
            self.model,
            self.cfg,
            target,
            self.criterion,
            grads,
            example=self._example() if example is None else example,
            **extra,
        )
        if getattr(self.pruner, "needs_calib", False):
            self.oneshot_info = getattr(self.pruner, "last", {})
        sync_masks(self.model)  # DDP: rank 0's masks everywhere (the same, from reduced scores)
        self.done_step = step
        if self.rewind_state is not None:
            masks = {k: v for k, v in self.model.state_dict().items() if k.endswith("_mask")}
            weights = {k: v for k, v in self.rewind_state.items() if not k.endswith("_mask")}
            self.model.load_state_dict({**weights, **masks}, strict=False)
        self.keeper.refresh(self.model)
        self.keeper()

    @torch.no_grad()
    def calibrate(self, loader) -> None:
        """``prune.finetune_epochs=0``: every step's pruning applied at once, without training (one-shot)."""
        example = next(iter(loader))[0][:1]
        for step in range(len(self.targets)):
            self.prune_to(step, loader, example)
        self.selected_step = len(self.targets) - 1
        self.keeper.refresh(self.model)
        self.keeper()
        self.realized_ratio = sparsity(self.model)
        self.layer_sparsity = layer_sparsity(self.model)

    def oneshot_meta(self) -> dict:
        info = getattr(self, "oneshot_info", None) or {}
        if not info:
            return {}
        keys = ("calib_seconds", "compress_seconds", "forward_seconds")
        out = {f"oneshot_{k}": info[k] for k in keys if k in info}
        out["oneshot_layers"] = {
            n: {k: v for k, v in d.items() if k in ("calib_seconds", "compress_seconds", "stats_bytes")}
            for n, d in info.get("layers", {}).items()
        }
        return out

    def on_train_start(self):
        if self.cfg.schedule != "agp":
            return
        total = self.trainer.num_training_batches * self.trainer.max_epochs
        last_event = (len(self.targets) - 1) * self.agp_dt
        if last_event >= total:
            raise ValueError(
                f"prune.schedule=agp: {len(self.targets)} pruning events every prune.agp_dt={self.agp_dt} "
                f"batches need more than the {total} batches of fine-tuning; lower prune.agp_dt or "
                "prune.steps, or raise prune.finetune_epochs"
            )

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.cfg.schedule == "agp":
            return
        step = self.current_epoch // self.finetune_epochs
        if step < len(self.targets) and step > self.done_step:
            self.prune_to(step)

    def on_train_batch_start(self, batch, batch_idx):
        if self.cfg.schedule != "agp":
            return
        step = self.global_step // self.agp_dt
        if self.global_step % self.agp_dt == 0 and step < len(self.targets) and step > self.done_step:
            self.prune_to(step)

    # -- selection --------------------------------------------------------------------------------
    def current_step(self) -> int:
        """The pruning step whose candidate this epoch is (AGP: the sparsity level in force)."""
        if self.cfg.schedule == "agp":
            return self.done_step
        return self.current_epoch // self.finetune_epochs

    def within_budget(self, val_acc: float) -> bool:
        return self.max_acc_drop is None or val_acc >= self.reference_val - self.max_acc_drop

    def epoch_end(self, val_acc: float) -> None:
        step = self.current_step()
        if step < 0:
            return
        best = self.step_best.get(step)
        if best is None or val_acc > best[0]:
            self.step_best[step] = (val_acc, clone_state(self.model), self.current_epoch)
        last_epoch_of_step = (self.current_epoch + 1) % self.finetune_epochs == 0
        if self.max_acc_drop is not None and last_epoch_of_step and self.cfg.schedule != "agp":
            if not self.within_budget(self.step_best[step][0]):
                self.stop_reason = (
                    f"accuracy budget: step {step + 1} reached val acc {self.step_best[step][0]:.4f}, "
                    f"more than {self.max_acc_drop} below {self.reference_val:.4f}"
                )
                self.step_best.pop(step)
                self.trainer.should_stop = True

    def _agp_budget(self) -> None:
        """AGP: keep only the sparsity levels within budget (checked once the ramp is over)."""
        final = len(self.targets) - 1
        if self.max_acc_drop is None or final not in self.step_best:
            return
        if self.within_budget(self.step_best[final][0]):
            return
        self.stop_reason = (
            f"accuracy budget: the final AGP level reached val acc {self.step_best[final][0]:.4f}, "
            f"more than {self.max_acc_drop} below {self.reference_val:.4f}"
        )
        self.step_best = {s: b for s, b in self.step_best.items() if self.within_budget(b[0])}

    def select_best(self) -> None:
        if self.cfg.schedule == "agp":
            self._agp_budget()
        if self.step_best:
            step = max(self.step_best)
            self.best_val, state, self.best_epoch = self.step_best[step]
            ensure_masks(self.model, state)
            self.model.load_state_dict(state)
            self.selected_step = step
        else:  # not even the first step was within budget: keep the unpruned model
            self.selected_step = -1
            strip_masks(self.model)
            self.model.load_state_dict(self.start_state)
        self.keeper.refresh(self.model)
        self.realized_ratio = sparsity(self.model)
        self.layer_sparsity = layer_sparsity(self.model)
        self.curve = self.step_curve()

    @torch.no_grad()
    def step_curve(self) -> list[dict]:
        """Every step's candidate (its best validation epoch), measured like the kept one: pruned
        fraction, validation and test accuracy. One iterative run gives the whole accuracy-vs-sparsity
        curve (lottery-ticket plots); the stage keeps the last step's candidate as before."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not self.step_best:
            return []
        kept = clone_state(self.model)
        was = self.model.training
        self.model.eval()
        out = []
        for step in sorted(self.step_best):
            val, state, epoch = self.step_best[step]
            self.model.load_state_dict(state)
            correct = total = 0
            for x, y in dm.loader("test"):
                correct += int((self.model(x).argmax(1) == y).sum())
                total += len(y)
            out.append({"step": step + 1, "sparsity": sparsity(self.model), "val_acc": val,
                        "test_acc": correct / max(total, 1), "epoch": epoch})  # fmt: skip
        self.model.load_state_dict(kept)
        self.model.train(was)
        return out

    def finalize(self, example: torch.Tensor) -> None:
        """Channel structure: remove the masked channels for real (the model becomes smaller).
        ``compact``: remove the units unstructured pruning left dead (:mod:`qpexp.core.prune.compact`)."""
        self.structure, self.units_removed = None, {}
        if self.cfg.structure == "channel":
            self.structure = physically_prune(self.model, example)
        elif self.cfg.compact and getattr(self, "selected_step", -1) >= 0:
            width = {name: m.weight.shape[0] for name, m in prunable_layers(self.model)}  # before removal
            self.structure = remove_dead_units(self.model, example) or None
            self.units_removed = {k: width[k] - len(v) for k, v in (self.structure or {}).items()}
            self.realized_ratio = sparsity(self.model)
        self.keeper.refresh(self.model)

    def stage_state(self) -> dict:
        return {"structure": self.structure} if getattr(self, "structure", None) is not None else {}

    def stage_meta(self) -> dict:
        step = getattr(self, "selected_step", -1)
        return {
            "stopped_at_step": step + 1,
            "steps_planned": len(self.targets),
            "stop_reason": self.stop_reason,
            "targets": self.targets,
            "selected_target": self.targets[step] if step >= 0 else 0.0,
            "realized_ratio": self.realized_ratio,
            "units_removed": getattr(self, "units_removed", {}),
            "curve": getattr(self, "curve", []),
            **self.oneshot_meta(),
        }

    def extra_state(self) -> dict:
        return {
            "step_best": self.step_best,
            "done_step": self.done_step,
            "stop_reason": self.stop_reason,
            "layer_sparsity": self.layer_sparsity,
        }

    def load_extra_state(self, s: dict) -> None:
        self.step_best = s.get("step_best", {})
        self.done_step = s.get("done_step", -1)
        self.stop_reason = s.get("stop_reason", self.stop_reason)
        self.layer_sparsity = s.get("layer_sparsity", {})
        for _, state, *_ in self.step_best.values():
            ensure_masks(self.model, state)
        self.keeper.refresh(self.model)


class QATStage(Stage):
    """Fine-tunes a fake-quantized model (straight-through estimator); activation ranges are
    calibrated on ``calib_batches`` training batches first. ``epochs=0`` is post-training
    quantization: calibration only, no weight update."""

    stage = "qat"

    def __init__(
        self,
        *args,
        calib_batches: int = 10,
        rounding: str = "nearest",
        rounding_batches: int = 8,
        rounding_iters: int = 500,
        gptq: dict | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.calib_batches = calib_batches
        self.gptq_options = gptq or {}
        self.rounding, self.rounding_batches, self.rounding_iters = rounding, rounding_batches, rounding_iters
        self.rounding_info: dict = {}

    @torch.no_grad()
    def calibrate(self, loader) -> None:
        was = self.model.training
        self.model.eval()
        for m in self.model.modules():  # observers update in training mode only
            if hasattr(m, "min_val") or hasattr(m, "max_abs"):
                m.train()
        for x, _ in rank_batches(loader, self.calib_batches):  # DDP: each rank its share
            self.model(x)
        sync_quant_state(self.model, init=True)  # DDP: ranges and LSQ steps reduced across ranks
        self.model.train(was)

        warn_symmetric_nonnegative(self.model)  # symmetric activation quantizer on never-negative input
        if self.rounding == "adaround":
            self.adaround(loader)
        if self.rounding == "gptq":
            self.gptq(loader)

    def gptq(self, loader) -> None:
        """GPTQ rounding of every weight (PTQ) from ``quant.calib_batches`` unlabeled training batches
        (the same first ones on every DDP rank: deterministic)."""

        batches = [x for _, (x, _) in zip(range(self.calib_batches), loader)]
        info = gptq_(self.model, batches, **self.gptq_options)
        layers = {n: d for n, d in info["layers"].items() if "changed" in d}
        self.rounding_info = {**layers, "seconds": info["calib_seconds"] + info["compress_seconds"]}
        self.oneshot_info = info

    def adaround(self, loader) -> None:
        """Learned rounding of every weight (PTQ). The same first batches on every DDP rank: the
        result is deterministic, so every rank rounds alike."""
        batches = [x for i, (x, _) in zip(range(self.rounding_batches), loader)]
        self.rounding_info = adaround_(self.model, batches, iters=self.rounding_iters)

    def stage_meta(self) -> dict:
        if not self.rounding_info:
            return {}
        layers = [v for k, v in self.rounding_info.items() if k not in ("seconds", "nearest_only")]
        out = {
            "rounding_seconds": self.rounding_info["seconds"],
            "rounding_changed": sum(v["changed"] for v in layers) / max(len(layers), 1),
            "nearest_only": self.rounding_info.get("nearest_only", []),
        }
        info = getattr(self, "oneshot_info", None)
        if info:  # gptq: the calibration passes against a plain forward, per-layer time and memory
            out.update(
                {f"oneshot_{k}": info[k] for k in ("calib_seconds", "compress_seconds", "forward_seconds")}
            )
            out["oneshot_layers"] = {n: {k: d[k] for k in ("calib_seconds", "compress_seconds", "stats_bytes")}
                                     for n, d in info["layers"].items()}  # fmt: skip
            out["nearest_only"] = info.get("nearest_only", [])
        return out

    def on_fit_start(self):
        if self.current_epoch == 0 and not self.trainer.ckpt_path:
            self.calibrate(self.trainer.datamodule.loader("train", shuffle=False))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        super().on_train_batch_end(outputs, batch, batch_idx)
        sync_quant_state(self.model)  # DDP: observer ranges of every rank's batch (no-op otherwise)
