"""Building the model from ``cfg.model``, and checking it on the data before anything trains.

``model._target_`` names any callable that returns an ``nn.Module``: a class or a function, built-in
(``qpexp.archs.resnet20``) or the user's (``my_pkg.nets.MyNet``, ``timm.create_model``,
``torchvision.models.resnet18``). The rule for its arguments:

1. every key of the model config except ``_target_``/``_partial_`` is passed by name
   (``+model.num_classes=10``, ``+model.model_name=resnet18``; nested ``_target_`` nodes are built);
2. ``input_shape`` (the data's per-sample shape, a tuple) and ``num_classes`` are passed too when
   the callable's signature has a parameter of exactly that name that the config does not set.
   A callable that takes them as ``**kwargs`` only (``timm.create_model``, torchvision builders)
   gets them from the config: ``+model.num_classes=10``.

Start a user model from ``model=custom`` (only ``_target_``) so that no key of the default model's
config is passed along: ``qpexp model=custom model._target_=my_pkg.MyNet +model.width=32``.

Before training, the built model runs one sample batch in eval mode and must return logits of
shape ``(batch, num_classes)``; any failure is a :class:`~qpexp.schema.ConfigError` of one line,
``model._target_=<target>: <error>``, raised before the baseline trains.
"""

from __future__ import annotations

import inspect

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qpexp.core.prune.channel import ChannelPruningError, dry_run
from qpexp.run.schema import ConfigError

DATA_ARGS = ("input_shape", "num_classes")


def _line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {msg[:400]}"


def _fail(target: str, what: str) -> ConfigError:
    return ConfigError(f"model._target_={target}: {what}")


def _accepts(fn) -> set[str]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n for n, p in params.items() if p.kind in kinds}


def build_model(node: DictConfig, input_shape, num_classes: int) -> nn.Module:
    """The model of config ``node`` for samples of ``input_shape`` and ``num_classes`` classes."""
    from hydra.utils import instantiate

    target = str(OmegaConf.select(node, "_target_", default=None))
    try:
        factory = instantiate(node, _partial_=True)
    except Exception as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        raise _fail(target, _line(cause)) from None
    given = set(node.keys())
    accepted = _accepts(factory)
    extra = {"input_shape": tuple(int(s) for s in input_shape), "num_classes": int(num_classes)}
    extra = {k: v for k, v in extra.items() if k in accepted and k not in given}
    try:
        model = factory(**extra)
    except Exception as e:
        hint = ""
        keys = sorted(k for k in given if not k.startswith("_"))
        if isinstance(e, TypeError) and keys:
            hint = f" (the model config passes {keys}; start from model=custom to pass only your own keys)"
        raise _fail(target, _line(e) + hint) from None
    if not isinstance(model, nn.Module):
        raise _fail(target, f"returned {type(model).__name__}, not an nn.Module")
    return model


@torch.no_grad()
def check_model(model: nn.Module, target: str, sample: torch.Tensor, num_classes: int) -> None:
    """Run ``sample`` (a small batch of the data) through ``model`` in eval mode; the logits must be
    ``(batch, num_classes)``. The model's state is unchanged (eval mode updates no statistics)."""
    was = model.training
    model.eval()
    try:
        out = model(sample)
    except Exception as e:
        raise _fail(target, f"fails on a batch of shape {tuple(sample.shape)}: {_line(e)}") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor):
        raise _fail(target, f"returns {type(out).__name__}; the pipeline needs a logits tensor")
    want = (sample.shape[0], num_classes)
    if tuple(out.shape) != want:
        hint = " (pass the class count, e.g. +model.num_classes=" + str(num_classes) + ")"
        raise _fail(target, f"returns logits of shape {tuple(out.shape)} for a batch of shape "
                            f"{tuple(sample.shape)}, expected {want}{hint if out.dim() == 2 else ''}")  # fmt: skip
    if not torch.isfinite(out).all():
        raise _fail(target, "returns non-finite logits on a batch of the data")


def make_model(node: DictConfig, dm) -> nn.Module:
    """Build ``cfg.model`` for the data module ``dm`` and check it on two samples of its data."""
    model = build_model(node, dm.input_shape, dm.num_classes)
    x = dm.splits["val"][0][:2]
    check_model(model, str(node.get("_target_")), x, dm.num_classes)
    return model


def check_channel_pruning(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Refuse (ConfigError naming the module) a model whose channels cannot be pruned; return the
    groups left unpruned by design, ``{root layer: reason}``."""
    import copy

    try:
        return dry_run(copy.deepcopy(model), example)
    except ChannelPruningError as e:
        raise ConfigError(f"prune.structure=channel: {e}") from None
