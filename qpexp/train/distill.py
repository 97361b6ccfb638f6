"""Knowledge distillation (Hinton et al. 2015) from the cached dense baseline.

With ``distill.alpha > 0`` the prune fine-tuning and QAT stages minimise
``(1 - alpha) CE(y, student) + alpha T^2 KL(softmax(teacher / T) || softmax(student / T))``
(``CE`` with the stage's label smoothing). The teacher is a frozen eval-mode copy of the baseline
stage's model. Its logits for the whole train split are computed once (:func:`precompute`) and the
in-memory training loader yields them with each batch: ``python -m qpexp.bench distill`` measured on
the MNIST-1D CNN (batch 100, one thread) a teacher forward at ~20% of a float student's step, the
table lookup at ~1-9%. A data module without that hook gets the teacher run on each batch.
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

    def loss(self, logits, x, y, label_smoothing: float, teacher_logits: torch.Tensor | None = None):
        """The distillation loss of a batch; the teacher runs on ``x`` unless its logits are given."""
        t = teacher_logits
        if t is None:
            p = next(self.teacher.parameters(), None)
            if p is not None and p.device != x.device:  # a GPU trainer moved the student: follow it
                self.teacher.to(x.device)
            with torch.no_grad():
                t = self.teacher(x)
        return distill_loss(logits, t, y, self.alpha, self.temperature, label_smoothing)


@torch.no_grad()
def precompute(teacher: nn.Module, dm, chunk: int = 1000) -> bool:
    """Give an in-memory data module (``dm.splits``, ``dm.teacher_logits``) the teacher's logits for
    its whole train split, once; its training loader then yields them with each batch. False (the
    teacher then runs on each batch) for a data module without that hook."""
    if not hasattr(dm, "teacher_logits") or "train" not in getattr(dm, "splits", {}):
        return False
    x = dm.splits["train"][0]
    dm.teacher_logits = torch.cat([teacher(x[i : i + chunk]) for i in range(0, len(x), chunk)])
    return True
