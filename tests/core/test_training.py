"""The shared training loop: deterministic, and its L1 penalty really shrinks the penalized weights."""

import pytest
import torch

from tinybeauty_cli.core.quality import made_up
from tinybeauty_cli.core.training import FitConfig, distillation_batches, fit

from tests.helpers import small_tinybeauty


def _batch_fn(step, gen):
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    return x, (x * 0.9).clamp(-1, 1)


def _train(l1: float):
    model = small_tinybeauty(seed=1, dim=4)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    losses = fit(model, _batch_fn, FitConfig(steps=30, lr=3e-3, warmup=2, seed=0, l1=l1), penalized=convs).losses
    return model, convs, losses


def test_l1_penalty_shrinks_the_penalized_weights_and_reports_the_image_loss():
    _, plain, plain_losses = _train(0.0)
    _, penalized, losses = _train(1e-2)
    l1 = lambda ws: sum(float(w.detach().abs().sum()) for w in ws)
    assert l1(penalized) < 0.8 * l1(plain)
    assert losses[0] == pytest.approx(plain_losses[0])  # the first loss is before any update: image loss only


def test_training_is_deterministic_and_l1_needs_parameters():
    a, _, la = _train(1e-3)
    b, _, lb = _train(1e-3)
    assert la == lb
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError):
        fit(small_tinybeauty(dim=4), _batch_fn, FitConfig(steps=1, l1=1e-3))


def test_distillation_batches_target_the_teachers_made_up_images_once_per_image_and_flip():
    calls = []
    teacher = small_tinybeauty(dim=4, n_res=1)
    teacher.register_forward_hook(lambda m, a, o: calls.append(len(a[0])))
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    batch = distillation_batches(teacher, images, batch_size=4)
    gen = torch.Generator().manual_seed(0)
    for step in range(20):
        x, y = batch(step, gen)
        with torch.no_grad():
            assert torch.allclose(y, made_up(x, teacher(x)), atol=1e-6)  # exactly the teacher's, flips included
        calls.pop()  # the check's own call
    assert sum(calls) <= 6  # each of 3 images, flipped or not, went through the teacher once at most


def test_the_l2_loss_is_the_mean_squared_difference_and_other_losses_are_refused():
    model = small_tinybeauty(seed=1, dim=4)
    x, target = _batch_fn(0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = float((made_up(x, model(x)) - target).square().mean())
    # lr 0 so that nothing moves: the one reported loss is the model's before any update
    losses = fit(model, lambda step, gen: (x, target), FitConfig(steps=1, lr=1e-12, warmup=1, loss="l2")).losses
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    l1 = fit(small_tinybeauty(seed=1, dim=4), lambda step, gen: (x, target),
             FitConfig(steps=1, lr=1e-12, warmup=1)).losses[0]
    assert l1 != pytest.approx(losses[0])
    with pytest.raises(ValueError, match="l1' or 'l2"):
        FitConfig(steps=1, loss="huber")
