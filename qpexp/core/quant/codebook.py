"""Trained weight sharing (Deep Compression, Han et al. 2016): one k-means codebook per layer.

A ``b``-bit codebook quantizer stores each weight as a ``b``-bit code into a table of ``2^b`` values:
code 0 is the exact zero (pruned weights, and the filler entries of the relative-index layout need
it), codes ``1 .. 2^b - 1`` are the layer's ``K = 2^b - 1`` shared values (centroids), stored in fp32
(or, with ``quant.table_bits=16``, in float16: the forward reads them rounded to half precision, the
gradient passing straight through to the fp32 latent centroids).

On its first forward (QAT's calibration batch, or PTQ) the quantizer clusters the layer's surviving
(nonzero) weights: the ``K`` centroids start linearly spaced between the smallest and the largest
surviving weight (the paper's linear initialisation), then ``KMEANS_ITERS`` Lloyd iterations (1-D:
each weight to its nearest centroid, each centroid to the mean of its weights; an empty cluster keeps
its centroid). Deterministic: sorted 1-D centroids, midpoints, ``searchsorted``; sums in float64.
Pruned weights (exactly zero) are not clustered and keep code 0.

The assignment is then fixed. Forward returns the table entry of each weight's code (a gather), so
autograd gives each centroid the SUM of the gradients of the weights that share it (the paper's
centroid update); the latent weight gets no gradient and stays as it was. Size, as
:func:`qpexp.core.accounting.size_bits` counts any quantizer: ``b`` bits per stored code and
:meth:`n_qparams` = ``(K, 0)``: the ``K`` centroids at :attr:`qparam_bits` (32 or 16) bits each (the
zero code costs nothing).
Weights only: activations keep the linear quantizer. Neither the integer file nor ONNX has a
codebook form (:func:`no_integer_form`).
"""

from __future__ import annotations

import torch
from torch import nn

from qpexp.core.quant.spec import QuantSpec

KMEANS_ITERS = 30


def linear_init(w: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` centroids evenly spaced over ``[min w, max w]`` (float64; one centroid: the midpoint)."""
    lo, hi = w.min().double(), w.max().double()
    if k == 1:
        return ((lo + hi) / 2).reshape(1)
    return lo + (hi - lo) * torch.arange(k, dtype=torch.float64) / (k - 1)


def assign(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``centroids`` for each value of ``w`` (ties: the upper one)."""
    mid = (centroids[1:] + centroids[:-1]) / 2
    return torch.searchsorted(mid, w.double().contiguous(), right=True)


def kmeans_1d(w: torch.Tensor, k: int, iters: int = KMEANS_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the 1-D values ``w`` from :func:`linear_init`: (centroids float64, index)."""
    c = linear_init(w, k)
    idx = assign(w, c)
    wd = w.double()
    for _ in range(iters):
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, wd)
        counts = torch.bincount(idx, minlength=k)
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)  # an empty cluster keeps its centroid
        c = torch.sort(c).values  # 1-D Lloyd keeps the order; sorting guards against ties
        new = assign(w, c)
        if torch.equal(new, idx):
            break
        idx = new
    return c, idx


def _resize_hook(module: CodebookQuantizer, state_dict, prefix, *args) -> None:
    key = prefix + "codes"
    if key in state_dict and state_dict[key].shape != module.codes.shape:
        module.codes = torch.zeros_like(state_dict[key])


class CodebookQuantizer(nn.Module):
    """Per-layer k-means weight sharing with trained centroids (see the module doc)."""

    def __init__(self, spec: QuantSpec, is_weight: bool, channels: int = 1, ch_axis: int = 0):
        super().__init__()
        if not is_weight:
            raise ValueError("quant.act.scheme=codebook: codebooks share weights; activations stay linear")
        self.bits = spec.bits
        self.is_weight = True
        self.per_channel = False
        self.ch_axis = ch_axis
        self.symmetric = False
        self.qparam_bits = spec.table_bits  # what each centroid is stored in (accounting reads it)
        self.centroids = nn.Parameter(torch.zeros(2**self.bits - 1))
        self.register_buffer("codes", torch.zeros(0, dtype=torch.int64))  # per weight: 0 zero, j+1 centroid j
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._register_load_state_dict_pre_hook(_resize_hook, with_module=True)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, codebook of {self.centroids.numel()} + zero, per-layer, fp{self.qparam_bits}"
        )

    @torch.no_grad()
    def init_codebook(self, w: torch.Tensor) -> None:
        """Cluster the nonzero values of ``w`` (k-means from the linear initialisation); fix the codes."""
        flat = w.detach().reshape(-1).cpu()
        keep = flat != 0
        codes = torch.zeros(flat.numel(), dtype=torch.int64)
        k = self.centroids.numel()
        if bool(keep.any()):
            c, idx = kmeans_1d(flat[keep], k)
            codes[keep] = idx + 1
            self.centroids.copy_(c.to(self.centroids.dtype))
        self.codes = codes.reshape(w.shape).to(w.device)
        self.initialized.fill_(True)

    def table(self) -> torch.Tensor:
        """The decoding table: ``[0, c_1, ..., c_K]`` (differentiable in the centroids), the centroids
        as stored (rounded to float16 when ``qparam_bits`` is 16, straight through)."""
        c = self.centroids
        if self.qparam_bits == 16:
            c = c + (c.detach().half().to(c.dtype) - c.detach())
        return torch.cat([c.new_zeros(1), c])

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized) or self.codes.shape != w.shape:
            self.init_codebook(w)
        # a gather: its backward sums the gradients of the weights sharing each centroid
        return self.table()[self.codes].to(w.dtype)

    @torch.no_grad()
    def int_repr(self, w: torch.Tensor) -> torch.Tensor:
        """The stored codes (0: zero, ``j + 1``: centroid ``j``), as int32."""
        if not bool(self.initialized) or self.codes.shape != w.shape:
            self.init_codebook(w)
        return self.codes.to(torch.int32)

    def n_qparams(self) -> tuple[int, int]:
        """The codebook: ``2^b - 1`` centroids (counted like scales, at :attr:`qparam_bits`), no zero points."""
        return self.centroids.numel(), 0


def no_integer_form(model: nn.Module) -> str | None:
    """Why ``model`` has no integer-file / ONNX form (a codebook-quantized layer), else None."""
    names = [n for n, m in model.named_modules() if isinstance(m, CodebookQuantizer)]
    if not names:
        return None
    return (
        f"quant.scheme=codebook: {len(names)} weight tensor(s) use k-means codebooks ({names[0]}, ...), "
        "which neither the integer file nor ONNX QuantizeLinear/DequantizeLinear can hold; accuracy and "
        "size come from the simulated (fake-quantized) model only"
    )
