"""Typed schema of the run config, checked before anything trains.

Unknown keys (a typo like ``prune.ration``), wrong types and out-of-range values raise
:class:`ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from qpexp.core.prune import PruneConfig
from qpexp.core.quant import QuantConfig, QuantSpec
from qpexp.core.quant.spec import GROUP_SIZE
from qpexp.errors import ConfigError


@dataclass
class BaselineSchema:
    enabled: bool = True
    epochs: int = 150
    lr: float = 1e-2
    weight_decay: float = 0.0
    min_lr_frac: float = 0.0
    label_smoothing: float = 0.1
    rewind_epoch: int = 1


@dataclass
class PruneSchema:
    ratio: float = 0.5
    scope: str = "global"
    criterion: str = "l1"
    structure: str = "unstructured"
    schedule: str = "geometric"
    steps: int = 3
    min_keep_frac: float = 0.01
    min_keep_channels: int = 1
    first_ratio: float | None = None
    last_ratio: float | None = None
    taylor_batches: int = 8
    taylor_mode: str = "squared"
    auto_batches: int = 8
    quality: Any = None  # {layer: q}: per-layer qualities (Han et al. 2015), scope=global
    compact: bool = False  # remove the units unstructured pruning left dead
    finetune_epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    max_acc_drop: float | None = None
    rewind: str | None = None
    agp_dt: int = 35
    method: str = "mask"
    n: int = 2
    m: int = 4
    calib_batches: int = 8
    calib_sequential: bool = True
    damp: float = 0.01
    block: int = 128


@dataclass
class ActSchema:
    scheme: str = "linear"
    granularity: str = "tensor"
    symmetric: bool = False
    range: str = "minmax"
    ema_decay: float = 0.9


@dataclass
class QuantSchema:
    bits_w: Any = 4  # an int, or "auto": per-layer widths within target_ratio / budget_bits
    bits_a: int = 8
    scheme: str = "linear"
    granularity: str = "channel"
    group_size: int = GROUP_SIZE  # granularity=group: input elements per scale
    symmetric: bool = True
    narrow_range: bool = True
    range: str = "minmax"
    ema_decay: float = 0.9
    act: ActSchema = field(default_factory=ActSchema)
    first_bits: int | None = None
    last_bits: int | None = None
    overrides: dict[str, int] = field(default_factory=dict)
    fold_bn: bool = True
    bias_bits: int = 32  # 8 | 16 | 32: biases as stored (scheme=codebook only; qpexp.core.quant.bias)
    table_bits: int = 32  # 16 | 32: codebook centroids in float16 or fp32 (scheme=codebook only)
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    calib_batches: int = 10
    target_ratio: float | None = None  # bits_w=auto: final/compression_ratio to reach (> 1)
    budget_bits: int | None = None  # bits_w=auto: or the size budget itself, in bits
    rounding: str = "nearest"
    rounding_batches: int = 8
    rounding_iters: int = 500
    gptq_damp: float = 0.01
    gptq_block: int = 128
    gptq_act_order: bool = False
    calib_sequential: bool = True


@dataclass
class AnalysisSchema:
    kind: str = "sensitivity"
    widths: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    ratios: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.9])
    stop: bool = True  # stop after the analysis (no QAT)


@dataclass
class DistillSchema:
    alpha: float = 0.0
    temperature: float = 4.0


@dataclass
class ExportSchema:
    enabled: bool = True
    onnx: bool = True
    latency_batches: int = 50
    max_acc_diff: float = 0.002  # onnxruntime vs fake-quantized test accuracy; beyond it: deploy_mismatch


@dataclass
class FrontierSchema:
    # the record key that chooses (Pareto flags, best ratio within N points, hypervolume); the test
    # accuracy of what it chooses is reported beside it (qpexp.frontier)
    select: str = "final/val_acc"
    include_failed_deploy: bool = False  # let deploy_mismatch / deploy_error points onto the front


@dataclass
class RootSchema:
    seed: int = 0
    threads: int | None = None
    cache: bool = True
    cache_dir: str = "outputs/cache"
    cache_code_fingerprint: bool = True  # the code behind a stage in its cache key (qpexp.run.codeprint)
    name: str = "qpexp"
    data: Any = None
    model: Any = None
    baseline: BaselineSchema = field(default_factory=BaselineSchema)
    prune: PruneSchema = field(default_factory=PruneSchema)
    quant: QuantSchema = field(default_factory=QuantSchema)
    distill: DistillSchema = field(default_factory=DistillSchema)
    export: ExportSchema = field(default_factory=ExportSchema)
    frontier: FrontierSchema = field(default_factory=FrontierSchema)
    analysis: AnalysisSchema | None = None
    logger: Any = None
    trainer: Any = None
    fail_at: str | None = None  # test hook: raise inside the named stage
    checkpoint_every_s: float = 10.0  # a stage's resume checkpoint at an epoch end this long after the last


def _err(e: OmegaConfBaseException) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).split("\n")[0]
    if isinstance(e, MissingMandatoryValue) or "Missing mandatory value" in msg:  # `???` left unset
        missing = msg.partition("Missing mandatory value: ")[2].strip() or key  # also via an interpolation
        return ConfigError(f"config key {missing!r} is required and not set (add {missing}=VALUE)")
    return ConfigError(f"config key {key!r}: {msg}" if key else f"config: {msg}")


def plain_config(cfg: DictConfig) -> dict:
    """The resolved config as plain containers, without Hydra's own node."""
    keys = [k for k in cfg.keys() if k != "hydra"]
    try:
        return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)
    except OmegaConfBaseException as e:
        raise _err(e) from None


