"""The pipeline: baseline -> iterative prune-and-finetune -> QAT, each stage cached, one record per run.

``run(cfg, run_dir)`` validates the config, checks the data, runs the enabled stages (reusing any
stage the cache already holds), measures the final model and writes ``record.json`` atomically.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from qpexp import __version__
from qpexp.core.accounting import (
    count_params,
    deployable_size_bits,
    layer_views,
    model_macs,
    prunable_params,
    pruned_fraction,
    size_bits,
    zero_fraction,
)
from qpexp.core.huffman import huffman_record
from qpexp.core.modules import clone_state
from qpexp.core.prune import check_quality, ensure_masks
from qpexp.core.prune.channel import channel_prune_step, restore_structure
from qpexp.core.prune.sparsegpt import sparsegpt_step
from qpexp.core.prune.spec import CRITERIA
from qpexp.core.quant import quantize_
from qpexp.core.quant.graph import float_ops
from qpexp.deploy import deploy, deploy_checks, deploy_status
from qpexp.errors import ConfigError
from qpexp.io import atomic_write_json, read_json, safe_torch_load
from qpexp.run.analysis import mixed_precision, plot_sensitivity, sensitivity
from qpexp.run.build import check_channel_pruning
from qpexp.run.build import make_model as build
from qpexp.run.cache import StageCache, cache_key
from qpexp.run.codeprint import code_fingerprints, git_state
from qpexp.run.config_defaults import without_added_defaults
from qpexp.run.progress import progress_bar_enabled
from qpexp.run.rank_cache import stage_entry
from qpexp.run.schema import plain_config, prune_config, quant_config, validate
from qpexp.run.status import ACCURACY_STANDS
from qpexp.train.ddp import finish_stage
from qpexp.train.distill import Distiller, make_teacher, precompute
from qpexp.train.stages import BaselineStage, PruneStage, QATStage

log = logging.getLogger("qpexp")
CACHE_VERSION = 2  # bump when a stage's training code changes what it produces


# -- helpers --------------------------------------------------------------------------------------
def resolve_threads(threads: int | None) -> int:
    """The torch thread count a run trains with: ``threads``, else ``$QPEXP_THREADS``, else all cores."""
    return threads or int(os.environ.get("QPEXP_THREADS", 0)) or (os.cpu_count() or 1)


def set_threads(threads: int | None) -> int:
    n = resolve_threads(threads)
    torch.set_num_threads(n)
    return n


def prune_key(prune: dict) -> dict:
    """The prune config as it determines the stage's result: settings that give the same masks share
    one key (unstructured ``l2`` scores each weight by ``|w|``, exactly as ``l1`` does)."""
    p = without_added_defaults("prune", dict(prune))
    if p.get("scope") != "auto":  # auto's setting does nothing then
        p.pop("auto_batches", None)
    short = {v: k for k, v in CRITERIA.items()}.get(p.get("criterion"), p.get("criterion"))
    if p.get("structure", "unstructured") == "unstructured" and short in ("l1", "l2"):
        p["criterion"] = "l1"
    return p


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    return correct / max(total, 1)


def git_sha() -> str | None:
    return git_state()[0]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "qpexp": __version__}
    for pkg in ("torch", "lightning", "hydra-core", "wandb", "torchmetrics", "torch-pruning", "onnxruntime"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


@contextmanager
def quiet_lightning():
    names = ["lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"]
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*is not a `torch.utils.data.DataLoader`.*")
        warnings.filterwarnings("ignore", ".*LightningDataModule.*")
        warnings.filterwarnings("ignore", ".*sanity.*")
        warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        try:
            yield
        finally:
            for n, lvl in old.items():
                logging.getLogger(n).setLevel(lvl)


def epoch_checkpoint(work_dir: Path, every_s: float):
    """A ModelCheckpoint that overwrites ``work_dir/last.ckpt`` at the end of an epoch (monitor=None,
    top-1; Lightning 2.6 writes ``save_last`` only when a top-k checkpoint was saved in the same step, so
    save_top_k=0 would save it only at the end), once ``every_s`` seconds passed since the last one (or
    since the stage started); 0: every epoch. Epoch ends only: a resumed stage replays whole epochs,
    so its result equals an uninterrupted one's from whichever epoch it resumes."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class EpochCheckpoint(ModelCheckpoint):
        def on_train_start(self, trainer, pl_module):
            self._qpexp_last = time.monotonic()
            return super().on_train_start(trainer, pl_module)

        def _should_skip_saving_checkpoint(self, trainer) -> bool:
            return super()._should_skip_saving_checkpoint(trainer) or (
                time.monotonic() - getattr(self, "_qpexp_last", -math.inf) < every_s
            )

        def _save_checkpoint(self, trainer, filepath: str) -> None:
            super()._save_checkpoint(trainer, filepath)
            self._qpexp_last = time.monotonic()

    return EpochCheckpoint(dirpath=work_dir, filename="last", save_top_k=1, enable_version_counter=False)


