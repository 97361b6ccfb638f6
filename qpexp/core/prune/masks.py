"""Masks as registered buffers (``<module>.<param>_mask``), kept in place after every optimizer step.

Prunable weights (:func:`prunable_weights`) are every weight *matrix* of the model:

* ``weight`` of every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (and their subclasses, such as
  ``nn.MultiheadAttention``'s ``out_proj``);
* raw ``nn.Parameter`` weights registered on any other module, of two or more dimensions, named
  ``weight``, ``*_weight`` or ``weight_*``: ``nn.MultiheadAttention.in_proj_weight`` (or
  ``q/k/v_proj_weight``), ``nn.Embedding.weight``, ``nn.LSTM.weight_ih_l0``, a user module's own
  ``self.weight = nn.Parameter(...)``. Their layer name is ``<module>.<param>``.

Position embeddings, class tokens and normalisation parameters are not weight matrices and are not
pruned (they count as float parameters).
"""

from __future__ import annotations

import torch
from torch import nn

from qpexp.core.modules import CONV_LINEAR


def _unwrapped(name: str) -> str:
    return name[: -len(".layer")] if name.endswith(".layer") else name


def is_raw_weight(pname: str, p) -> bool:
    """A raw parameter that is a weight matrix (see the module docstring)."""
    named = pname == "weight" or pname.endswith("_weight") or pname.startswith("weight_")
    return p is not None and named and p.dim() >= 2


def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(layer name, owner module, parameter name)`` of every prunable weight matrix, in module order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, CONV_LINEAR):
            out.append((_unwrapped(name), m, "weight"))
            continue
        for pname, p in m._parameters.items():
            if is_raw_weight(pname, p):
                out.append((f"{name}.{pname}" if name else pname, m, pname))
    return out


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv/linear layers, named as in the unwrapped model (a quantization wrapper's ``.layer`` is
    dropped). :func:`prunable_weights` adds raw weight matrices (attention ``in_proj_weight``, ...)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, CONV_LINEAR):
            out.append((_unwrapped(name), m))
    return out


def get_mask(module: nn.Module, pname: str = "weight") -> torch.Tensor | None:
    return getattr(module, f"{pname}_mask", None)


def set_mask(module: nn.Module, mask: torch.Tensor, pname: str = "weight") -> None:
    param = getattr(module, pname)
    mask = mask.to(dtype=param.dtype, device=param.device)
    old = get_mask(module, pname)
    if old is None:
        module.register_buffer(f"{pname}_mask", mask.clone())
    else:
        old.copy_(mask)
    with torch.no_grad():
        param.mul_(get_mask(module, pname))


def ensure_masks(model: nn.Module, state_dict: dict, prefix: str = "") -> None:
    """Register mask buffers for every ``*_mask`` key of ``state_dict`` (before loading it)."""
    modules = dict(model.named_modules())
    for key, value in state_dict.items():
        if not key.startswith(prefix) or not key.endswith("_mask"):
            continue
        owner_name, _, bname = key[len(prefix) :].rpartition(".")
        owner = modules.get(owner_name)
        if owner is not None and getattr(owner, bname, None) is None:
            owner.register_buffer(bname, torch.ones_like(value))


class MaskKeeper:
    """Re-applies every mask with one fused ``_foreach_mul_`` call: use after each optimizer step.

    Zeroing after the step (rather than a forward pre-hook) keeps pruned weights exactly zero,
    whatever the optimizer's momentum does, at next to no cost per step.
    """

    def __init__(self, model: nn.Module):
        self.refresh(model)

    def refresh(self, model: nn.Module) -> None:
        pairs = []  # every ``<param>_mask`` buffer (weights; biases and BatchNorm for channel masks)
        for m in model.modules():
            for bname, buf in m._buffers.items():
                param = m._parameters.get(bname[: -len("_mask")]) if bname.endswith("_mask") else None
                if param is not None and buf is not None:
                    pairs.append((param, buf))
        self.params = [p for p, _ in pairs]
        self.masks = [k for _, k in pairs]

    @torch.no_grad()
    def __call__(self) -> None:
        if self.params:
            torch._foreach_mul_(self.params, self.masks)


def apply_masks_(model: nn.Module) -> None:
    MaskKeeper(model)()


def strip_masks(model: nn.Module) -> None:
    """Drop every mask buffer (e.g. after physical pruning); weights keep their zeros."""
    for m in model.modules():
        for bname in [b for b in m._buffers if b.endswith("_mask")]:
            del m._buffers[bname]
