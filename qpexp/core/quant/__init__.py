"""Quantization: prepare (``quantize_``) and convert (``convert``) as two explicit phases."""

from qpexp.core.quant.layers import QuantLayer, fold_batchnorm_, quant_layers
from qpexp.core.quant.prepare import quantize_
from qpexp.core.quant.spec import ALLOWED_BITS, QuantConfig, QuantSpec


def convert(model, path=None, **kwargs):
    """Convert a prepared (fake-quantized) model into a real integer model; see :mod:`.export`
    (``nn.Sequential`` models) and :mod:`.graph_export` (any other traceable model)."""
    from qpexp.core.quant.export import convert as _convert

    return _convert(model, path, **kwargs)


__all__ = [
    "ALLOWED_BITS",
    "QuantConfig",
    "QuantSpec",
    "QuantLayer",
    "quantize_",
    "convert",
    "fold_batchnorm_",
    "quant_layers",
]
