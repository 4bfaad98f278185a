"""In-place distillation: the loss by hand, the two forward passes, and what a step trains."""

import numpy as np
import pytest
import torch

from ptanet.models import pta_mobilenet_v2
from ptanet.train.distill import TeacherAndSampled, distillation_loss
from ptanet.train.loop import train
from ptanet.train.settings import resolve_settings


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_distillation_loss_equals_the_hand_computed_one():
    teacher = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.5]])
    sampled = torch.tensor([[1.0, 0.0], [-0.2, 0.4], [0.3, 0.1]])
    labels = torch.tensor([0, 1, 1])
    t, s, y = teacher.numpy().astype(np.float64), sampled.numpy().astype(np.float64), labels.numpy()
    ce_teacher = -_log_softmax(t)[np.arange(3), y].mean()
    ce_sampled = -_log_softmax(s)[np.arange(3), y].mean()
    soft = np.exp(_log_softmax(t))
    ce_soft = -(soft * _log_softmax(s)).sum(axis=1).mean()
    expected = ce_teacher + ce_sampled + ce_soft
    assert distillation_loss(teacher, sampled, labels).item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(teacher, None, labels).item() == pytest.approx(ce_teacher, rel=1e-6)


def test_the_soft_targets_are_detached():
    teacher = torch.randn(4, 2, requires_grad=True)
    sampled = torch.randn(4, 2, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1])
    alone = torch.autograd.grad(torch.nn.functional.cross_entropy(teacher, labels), teacher)[0]
    with_soft = torch.autograd.grad(distillation_loss(teacher, sampled, labels), teacher)[0]
    assert torch.allclose(with_soft, alone)  # the teacher learns from the labels only


def test_teacher_and_sampled_run_both_configurations():
    torch.manual_seed(0)
    model = pta_mobilenet_v2(dropout=0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    pair = TeacherAndSampled(model, "HHH")
    teacher, sampled = pair(x, "LLL")
    assert model.config == "LLL"
    assert torch.allclose(sampled, model(x)) and torch.allclose(teacher, model.set_config("HHH")(x))
    assert not torch.allclose(teacher, sampled, rtol=1e-2, atol=0)  # logits of a fresh model are tiny
    assert pair(x, "HHH")[1] is None


@pytest.mark.parametrize("distill", [None, "HHH"])
def test_with_distillation_the_teacher_trains_in_every_step(tiny_synth, tmp_path, distill, one_torch_thread):
    """Only LLL is sampled: without distillation the heavy branches never move, with it they do."""
    settings = resolve_settings(data=str(tiny_synth), out=str(tmp_path / "run"), cache=str(tmp_path / "cache"), size=32,
                                batch_size=8, epochs=1, max_batches=3, val_configs=["HHH"], bn_configs=[],
                                prepare_workers=0, sampling={"LLL": 1.0}, distill=distill)
    seen = {}
    import ptanet.train.loop as loop

    real = loop.create_model

    def recording(name, **kw):
        seen["model"] = real(name, **kw)
        seen["start"] = {n: p.detach().clone() for n, p in seen["model"].named_parameters()}
        return seen["model"]

    loop.create_model = recording
    try:
        train(settings, progress=False, log=lambda *_: None)
    finally:
        loop.create_model = real
    heavy = {n for n, _ in seen["model"].named_parameters() if ".heavy." in n}
    assert heavy
    moved = {n for n, p in seen["model"].named_parameters() if not torch.equal(p.detach(), seen["start"][n])}
    assert bool(heavy & moved) == (distill is not None)
    assert any(".light." in n for n in moved)


def test_distill_needs_a_pta_model_and_a_valid_configuration(tmp_path):
    with pytest.raises(ValueError, match="needs a PTA architecture"):
        resolve_settings(arch="mobilenet_v2", distill="HHH", out=str(tmp_path))
    with pytest.raises(ValueError):
        resolve_settings(distill="HXH", out=str(tmp_path))
