"""The layer types the compression core works on, and model-state snapshots: each defined once here.

Pruning, quantization, the accounting and the integer export all act on the same layers:
convolutions (1-3 d) and linear layers.
"""

from __future__ import annotations

import torch
from torch import nn

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_LINEAR = (*CONV, nn.Linear)  # pruned, quantized, counted and exported


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model.state_dict()`` that later training does not change (detached tensors)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
