"""Flat, sweepable quantization settings (torchao style: one dataclass plus one verb)."""

from __future__ import annotations

from dataclasses import dataclass, field

ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
FLOAT_BITS = 32
SCHEMES = {
    "linear": "qpexp.core.quant.linear.LinearQuantizer",
    "log": "qpexp.core.quant.log.Pow2Quantizer",
    "companding": "qpexp.core.quant.log.CompandingQuantizer",
    "codebook": "qpexp.core.quant.codebook.CodebookQuantizer",
}
GRANULARITIES = ("tensor", "channel", "group")
GROUP_SIZE = 128  # quant.group_size default (GPTQ/AWQ/torchao use 128)
RANGES = ("minmax", "ema", "lsq")
TABLE_BITS = (16, 32)  # codebook centroids: float16 or fp32
BIAS_BITS = (8, 16, 32)  # biases: int8 + one fp32 scale, float16, or fp32 (qpexp.core.quant.bias)


@dataclass
class QuantSpec:
    """One quantizer: ``r = S (q - Z)`` for the linear scheme.

    ``bits`` 2..8 or 16 (32 means: leave in float). ``range``: ``minmax`` (weights: the tensor's own
    range; activations: running min/max over everything observed), ``ema`` (exponential moving
    average of batch min/max), ``lsq`` (learned step size, Esser et al. 2020). ``narrow_range``
    (symmetric linear only): codes ``[-(2^(b-1)-1), 2^(b-1)-1]``, one of the ``2^b`` patterns unused
    (3 levels at 2 bits); False gives the full signed range ``[-2^(b-1), 2^(b-1)-1]`` (4 levels at 2
    bits), as LSQ's paper quantizes weights. The scale ``S`` and ``Z = 0`` are the same either way;
    only a learned step size (``lsq``) or learned rounding reaches the extra negative code.

    ``granularity``: one scale (and zero point) per ``tensor``, per output ``channel``, or (weights
    only) per ``group`` of ``group_size`` consecutive input elements of an output row (the weight seen
    as ``(C_out, K)``, ``K`` the product of the other dimensions in their order; the last group of a
    row is shorter when ``group_size`` does not divide ``K``): ``C_out * ceil(K / group_size)`` scales.
    Groups take a linear, min/max (or ``ema``: the same for weights) quantizer.

    ``table_bits`` (``scheme=codebook`` only): the precision the codebook's centroids are stored and
    computed at, 32 (fp32) or 16 (float16, rounded straight through in the forward).
    """

    bits: int = 8
    scheme: str = "linear"
    granularity: str = "tensor"
    symmetric: bool = False
    range: str = "minmax"
    ema_decay: float = 0.9
    narrow_range: bool = True
    group_size: int = GROUP_SIZE
    table_bits: int = FLOAT_BITS

    def validate(self, key: str, bits_key: str | None = None) -> None:
        """Raise ValueError naming the config key (``key.scheme``...; ``bits_key`` for the width)."""
        bk = bits_key or f"{key}.bits"
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"{bk} must be an integer in {ALLOWED_BITS} or 32, got {self.bits!r}")
        if self.bits not in ALLOWED_BITS and self.bits != FLOAT_BITS:
            raise ValueError(f"{bk}={self.bits} is not allowed: use one of {ALLOWED_BITS} or 32 (float)")
        if self.scheme not in SCHEMES and "." not in self.scheme:
            raise ValueError(f"{key}.scheme={self.scheme!r} is unknown: use one of {sorted(SCHEMES)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"{key}.granularity={self.granularity!r} is unknown: use one of {GRANULARITIES}")
        if self.granularity == "group":
            self._validate_group(key)
        if self.range not in RANGES:
            raise ValueError(f"{key}.range={self.range!r} is unknown: use one of {RANGES}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"{key}.ema_decay={self.ema_decay} must lie in (0, 1)")
        if self.scheme == "codebook" and (self.granularity != "tensor" or self.range != "minmax"):
            raise ValueError(
                f"{key}.scheme=codebook shares one k-means codebook per layer: it needs "
                f"{key}.granularity=tensor and {key}.range=minmax (the quant=codebook preset sets both); "
                f"got granularity={self.granularity!r}, range={self.range!r}"
            )
        if self.table_bits not in TABLE_BITS:
            raise ValueError(f"quant.table_bits={self.table_bits!r} must be one of {TABLE_BITS}")
        if self.table_bits != FLOAT_BITS and self.scheme != "codebook":
            raise ValueError(
                f"quant.table_bits={self.table_bits} sets the precision of codebook centroids: it needs "
                f"{key}.scheme=codebook (got scheme={self.scheme!r}); leave it at 32"
            )
        if not isinstance(self.narrow_range, bool):
            raise ValueError(f"{key}.narrow_range must be true or false, got {self.narrow_range!r}")
        if not self.narrow_range and (self.scheme != "linear" or not self.symmetric):
            raise ValueError(
                f"{key}.narrow_range=false needs a symmetric linear quantizer ({key}.scheme=linear, "
                f"{key}.symmetric=true): asymmetric codes already use the full range, log codes have no "
                f"unused pattern; got scheme={self.scheme!r}, symmetric={self.symmetric}"
            )

    def _validate_group(self, key: str) -> None:
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0:
            raise ValueError(f"{key}.group_size={gs!r} must be an integer > 0 (input elements per scale)")
        if self.scheme != "linear":
            raise ValueError(
                f"{key}.granularity=group supports {key}.scheme=linear only (got scheme={self.scheme!r}): "
                "use granularity=tensor or channel with it"
            )
        if self.range == "lsq":
            raise ValueError(
                f"{key}.granularity=group takes its scales from each group's min/max: "
                f"{key}.range=lsq (learned step sizes) is not supported with it; use range=minmax"
            )

    @property
    def enabled(self) -> bool:
        return self.bits != FLOAT_BITS


@dataclass
class QuantConfig:
    """What to quantize and how. ``quantize_(model, QuantConfig(...))`` prepares a model for QAT/PTQ.

    ``first_bits`` / ``last_bits`` give the first and last quantized layer their own weight width
    (None: same as ``weight.bits``). ``overrides`` maps module-name patterns (fnmatch) to a weight
    width (mixed precision); a pattern that matches no layer is an error. ``bias_bits``: 32 keeps
    biases in fp32; 16 (float16) or 8 (int8 with one fp32 scale per layer) round them as stored
    (:mod:`qpexp.core.quant.bias`), with ``scheme=codebook`` only: the integer file and ONNX, which
    codebook models do not have, keep float biases.
    """

    weight: QuantSpec = field(
        default_factory=lambda: QuantSpec(bits=4, granularity="channel", symmetric=True, range="minmax")
    )
    act: QuantSpec = field(
        default_factory=lambda: QuantSpec(bits=8, granularity="tensor", symmetric=False, range="minmax")
    )
    first_bits: int | None = None
    last_bits: int | None = None
    overrides: dict[str, int] = field(default_factory=dict)
    fold_bn: bool = True
    bias_bits: int = FLOAT_BITS

    def validate(self) -> None:
        if self.act.granularity == "group":  # before the act spec's own checks: one error, this one
            raise ValueError(
                "quant.act.granularity='group' is not supported: activations are per-tensor "
                "(groups are for weights: quant.granularity=group)"
            )
        self.weight.validate("quant", "quant.bits_w")
        self.act.validate("quant.act", "quant.bits_a")
        if self.act.scheme == "codebook":
            raise ValueError("quant.act.scheme=codebook: codebooks share weights; activations stay linear")
        if self.act.granularity == "channel":
            raise ValueError("quant.act.granularity='channel' is not supported: activations are per-tensor")
        self._validate_bias()
        for name, b in (("quant.first_bits", self.first_bits), ("quant.last_bits", self.last_bits)):
            if b is not None:
                QuantSpec(bits=b).validate(name, name)
        for pat, b in self.overrides.items():
            QuantSpec(bits=b).validate("quant.overrides", f"quant.overrides[{pat!r}]")

    def _validate_bias(self) -> None:
        b = self.bias_bits
        if isinstance(b, bool) or b not in BIAS_BITS:
            raise ValueError(f"quant.bias_bits={b!r} must be one of {BIAS_BITS} (32: float biases)")
        if b != FLOAT_BITS and self.weight.scheme != "codebook":
            raise ValueError(
                f"quant.bias_bits={b} rounds biases below fp32, which only quant.scheme=codebook models "
                f"count: the integer file and ONNX of a {self.weight.scheme!r} model store float biases "
                "(onnxruntime rounds them itself); leave it at 32"
            )
