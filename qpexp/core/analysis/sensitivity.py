"""Per-layer sensitivity without training: each conv/linear layer alone quantized to a weight width,
or pruned alone to a ratio, the rest of the model unchanged; the validation accuracy and loss.

Quantization goes through :func:`qpexp.core.quant.quantize_` on a copy of the model (BatchNorm folded
as QAT would fold it), every weight left in float, then ONE layer gets a weight quantizer built from
the run's weight spec (scheme, granularity, symmetry, range) at the width measured: no training, its
scale from the weight's own min/max, or LSQ's initial step ``2 mean|w| / sqrt(Q_P)``. Activations
stay in float unless ``act=True`` (then quantized as the run says, ranges calibrated once on
``calib`` batches with every weight in float). Pruning one layer alone ranks its weights with the
run's criterion and zeros the lowest-scored ``ratio`` of them (weights already zero stay zero, so a
layer already sparser than ``ratio`` is unchanged). Torch only: usable from a notebook.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
from torch import nn

from qpexp.core.accounting import layer_views
from qpexp.core.evaluate import evaluate  # noqa: F401 (qpexp.core.sensitivity.evaluate, as before)
from qpexp.core.prune import PruneConfig, make_criterion
from qpexp.core.prune.criteria import Target
from qpexp.core.prune.criteria.taylor import weight_grads
from qpexp.core.prune.unstructured import layer_masks
from qpexp.core.quant import QuantConfig, quantize_
from qpexp.core.quant.layers import is_quant_layer, make_quantizer

FLOAT_BITS = 32


@torch.no_grad()
def calibrate(model: nn.Module, batches) -> None:
    """Activation ranges from ``batches``: the model in eval mode, its observers in training mode."""
    was = model.training
    model.eval()
    for m in model.modules():
        if hasattr(m, "min_val") or hasattr(m, "max_abs"):
            m.train()
    for x, _ in batches:
        model(x)
    model.train(was)


def prepare_float_weights(
    model: nn.Module,
    qcfg: QuantConfig,
    example=None,
    act: bool = False,
    calib=None,
    raw_bits: int = FLOAT_BITS,
) -> nn.Module:
    """A copy of ``model`` prepared by ``quantize_`` with every conv/linear weight in float (raw weight
    matrices such as attention ``in_proj_weight`` at ``raw_bits``); activations in float, or (``act``)
    quantized as ``qcfg.act`` says and calibrated on ``calib``."""
    m = copy.deepcopy(model)
    a = qcfg.act if act else replace(qcfg.act, bits=FLOAT_BITS)
    cfg = QuantConfig(replace(qcfg.weight, bits=raw_bits), a, None, None, {}, qcfg.fold_bn)
    quantize_(m, cfg, example=example)
    for wrapper in weight_layers(m).values():
        wrapper.wq = None
    if act and a.enabled:
        calibrate(m, calib or [])
    return m


def weight_layers(prepared: nn.Module) -> dict[str, nn.Module]:
    """Layer name -> its quantization wrapper, for every conv/linear layer of a prepared model."""
    return {v.name: v.owner for v in layer_views(prepared) if is_quant_layer(v.owner)}


def set_weight_bits(wrapper: nn.Module, qcfg: QuantConfig, bits: int) -> None:
    """Give one wrapper a fresh weight quantizer of ``bits`` (the run's weight spec); 32: float."""
    spec = replace(qcfg.weight, bits=bits)
    w = wrapper.layer.weight
    wrapper.wq = make_quantizer(spec, is_weight=True, channels=w.shape[0], row_size=w[0].numel())


def quant_sensitivity(
    model: nn.Module, batches, qcfg: QuantConfig, widths, example=None, act: bool = False, calib=None
) -> dict[str, dict[int, tuple[float, float]]]:
    """``{layer: {bits: (val_acc, val_loss)}}`` with that layer's weights alone at ``bits``, plus
    ``{"": {32: reference}}`` (every weight in float; activations as ``act`` says)."""
    prepared = prepare_float_weights(model, qcfg, example, act, calib)
    out: dict[str, dict[int, tuple[float, float]]] = {"": {FLOAT_BITS: evaluate(prepared, batches)}}
    for name, wrapper in weight_layers(prepared).items():
        out[name] = {}
        for b in widths:
            set_weight_bits(wrapper, qcfg, b)
            out[name][b] = evaluate(prepared, batches)
        wrapper.wq = None
    return out


def prune_sensitivity(
    model: nn.Module, batches, pcfg: PruneConfig, ratios, grads: dict | None = None
) -> dict[str, dict[float, tuple[float, float]]]:
    """``{layer: {ratio: (val_acc, val_loss)}}`` with that layer alone pruned (unstructured) to
    ``ratio`` of its weights by ``pcfg.criterion``; the model is restored after each measurement.
    A criterion that needs gradients reads ``grads`` (:func:`~qpexp.core.prune.criteria.taylor.weight_grads`)."""
    criterion = make_criterion(pcfg)
    if getattr(criterion, "needs_grads", False) and grads is None:
        grads = weight_grads(model, batches, pcfg.taylor_batches)
    out: dict[str, dict[float, tuple[float, float]]] = {}
    for v in layer_views(model):
        w = v.weight
        saved = w.detach().clone()
        scores = criterion(Target(v.name, w, (grads or {}).get(v.name, []))).float()
        scores = torch.where(saved == 0, torch.full_like(scores, -math.inf), scores)
        out[v.name] = {}
        for r in ratios:
            mask = layer_masks({v.name: scores}, {v.name: r}, pcfg.min_keep_frac)[v.name]
            with torch.no_grad():
                w.mul_(mask.to(w.dtype))
            out[v.name][r] = evaluate(model, batches)
            with torch.no_grad():
                w.copy_(saved)
    return out
