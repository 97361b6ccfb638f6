"""Knowledge distillation (Hinton et al. 2015) from the cached dense baseline.

With ``distill.alpha > 0`` the prune fine-tuning and QAT stages minimise
``(1 - alpha) CE(y, student) + alpha T^2 KL(softmax(teacher / T) || softmax(student / T))``
(``CE`` with the stage's label smoothing). The teacher is a frozen eval-mode copy of the baseline
stage's model, run on each training batch (``python -m qpexp.bench distill``: on the MNIST-1D CNN its
forward costs a small fraction of a student training step, and it needs no per-sample indices, which
the in-memory loaders do not yield, so on-the-fly beats a precomputed logit table here).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    y: torch.Tensor,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``(1 - alpha) CE + alpha T^2 KL(p_teacher^T || p_student^T)``, batch mean."""
    ce = F.cross_entropy(student, y, label_smoothing=label_smoothing)
    if alpha == 0:
        return ce
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student / t, dim=1),
        F.log_softmax(teacher.detach() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - alpha) * ce + alpha * t * t * kl


def make_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` in eval mode (BatchNorm statistics fixed; never trained)."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


class Distiller:
    """The teacher and the loss settings a stage trains with. Not an ``nn.Module``: the teacher is
    no submodule of the stage (not in its optimizer, checkpoints, ``train()`` calls or DDP wrapper)."""

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float):
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature

    def loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, label_smoothing: float):
        p = next(self.teacher.parameters(), None)
        if p is not None and p.device != x.device:  # a GPU trainer moved the student: follow it
            self.teacher.to(x.device)
        with torch.no_grad():
            t = self.teacher(x)
        return distill_loss(logits, t, y, self.alpha, self.temperature, label_smoothing)
