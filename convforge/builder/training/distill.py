"""Knowledge distillation (Hinton et al. 2015): a student also learns the teacher's outputs.

The loss of a step becomes ``(1 - w) * CE(student, targets) + w * T^2 *
KL(softmax(teacher / T) || softmax(student / T))``: the teacher's softened
probabilities carry how it ranks the wrong classes, which one-hot labels do not.
``T^2`` keeps the soft term's gradients at the hard term's scale as ``T`` grows.
`convforge compress` distils a pruned model from the model it was pruned from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convforge.errors import UserError


@dataclass
class Distillation:
    """A frozen ``teacher`` (any module of the same inputs and classes) and how much its
    outputs weigh: ``weight`` in [0, 1] (0: labels only, 1: teacher only), ``temperature``
    > 0 (4 is the common choice for image classifiers)."""

    teacher: nn.Module
    weight: float
    temperature: float = 4.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise UserError(f"distillation weight must be in [0, 1], got {self.weight}")
        if not self.temperature > 0:
            raise UserError(f"distillation temperature must be > 0, got {self.temperature}")
        self.teacher.eval().requires_grad_(False)

    def to(self, device: torch.device, memory_format=torch.contiguous_format) -> Distillation:
        self.teacher.to(device, memory_format=memory_format)
        return self

    def loss(self, hard_loss: Tensor, student_logits: Tensor, images: Tensor) -> Tensor:
        """The blended loss of one step; ``hard_loss`` is the usual one on the targets,
        ``images`` the (augmented, mixed) batch the student saw."""
        if self.weight == 0.0:
            return hard_loss
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(student_logits.float() / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return (1.0 - self.weight) * hard_loss + self.weight * t * t * soft