def typed(cfg: DictConfig) -> DictConfig:
    """Merge ``cfg`` (without its hydra node) into the typed schema."""
    plain = plain_config(cfg)
    for k in ("sweep", "experiment"):
        plain.pop(k, None)
    try:
        return OmegaConf.merge(OmegaConf.structured(RootSchema), plain)
    except OmegaConfBaseException as e:
        raise _err(e) from None


def prune_config(p) -> PruneConfig:
    names = {f.name for f in fields(PruneConfig)}
    return PruneConfig(**{k: v for k, v in OmegaConf.to_container(p).items() if k in names})


AUTO = "auto"
AUTO_BITS = 8  # quant.bits_w=auto: the width of weights the assignment does not cover


def quant_config(q) -> QuantConfig:
    """The core's settings; with ``bits_w=auto`` weights at ``AUTO_BITS`` until widths are assigned."""
    bits = AUTO_BITS if q.bits_w == AUTO else q.bits_w
    weight = QuantSpec(
        bits,
        q.scheme,
        q.granularity,
        q.symmetric,
        q.range,
        q.ema_decay,
        q.narrow_range,
        q.group_size,
        q.table_bits,
    )
    act = QuantSpec(q.bits_a, q.act.scheme, q.act.granularity, q.act.symmetric, q.act.range, q.act.ema_decay)
    return QuantConfig(weight, act, q.first_bits, q.last_bits, dict(q.overrides), q.fold_bn, q.bias_bits)


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: DictConfig) -> DictConfig:
    """Check everything that can be checked without data; return the typed config."""
    t = typed(cfg)
    check_auto_bits(t.quant)
    check_analysis(t.analysis)
    try:
        prune_config(t.prune).validate()
        quant_config(t.quant).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _positive("baseline.epochs", t.baseline.epochs)
    _positive("baseline.lr", t.baseline.lr)
    _positive("prune.finetune_epochs", t.prune.finetune_epochs, allow_zero=True)  # 0: one-shot
    if t.prune.finetune_epochs == 0 and t.prune.scope == "auto":
        raise ConfigError(
            "prune.scope=auto measures validation loss between steps: it needs prune.finetune_epochs > 0"
        )
    _positive("prune.lr", t.prune.lr)
    _positive("quant.epochs", t.quant.epochs, allow_zero=True)
    _positive("quant.lr", t.quant.lr)
    _positive("quant.calib_batches", t.quant.calib_batches)
    check_rounding(t.quant)
    if not 0.0 <= t.distill.alpha <= 1.0:
        raise ConfigError(f"distill.alpha={t.distill.alpha!r} must lie in [0, 1] (0: no distillation)")
    _positive("distill.temperature", t.distill.temperature)
    if t.distill.alpha > 0 and not t.baseline.enabled:
        raise ConfigError(
            f"distill.alpha={t.distill.alpha} needs the trained baseline as its teacher, but "
            "baseline.enabled=false: set baseline.enabled=true or distill.alpha=0"
        )
    if t.prune.rewind not in (None, "init", "epoch"):
        raise ConfigError(f"prune.rewind={t.prune.rewind!r} must be null, 'init' or 'epoch'")
    if t.prune.max_acc_drop is not None:
        _positive("prune.max_acc_drop", t.prune.max_acc_drop, allow_zero=True)
    if t.threads is not None:
        _positive("threads", t.threads)
    _positive("checkpoint_every_s", t.checkpoint_every_s, allow_zero=True)
    if not (t.frontier.select.startswith(("final/", "baseline/")) and t.frontier.select.endswith("_acc")):
        raise ConfigError(
            f"frontier.select={t.frontier.select!r} must name a record's accuracy key, "
            "e.g. final/val_acc (the default) or final/test_acc"
        )
    for key in ("data", "model"):
        node = t[key]
        if isinstance(node, DictConfig) and OmegaConf.is_missing(node, "_target_"):
            raise ConfigError(
                f"{key}._target_ is missing: name what builds it ({key}._target_=my_pkg.module.Name)"
            )
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"{key}: needs a config with _target_ (choose one with {key}=NAME)")
    _check_target("model", t.model)  # imports torch only
    check_data_path(t.data)  # a missing file is refused before the data module (Lightning) is imported
    _check_target("data", t.data)  # the data module imports Lightning: checked last
    return t