def fit(
    module, dm, epochs: int, work_dir: Path, logger, trainer_cfg: dict, checkpoint_every_s: float = 0.0
) -> float:
    """Train ``module`` for ``epochs`` (resuming from ``work_dir/last.ckpt``), keep its best epoch."""
    import lightning as L

    start = time.perf_counter()
    ckpt = epoch_checkpoint(work_dir, checkpoint_every_s)
    last = work_dir / "last.ckpt"
    opts = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": progress_bar_enabled(),  # interactive single runs only
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        **trainer_cfg,
    }
    with quiet_lightning():
        trainer = L.Trainer(max_epochs=epochs, logger=logger or False, callbacks=[ckpt], **opts)
        if last.exists():
            safe_torch_load(last)  # refuse a crafted checkpoint with a clear error before Lightning reads it
        trainer.fit(module, datamodule=dm, ckpt_path=str(last) if last.exists() else None, weights_only=True)
    module.select_best()
    return time.perf_counter() - start


def make_model(cfg: DictConfig, dm):
    """``cfg.model`` built for the data and checked on a batch of it (rules: :mod:`qpexp.build`)."""
    return build(cfg.model, dm)


def _code(code: dict[str, str] | None, stage: str) -> dict:
    return {"code": code[stage]} if code else {}


