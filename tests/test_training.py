"""The shared training loop: deterministic, and its L1 penalty really shrinks the penalized weights."""

import pytest
import torch

from tinybeauty_cli.core.training import FitConfig, fit

from .conftest import small_tinybeauty


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