def check_auto_bits(q: DictConfig) -> None:
    """``quant.bits_w``: an integer width or ``auto`` (then ``quant.target_ratio`` > 1 or
    ``quant.budget_bits`` > 0, and no hand-set per-layer widths); the budget keys only with ``auto``."""
    b = q.bits_w
    if isinstance(b, str) and b != AUTO or isinstance(b, bool) or not isinstance(b, (int, str)):
        raise ConfigError(f"quant.bits_w={b!r} must be an integer width or 'auto'")
    if b != AUTO:
        for key in ("target_ratio", "budget_bits"):
            if q[key] is not None:
                raise ConfigError(f"quant.{key}={q[key]!r} is only used with quant.bits_w=auto")
        return
    if (q.target_ratio is None) == (q.budget_bits is None):
        raise ConfigError(
            "quant.bits_w=auto needs exactly one of quant.target_ratio (e.g. quant.target_ratio=14) "
            "and quant.budget_bits"
        )
    if q.target_ratio is not None and not q.target_ratio > 1:
        raise ConfigError(f"quant.target_ratio={q.target_ratio!r} must be > 1")
    if q.budget_bits is not None:
        _positive("quant.budget_bits", q.budget_bits)
    for key in ("first_bits", "last_bits"):
        if q[key] is not None:
            raise ConfigError(f"quant.{key}={q[key]!r}: quant.bits_w=auto chooses every layer's width")
    if q.overrides:
        raise ConfigError("quant.overrides: quant.bits_w=auto chooses every layer's width; leave it {}")


def check_analysis(a: DictConfig | None) -> None:
    if a is None:
        return
    if a.kind != "sensitivity":
        raise ConfigError(f"analysis.kind={a.kind!r} is unknown: use 'sensitivity'")
    if not a.widths and not a.ratios:
        raise ConfigError("analysis.widths and analysis.ratios are both empty: nothing to measure")
    for b in a.widths:
        try:
            QuantSpec(bits=b).validate("analysis", "analysis.widths")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    for r in a.ratios:
        if not 0 < r < 1:
            raise ConfigError(f"analysis.ratios: {r!r} must lie in (0, 1)")


def check_rounding(q) -> None:
    if q.rounding not in ("nearest", "adaround", "gptq"):
        raise ConfigError(f"quant.rounding={q.rounding!r} is unknown: use 'nearest', 'adaround' or 'gptq'")
    _positive("quant.rounding_batches", q.rounding_batches)
    _positive("quant.rounding_iters", q.rounding_iters)
    _positive("quant.gptq_damp", q.gptq_damp, allow_zero=True)
    if not isinstance(q.gptq_block, int) or q.gptq_block < 1:
        raise ConfigError(f"quant.gptq_block={q.gptq_block!r} must be an integer >= 1")
    if q.rounding == "nearest" or q.bits_w == 32:
        return
    if q.rounding == "adaround" and q.granularity == "group":
        raise ConfigError(
            "quant.granularity=group is not supported with quant.rounding=adaround (its rounding "
            "variables are learned against per-tensor/per-channel grids): use quant.rounding=gptq or nearest"
        )
    # quant.epochs > 0: the rounded weights are QAT's starting point (PTQ, then a short QAT)
    if q.scheme != "linear":
        raise ConfigError(f"quant.rounding={q.rounding} supports quant.scheme=linear only (got {q.scheme!r})")


def check_data_path(data: DictConfig) -> None:
    """A ``data.path`` that names nothing on disk (unless the source downloads it): refused before
    the data module (and Lightning) is imported; the data source itself checks the file's content."""
    path = data.get("path")
    if path is None or OmegaConf.select(data, "source.download", default=False):
        return
    if not Path(str(path)).expanduser().exists():
        raise ConfigError(f"data.path={str(path)!r}: file not found")


def locate(target: str, key: str):
    """The object a ``_target_`` names (``package.module.attr[.attr]``), or a ConfigError naming ``key``.

    Unlike ``hydra.utils.get_object`` it logs nothing; a module that exists but fails to import
    (a missing dependency) is reported as such, not as a wrong name.
    """
    parts = target.split(".") if isinstance(target, str) else []
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"{key}={target!r} must be a dotted path such as package.module.function")
    for i in range(len(parts) - 1, 0, -1):
        mod = ".".join(parts[:i])
        try:
            obj = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and (mod == e.name or mod.startswith(e.name + ".")):
                continue  # this prefix is no module: try a shorter one
            raise ConfigError(f"{key}={target!r}: importing {mod} failed ({e})") from e
        except Exception as e:
            raise ConfigError(f"{key}={target!r}: importing {mod} failed ({type(e).__name__}: {e})") from e
        for j, attr in enumerate(parts[i:], start=i):
            if not hasattr(obj, attr):
                where = ".".join(parts[:j])
                raise ConfigError(f"{key}={target!r}: {where} has no attribute {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise ConfigError(f"{key}={target!r}: no module named {parts[0]!r}")


def _check_target(key: str, node: DictConfig) -> None:
    if not callable(locate(node._target_, f"{key}._target_")):
        raise ConfigError(f"{key}._target_={node._target_!r} is not callable")