# -- the pipeline ---------------------------------------------------------------------------------
class Pipeline:
    def __init__(self, cfg: DictConfig, run_dir: str | Path, logger=None, typed: DictConfig | None = None):
        """``typed``: ``validate(cfg)`` when the caller has it already (the CLI: one validation per point)."""
        self.raw = cfg
        self.cfg = typed if typed is not None else validate(cfg)  # raises ConfigError before anything else
        self.run_dir = Path(run_dir)
        self.logger = logger
        c = self.cfg
        self.cache = StageCache(Path(c.cache_dir) if c.cache else None, self.run_dir)
        trainer = OmegaConf.to_container(c.trainer) if c.trainer is not None else {}
        self.trainer_cfg = {k: v for k, v in trainer.items() if k != "_target_"}
        self.threads = resolve_threads(c.threads)
        self._dm = None
        self._keys: dict[str, str] | None = None
        self._macs: dict = {}  # model_macs by model structure (a stage that changes no shape or width reuses it)

    def data(self):
        """The data module, prepared once (data errors surface here, before any training)."""
        if self._dm is None:
            dm = instantiate(self.cfg.data)
            dm.prepare()
            self._dm = dm
        return self._dm

    @property
    def keys(self) -> dict[str, str]:
        """Each stage's cache key: the config that determines it, the torch thread count it trains
        with (1 and 2 threads give different trajectories) and the data's content fingerprint beside
        its config (a file changed under the same ``data.path`` trains again) and, unless
        ``cache_code_fingerprint=false``, the fingerprint of the code behind the stage
        (:mod:`qpexp.run.codeprint`). Prepares the data."""
        if self._keys is None:
            c = self.cfg
            code = self.code_fingerprint
            base = {
                "v": CACHE_VERSION,
                "data": OmegaConf.to_container(c.data),
                "data_fingerprint": getattr(self.data(), "fingerprint", None),
                "model": OmegaConf.to_container(c.model),
                "baseline": OmegaConf.to_container(c.baseline),
                "trainer": self.trainer_cfg,
                "seed": c.seed,
                "threads": self.threads,
                **({"code": code["baseline"]} if code else {}),
            }
            keys = {"baseline": cache_key(base)}
            # distillation changes the training stages; alpha=0 leaves their keys as they were
            distill = {"distill": OmegaConf.to_container(c.distill)} if self.distill_on else {}
            prune = prune_key(OmegaConf.to_container(c.prune))
            keys["prune"] = cache_key(
                {
                    "base": keys["baseline"],
                    "prune": prune,
                    "threads": self.threads,
                    **distill,
                    **_code(code, "prune"),
                }
            )
            after = keys["prune"] if self.prune_on else keys["baseline"]
            # keys as before the settings added later existed, while they hold the old behaviour
            quant = without_added_defaults("quant", OmegaConf.to_container(c.quant))
            if c.quant.rounding == "nearest":  # adaround's settings do nothing then
                for k in ("rounding_batches", "rounding_iters"):
                    quant.pop(k, None)
            keys["qat"] = cache_key(
                {"base": after, "quant": quant, "threads": self.threads, **distill, **_code(code, "qat")}
            )
            self._keys = keys
        return self._keys

    @property
    def code_fingerprint(self) -> dict[str, str] | None:
        """Each stage's code fingerprint, or None with ``cache_code_fingerprint=false`` (keys as before)."""
        return code_fingerprints() if self.cfg.cache_code_fingerprint else None

    @property
    def prune_on(self) -> bool:
        return self.cfg.prune.ratio > 0

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(prune.n, prune.m)`` when the model is N:M-pruned (``prune.structure=nm``), else None."""
        c = self.cfg.prune
        return (c.n, c.m) if self.prune_on and c.structure == "nm" else None

    @property
    def distill_on(self) -> bool:
        return self.cfg.distill.alpha > 0

    @property
    def quant_on(self) -> bool:
        """QAT runs: weights not in float, and no analysis that stops before it."""
        a = self.cfg.analysis
        return self.cfg.quant.bits_w != 32 and not (a is not None and a.stop)

    def _fail_hook(self, stage: str) -> None:
        if self.cfg.fail_at == stage:
            raise RuntimeError(f"fail_at={stage}: deliberate failure (test hook)")

    # each stage: reuse the cache entry, else train it and fill the entry
    def _stage(self, name: str, module_fn, epochs: int, dm, model, record: dict) -> dict:
        """Run (or load) stage ``name``; its keys go into ``record``. Returns ``{"state", "meta"}``."""
        start = time.perf_counter()
        with stage_entry(self.cache, name, self.keys[name]) as entry:  # DDP: rank 0 writes
            loaded = entry.load_or_discard()  # None: missing, or damaged (moved aside, warned: retrain)
            hit = loaded is not None
            if hit:
                state, meta = loaded
                if state.get("structure") is not None:  # physically pruned channels
                    restore_structure(model, state["structure"], self.example)
                ensure_masks(model, state["model"])
                model.load_state_dict(state["model"])
            else:
                state, meta = self._train(name, module_fn, epochs, dm, model, entry)
        record[f"{name}/val_acc"] = meta["val_acc"]
        record[f"{name}/test_acc"] = meta["test_acc"]
        record[f"{name}/best_epoch"] = meta["best_epoch"]
        record[f"cache/{name}_hit"] = hit
        # the code that made the entry (None: cached before fingerprints existed)
        record[f"code/fingerprint/{name}"] = meta.get("code_fingerprint")
        if entry.moved_aside is not None:
            record[f"cache/{name}_moved_aside"] = str(entry.moved_aside)
        record[f"train_seconds/{name}"] = meta["train_seconds"]
        record[f"seconds/{name}"] = time.perf_counter() - start
        record[f"artifacts/{name}"] = str(entry.path)
        record.update(finish_stage(name, model))  # DDP: every rank holds the same model
        record.update(self._stage_measure(name, model))
        if self.logger is not None:
            self.logger.log_metrics(
                {f"{name}/val_acc": meta["val_acc"], f"{name}/test_acc": meta["test_acc"]}
            )
        return {"state": state, "meta": meta}

    def _train(self, name: str, module_fn, epochs: int, dm, model, entry) -> tuple[dict, dict]:
        """Train stage ``name`` (``epochs=0``: calibrate only), evaluate it and fill the cache entry."""
        self._fail_hook(name)
        module = module_fn()
        train_s = 0.0
        if epochs > 0:
            train_s = fit(
                module, dm, epochs, entry.work, self.logger, self.trainer_cfg, self.cfg.checkpoint_every_s
            )
        if epochs == 0 and hasattr(module, "calibrate"):
            module.calibrate(dm.loader("train", shuffle=False))
        if hasattr(module, "finalize"):
            module.finalize(self.example)
        meta = {
            "val_acc": evaluate(model, dm.loader("val")),
            "test_acc": evaluate(model, dm.loader("test")),
            "best_epoch": module.best_epoch if epochs > 0 else -1,
            "train_seconds": train_s,
            "epochs": epochs,
            "code_fingerprint": code_fingerprints()[name],
            **getattr(module, "stage_meta", lambda: {})(),
        }
        state = {"model": clone_state(model)}
        state.update(getattr(module, "stage_state", lambda: {})())
        entry.save(state, meta)
        for f in entry.work.glob("*.ckpt"):
            f.unlink(missing_ok=True)  # DDP: every rank clears the same folder
        return state, meta

    def _stage_measure(self, name: str, model) -> dict:
        """Each stage's model, counted as the final one; the last stage's count is the final record."""
        snap = self.last_measure = self.measure(model, self.example, self.dense_bits)
        keys = ("sparsity", "zero_fraction", "params", "bits_w", "bits_a", "size_bits", "compression_ratio")
        return {f"{name}/{k}": snap[f"final/{k}"] for k in keys}

    def run(self) -> dict:
        """Every stage in turn; each owns its calls into the core and hands back a record fragment
        (the model is one object, changed in place by the stages)."""
        t0 = time.perf_counter()
        threads = set_threads(self.threads)
        dm = self.data()  # data errors surface here, before any training
        import lightning as L

        L.seed_everything(self.cfg.seed, workers=False, verbose=False)
        model = make_model(self.cfg, dm)
        record: dict = {"status": "running", "seed": self.cfg.seed, "threads": threads}
        record.update(self._dense(model, dm))
        base = self._stage(
            "baseline", lambda: self._baseline_module(model, dm), self._baseline_epochs, dm, model, record
        )
        distiller, frag = self._distiller(model, dm)
        record.update(frag)
        if self.prune_on:
            record.update(self._prune(model, dm, base, distiller, record))
        if self.cfg.analysis is not None:  # on the model before QAT (baseline or pruned, from the cache)
            record.update(self._analysis(model, dm))
        if self.quant_on:
            record.update(self._quantize(model, dm, distiller, record))
        record.update(self._final(model, record))
        status = self.deploy(model, dm, record)
        record["seconds/total"] = time.perf_counter() - t0
        record["status"] = status
        return record

    def _dense(self, model, dm) -> dict:
        """The dense model's counts and the checks that refuse a config before any training."""
        c = self.cfg
        example = self.example = dm.splits["val"][0][:1]
        # the deployable fp32 model: BatchNorm folded, as the compressed model counts it
        self.dense_bits = deployable_size_bits(model, example)
        # dense prunable weights per layer: sparsity counts physically removed channels as pruned
        self.dense_weights = {v.name: v.weight.numel() for v in layer_views(model)}
        self.dense_prunable = prunable_params(model)
        frag: dict = {"data/fingerprint": getattr(dm, "fingerprint", None)}
        if self.prune_on and c.prune.get("quality"):  # layer names checked before training
            try:
                check_quality(model, prune_config(c.prune))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.prune_on and c.prune.structure == "channel":  # refuse what it cannot prune, before training
            frag["prune/frozen"] = check_channel_pruning(model, example)
        frag["dense/params"] = count_params(model)[0]
        frag["dense/macs"] = self.macs(model, example)["macs"]
        return frag

    @property
    def _baseline_epochs(self) -> int:
        return self.cfg.baseline.epochs if self.cfg.baseline.enabled else 0

    def _baseline_module(self, model, dm):
        b = self.cfg.baseline
        return BaselineStage(
            model,
            dm.num_classes,
            lr=b.lr,
            epochs=b.epochs,
            weight_decay=b.weight_decay,
            min_lr_frac=b.min_lr_frac,
            label_smoothing=b.label_smoothing,
            rewind_epoch=b.rewind_epoch,
        )

    def _distiller(self, model, dm) -> tuple[Distiller | None, dict]:
        """The teacher (the baseline stage's model, trained or from the cache) for the later stages."""
        c = self.cfg
        frag = {"distill/alpha": c.distill.alpha, "distill/temperature": c.distill.temperature}
        if not (self.distill_on and (self.prune_on or self.quant_on)):
            return None, frag
        teacher = make_teacher(model)
        frag["distill/teacher_test_acc"] = evaluate(teacher, dm.loader("test"))
        frag["distill/precomputed"] = precompute(teacher, dm)  # else: the teacher runs per batch
        return Distiller(teacher, c.distill.alpha, c.distill.temperature), frag

    def _prune(self, model, dm, base: dict, distiller, record: dict) -> dict:
        """Iterative prune-and-finetune: the stage's keys, its stop, targets and sparsity curve."""
        c = self.cfg
        pc = prune_config(c.prune)
        pc.seed = c.seed
        rewind = base["state"].get("rewind", {}).get(c.prune.rewind) if c.prune.rewind else None
        pruner = None
        if pc.structure == "channel":
            pruner = channel_prune_step
        if pc.method == "sparsegpt":
            pruner = sparsegpt_step
        epochs = (1 if pc.schedule == "oneshot" else pc.steps) * c.prune.finetune_epochs

        def make_prune():
            return PruneStage(
                model,
                dm.num_classes,
                lr=c.prune.lr,
                epochs=epochs,
                weight_decay=c.prune.weight_decay,
                label_smoothing=c.prune.label_smoothing,
                prune=pc,
                finetune_epochs=c.prune.finetune_epochs,
                max_acc_drop=c.prune.max_acc_drop,
                reference_val=record["baseline/val_acc"],
                rewind_state=rewind,
                agp_dt=c.prune.agp_dt,
                pruner=pruner,
                distiller=distiller,
            )

        frag: dict = {}
        meta = self._stage("prune", make_prune, epochs, dm, model, frag)["meta"]
        for k in ("stopped_at_step", "stop_reason", "steps_planned", "targets", "realized_ratio"):
            if k in meta:
                frag[f"prune/{k}"] = meta[k]
        frag["prune/target_ratio"] = c.prune.ratio
        frag["prune/method"] = c.prune.method
        frag["prune/criterion"] = c.prune.criterion
        frag["prune/mode"] = "oneshot" if c.prune.finetune_epochs == 0 else "finetune"
        frag.update(oneshot_keys("prune", meta))
        for layer, n in meta.get("units_removed", {}).items():  # prune.compact: dead units removed
            frag[f"prune/units_removed/{layer}"] = n
        for point in meta.get("curve", []):  # every step's candidate: the sparsity curve
            for k in ("sparsity", "val_acc", "test_acc"):
                frag[f"prune/curve/{point['step']}/{k}"] = point[k]
        return frag

    def _analysis(self, model, dm) -> dict:
        """Per-layer sensitivity of the model before QAT, and its plot in the run folder."""
        c = self.cfg
        pc = prune_config(c.prune)
        pc.seed = c.seed
        a = c.analysis
        frag = sensitivity(
            model, dm, quant_config(c.quant), pc, list(a.widths), list(a.ratios), self.example, pc.structure
        )
        plot_sensitivity(frag, self.run_dir / "sensitivity.png")
        return frag

    def _quantize(self, model, dm, distiller, record: dict) -> dict:
        """Mixed-precision widths (bits_w=auto), prepare, then QAT or PTQ as a cached stage."""
        c = self.cfg
        qcfg = quant_config(c.quant)
        frag: dict = {}
        if c.quant.bits_w == "auto":  # per-layer widths within the size budget, then QAT
            assignment, mp = mixed_precision(model, dm, qcfg, c.quant, self.dense_bits, self.example)
            frag.update(mp)
            qcfg.overrides = dict(assignment)
        quantize_(model, qcfg, example=self.example)
        frag["quant/float_ops"] = ",".join(float_ops(model))  # what stays float: softmax, LayerNorm, ...
        meta = self._stage(
            "qat", lambda: self._qat_module(model, dm, distiller), c.quant.epochs, dm, model, frag
        )["meta"]
        frag["quant/rounding"] = c.quant.rounding
        for k in ("rounding_seconds", "rounding_changed"):
            if k in meta:
                frag[f"quant/{k}"] = meta[k]
        frag.update(oneshot_keys("quant", meta))
        frag["final/quant_mode"] = "qat" if c.quant.epochs > 0 else "ptq"
        return frag

    def _qat_module(self, model, dm, distiller):
        q = self.cfg.quant
        return QATStage(
            model,
            dm.num_classes,
            lr=q.lr,
            epochs=max(q.epochs, 1),
            weight_decay=q.weight_decay,
            label_smoothing=q.label_smoothing,
            calib_batches=q.calib_batches,
            distiller=distiller,
            rounding=q.rounding,
            rounding_batches=q.rounding_batches,
            rounding_iters=q.rounding_iters,
            gptq={
                "damp": q.gptq_damp,
                "block": q.gptq_block,
                "act_order": q.gptq_act_order,
                "sequential": q.calib_sequential,
            },
        )

    def _final(self, model, record: dict) -> dict:
        """The final model's keys: the last stage's accuracy and counts, the N:M size, the budget."""
        last = "qat" if self.quant_on else "prune" if self.prune_on else "baseline"
        frag = {"final/val_acc": record[f"{last}/val_acc"], "final/test_acc": record[f"{last}/test_acc"]}
        frag.update(self.last_measure)
        if self.nm is not None:  # the N:M layout's size, beside the stored one
            frag["final/size_bits_nm"] = size_bits(model, nm=self.nm)
            frag["final/compression_ratio_nm"] = self.dense_bits / frag["final/size_bits_nm"]
        # bits_w=auto: the final honest size against the budget the widths were chosen for
        if "quant/budget_bits" in record:
            frag["quant/budget_met"] = frag["final/size_bits"] <= record["quant/budget_bits"]
        return frag

    def deploy(self, model, dm, record: dict) -> str:
        """The deployment check of the final model (integer file, ONNX) and the point's status:
        ``ok`` only when a check ran and passed, ``not_deployed`` when none ran (export disabled, no
        quantization), ``deploy_mismatch``/``deploy_error`` (see :func:`qpexp.deploy.deploy_status`).
        The point's accuracy stands in every case; ``status_reason`` says why it is not ``ok``."""
        c = self.cfg
        if self.quant_on and c.export.enabled:
            start = time.perf_counter()
            record.update(deploy(model, dm, self.run_dir / "deploy", c.export, record, nm=self.nm))
            record["seconds/deploy"] = time.perf_counter() - start
        record["deploy/checks"] = deploy_checks(record)
        status, why = deploy_status(record, record["final/test_acc"], c.export.max_acc_diff)
        if status == "not_deployed":
            why = (
                "export.enabled=false"
                if self.quant_on
                else "no quantized model (quantization off or analysis.stop)"
            )
            why = f"not deployed: {why}"
        if status != "ok":  # the point keeps its accuracy; the status and the reason say what broke
            record["status_reason"] = why
            if status != "not_deployed":
                log.warning("%s: %s", status, why)
        return status

    def macs(self, model, example, views=None) -> dict:
        """``model_macs``, counted again only when the structure changed: the module tree (names and
        types), every parameter's and buffer's shape, each layer's weight and activation width and the
        example's shape (what MACs and BOPs depend on; unstructured zeros do not change them)."""
        views = layer_views(model) if views is None else views
        key = (
            tuple((n, type(m).__qualname__) for n, m in model.named_modules()),
            tuple((n, tuple(t.shape)) for n, t in [*model.named_parameters(), *model.named_buffers()]),
            tuple((v.name, v.bits_w, v.bits_a) for v in views),
            tuple(example.shape),
        )
        if key not in self._macs:
            self._macs[key] = model_macs(model, example)
        return self._macs[key]

    @torch.no_grad()
    def measure(self, model, example, dense_bits: int) -> dict:
        total, rows, other = deployable_size_bits(model, example, detail=True)
        params, nonzero = count_params(model)
        views = layer_views(model)
        macs = self.macs(model, example, views)
        bw = {v.bits_w for v in views}
        ba = {v.bits_a for v in views}
        weights = {v.name: v.weight.numel() for v in views}
        n = sum(weights.values())
        dense = getattr(self, "dense_weights", None) or weights
        nnz = {v.name: int(v.weight.count_nonzero()) for v in views}
        out = {
            # pruned (zero latent weights, removed channels) of the dense model's prunable weights
            "final/sparsity": pruned_fraction(model, dense_params=getattr(self, "dense_prunable", None)),
            # exact zeros of the stored weights after quantization (what the size accounting sees)
            "final/zero_fraction": zero_fraction(model),
            "final/params": params,
            "final/nonzero_params": nonzero,
            "final/bits_w": bw.pop() if len(bw) == 1 else sum(v.bits_w * weights[v.name] for v in views) / n,
            "final/bits_a": ba.pop() if len(ba) == 1 else max(ba),
            "final/size_bits": total,
            "dense/size_bits": dense_bits,
            "final/compression_ratio": dense_bits / total,
            "final/macs": macs["macs"],
            "final/bops": macs["bops"],
            "size/other_bits": other,
        }
        # entropy-coded size and the paper's-way ratios beside the honest fixed-width count
        out.update(huffman_record(model, dense_bits, getattr(self, "dense_prunable", None)))
        for name in weights:  # zero or physically removed, of the dense layer's weights
            out[f"layers/{name}/sparsity"] = 1 - nnz[name] / dense.get(name, weights[name])
        for name, r in rows.items():
            out[f"layers/{name}/format"] = r["format"]
            out[f"layers/{name}/bits_w"] = next(v.bits_w for v in views if v.name == name)
            out[f"size/{name}/weight_bits"] = r["weight_bits"]
            out[f"size/{name}/qparam_bits"] = r["qparam_bits"]
            out[f"size/{name}/bias_bits"] = r["bias_bits"]
        return out


