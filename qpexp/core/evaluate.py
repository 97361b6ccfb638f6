"""The one evaluation of a model on batches: accuracy and mean cross-entropy (sensitivity, prune.scope=auto)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` in eval mode over ``batches`` of (x, y)."""
    was = model.training
    model.eval()
    correct = total = 0
    loss = 0.0
    for x, y in batches:
        out = model(x)
        correct += int((out.argmax(1) == y).sum())
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        total += len(y)
    model.train(was)
    return correct / max(total, 1), loss / max(total, 1)
