"""``quantize_``: the prepare phase, tracing the model (:mod:`.graph`) and wrapping its layers (:mod:`.layers`)."""

from __future__ import annotations

from torch import nn

from qpexp.core.quant import graph
from qpexp.core.quant.bias import make_bias_quantizer
from qpexp.core.quant.layers import (
    QuantLayer,
    fold_batchnorm_,
    layer_weight_bits,
    make_quantizer,
    quantizable_layers,
)
from qpexp.core.quant.spec import QuantConfig, QuantSpec


def quantize_(model: nn.Module, cfg: QuantConfig, example=None) -> nn.Module:
    """Prepare ``model`` in place for QAT or PTQ (torchao style: this is the prepare phase,
    :func:`qpexp.core.quant.convert` the convert phase). Returns the model.

    The model is traced with torch.fx (:mod:`qpexp.core.quant.graph`): BatchNorm is folded into
    every conv that feeds it, each conv/linear layer is wrapped in a :class:`QuantLayer` (weight
    quantizer, per output channel when configured so, and input quantizer), raw weight parameters
    (attention ``in_proj_weight``, ...) get weight quantizers, and adds, concatenations, matmuls and
    average pooling get activation quantizers. ``example`` (a batch, or a tuple of inputs) checks the
    trace against the eager forward. A model fx cannot trace falls back, with a warning, to
    per-layer wrapping and BatchNorm folding inside ``nn.Sequential``. What was done (folded
    BatchNorms, graph quantizers, ``float_ops``) is in ``model._qpexp_quant_info``.
    """
    cfg.validate()
    try:
        plan = graph.analyse(model, cfg, example)
    except graph.TraceFailure as e:
        graph.warn_untraced(e)
        plan = None
        if cfg.fold_bn:
            fold_batchnorm_(model)
    layers = quantizable_layers(model)
    layer_names = [n for n, _ in layers]
    names = plan.weight_names(model, layer_names) if plan is not None else layer_names
    bits = layer_weight_bits(cfg, names)
    for name, layer in layers:
        wspec = QuantSpec(**{**cfg.weight.__dict__, "bits": bits[name]})
        w = layer.weight
        wq = make_quantizer(wspec, is_weight=True, channels=w.shape[0], row_size=w[0].numel())
        aq = make_quantizer(cfg.act, is_weight=False)
        bq = make_bias_quantizer(cfg.bias_bits) if layer.bias is not None else None
        model.set_submodule(name, QuantLayer(layer, wq, aq, bq))
    if plan is not None:
        try:
            info = graph.instrument_(model, cfg, plan, bits)
        except graph.TraceFailure as e:
            graph.warn_untraced(e)
            info = {"graph": f"untraced: {e}", "float_ops": ["(untraced model)"]}
    else:
        info = {"graph": "untraced", "float_ops": ["(untraced model)"]}
    model._qpexp_quant_info = info
    return model
