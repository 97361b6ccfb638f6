"""Prepare phase: wrap every conv/linear layer with a weight and an input-activation quantizer."""

from __future__ import annotations

import fnmatch
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from qpexp.core.modules import CONV, CONV_LINEAR
from qpexp.core.quant.spec import SCHEMES, QuantConfig, QuantSpec
from qpexp.core.resolve import resolve
from qpexp.core.warning import QpexpWarning


class QuantLayer(nn.Module):
    """A conv or linear layer whose input and weight pass through fake quantizers.

    The wrapped layer keeps its parameters and buffers (pruning masks included) under ``layer.``.
    ``bq`` (``quant.bias_bits`` < 32, :mod:`qpexp.core.quant.bias`) rounds the bias as it is stored.
    """

    def __init__(
        self, layer: nn.Module, wq: nn.Module | None, aq: nn.Module | None, bq: nn.Module | None = None
    ):
        super().__init__()
        self.layer = layer
        self.wq = wq
        self.aq = aq
        self.bq = bq

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's (latent, float) weight: code that reads ``.weight`` keeps working."""
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = self._modules  # one attribute read instead of nn.Module.__getattr__ per submodule
        layer, aq, wq = mods["layer"], mods.get("aq"), mods.get("wq")  # None is a plain attribute
        if aq is not None:
            x = aq(x)
        w = layer.weight
        if wq is not None:
            w = wq(w)
        b, bq = layer.bias, mods.get("bq")
        if bq is not None and b is not None:
            b = bq(b)
        if isinstance(layer, nn.Linear):
            return F.linear(x, w, b)
        return layer._conv_forward(x, w, b)


def is_quant_layer(m: nn.Module) -> bool:
    """Whether ``m`` is a quantization wrapper (its conv/linear under ``.layer``, quantizers ``wq``, ``aq``)."""
    return isinstance(m, QuantLayer)


def make_quantizer(
    spec: QuantSpec, is_weight: bool, channels: int = 1, row_size: int = 0
) -> nn.Module | None:
    """A quantizer of ``spec``; ``row_size``: a weight's elements per output channel (``granularity=group``
    sizes its scales from it)."""
    if not spec.enabled:
        return None
    cls = resolve(spec.scheme, SCHEMES, "quant.scheme" if is_weight else "quant.act.scheme")
    if spec.granularity == "group":
        return cls(spec, is_weight=is_weight, channels=channels, ch_axis=0, row_size=row_size)
    return cls(spec, is_weight=is_weight, channels=channels, ch_axis=0)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv/linear layers in forward-definition order (first and last are the ends of this list)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CONV_LINEAR)]


def fold_pair(conv: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` (eval statistics) into the conv that feeds it, in place.

    ``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.
    """
    with torch.no_grad():
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(std)
        beta = bn.bias if bn.affine else torch.zeros_like(std)
        factor = gamma / std
        conv.weight.mul_(factor.reshape(-1, *([1] * (conv.weight.dim() - 1))))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
        new_bias = (bias - bn.running_mean) * factor + beta
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)
        if hasattr(conv, "weight_mask"):
            conv.weight.mul_(conv.weight_mask)


def fold_batchnorm_(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a conv in a Sequential into that conv; returns count.

    (``quantize_`` folds every conv -> BN pair of the traced graph, in any model; this is the
    per-Sequential rule it falls back to when the model cannot be traced.)
    """
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if not (isinstance(conv, CONV) and isinstance(bn, nn.modules.batchnorm._BatchNorm)):
                continue
            fold_pair(conv, bn)
            seq._modules[b] = nn.Identity()
            folded += 1
    return folded


def layer_weight_bits(cfg: QuantConfig, names: list[str]) -> dict[str, int]:
    """Weight bit width of each layer: default, then first/last, then name-pattern overrides."""
    bits = {n: cfg.weight.bits for n in names}
    if names and cfg.first_bits is not None:
        bits[names[0]] = cfg.first_bits
    if names and cfg.last_bits is not None:
        bits[names[-1]] = cfg.last_bits
    for pattern, b in cfg.overrides.items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"quant.overrides pattern {pattern!r} matches no layer; layers are {names}")
        for n in hits:
            bits[n] = b
    return bits


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


def warn_symmetric_nonnegative(model: nn.Module) -> list[str]:
    """After calibration: warn for symmetric activation quantizers whose input was never negative."""
    names = []
    for name, q in quant_layers(model):
        aq = q.aq
        if aq is not None and getattr(aq, "symmetric", False) and hasattr(aq, "min_val"):
            if bool(aq.initialized) and float(aq.min_val.min()) >= 0:
                names.append(name)
    if names:
        warnings.warn(
            f"quant.act.symmetric=true on inputs that are never negative ({names}): half of the integer "
            "range is wasted; quant.act.symmetric=false uses it all",
            QpexpWarning,
            stacklevel=2,
        )
    return names