def oneshot_keys(section: str, meta: dict) -> dict:
    """One-shot methods' timing in the record: the calibration passes, the compression, a plain
    forward pass over the same batches, and per layer its seconds and statistics' bytes."""
    out = {f"{section}/{k}": meta[k] for k in meta if k.startswith("oneshot_") and k != "oneshot_layers"}
    for name, d in meta.get("oneshot_layers", {}).items():
        for k, v in d.items():
            out[f"{section}/oneshot/{name}/{k}"] = v
    if meta.get("nearest_only"):
        out[f"{section}/nearest_only"] = ",".join(meta["nearest_only"])
    return out


def config_hash(cfg: DictConfig) -> str:
    return cache_key(plain_config(cfg))


def complete_record(run_dir: Path, cfg: DictConfig) -> dict | None:
    """The run's record if it completed with this exact config (a re-run then trains nothing)."""
    path = Path(run_dir) / "record.json"
    if not path.exists():
        return None
    try:
        rec = read_json(path)
    except ValueError:
        return None
    return (
        rec if rec.get("status") in ACCURACY_STANDS and rec.get("config_hash") == config_hash(cfg) else None
    )


def write_record(run_dir: Path, record: dict) -> None:
    atomic_write_json(Path(run_dir) / "record.json", record)


def base_record(cfg: DictConfig) -> dict:
    """The record's provenance: config, git state (``code/git_dirty``: tracked files differ from
    ``code/git_sha``; both None outside a git checkout) and library versions."""
    sha, dirty = git_state()
    return {
        "config": plain_config(cfg),
        "config_hash": config_hash(cfg),
        "git_sha": sha,
        "code/git_sha": sha,
        "code/git_dirty": dirty,
        "code/cache_fingerprint": bool(cfg.get("cache_code_fingerprint", True)),
        "versions": versions(),
        "hostname": platform.node(),
    }
