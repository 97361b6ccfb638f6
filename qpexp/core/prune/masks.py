"""Masks as registered buffers (``<module>.weight_mask``), kept in place after every optimizer step."""

from __future__ import annotations

import torch
from torch import nn

from qpexp.core.modules import CONV_LINEAR


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv/linear layers, named as in the unwrapped model (a quantization wrapper's ``.layer`` is
    dropped)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, CONV_LINEAR):
            out.append((name[: -len(".layer")] if name.endswith(".layer") else name, m))
    return out


def get_mask(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "weight_mask", None)


def set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    mask = mask.to(dtype=module.weight.dtype, device=module.weight.device)
    if get_mask(module) is None:
        module.register_buffer("weight_mask", mask.clone())
    else:
        module.weight_mask.copy_(mask)
    with torch.no_grad():
        module.weight.mul_(module.weight_mask)


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
