"""In-place distillation for a weight-sharing PTA network (once-for-all, US-Nets).

In each step the heavy *teacher* configuration is trained on the labels and the sampled configuration
is trained on the labels plus the teacher's soft predictions of the same batch, detached (so the light
sub-networks learn the heavy one's confidence, and the teacher is not pulled towards them). When the
sampled configuration is the teacher itself the step is plain training.

Both configurations run inside one ``forward`` of :class:`TeacherAndSampled`: under
DistributedDataParallel a step must be one forward and one backward of the wrapped module.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ptanet.models import MobileNetV2


class TeacherAndSampled(nn.Module):
    """Runs ``teacher`` and then ``config`` on the same images; returns (teacher logits, sampled
    logits or None when ``config`` is the teacher). Leaves the model in ``config``."""

    def __init__(self, model: MobileNetV2, teacher: str) -> None:
        super().__init__()
        self.model, self.teacher = model, teacher

    def forward(self, images: torch.Tensor, config: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.model.set_config(self.teacher)
        teacher = self.model(images)
        if config == self.teacher:
            return teacher, None
        self.model.set_config(config)
        return teacher, self.model(images)


def distillation_loss(teacher_logits: torch.Tensor, sampled_logits: torch.Tensor | None, labels: torch.Tensor,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """CE(teacher, labels) + CE(sampled, labels) + CE(sampled, softmax(teacher) detached); the last is
    the soft-target cross-entropy (KL divergence to the teacher plus its constant entropy)."""
    loss = F.cross_entropy(teacher_logits.float(), labels, weight=weight)
    if sampled_logits is None:
        return loss
    soft = teacher_logits.detach().float().softmax(dim=1)
    return (loss + F.cross_entropy(sampled_logits.float(), labels, weight=weight)
            + F.cross_entropy(sampled_logits.float(), soft))
