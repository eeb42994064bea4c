"""NashMTL when G alpha = 1/alpha has no positive solution: the official code's fallback."""

import torch

import lossbalance as lb


def step(bal, zero_task: bool):
    torch.manual_seed(0)
    trunk, heads = torch.nn.Linear(5, 4, dtype=torch.float64), [
        torch.nn.Linear(4, 1, dtype=torch.float64) for _ in range(3)]
    x = torch.randn(8, 5, dtype=torch.float64)
    h = trunk(x)
    feats = bal.tap(h)
    losses = [heads[i](feats[i]).pow(2).mean() for i in range(3)]
    if zero_task:  # task 2 reaches h with a zero gradient: G_22 = 0
        losses[2] = (heads[2](feats[2]) * 0).sum() + 1.0
    bal.backward(losses)
    return trunk.weight.grad.clone()


def test_no_solution_takes_the_previous_alpha_clipped():
    bal = lb.NashMTL(3, max_norm=0.0)
    step(bal, zero_task=False)
    previous = bal.previous.clone()
    assert torch.isfinite(previous).all()
    step(bal, zero_task=True)  # no positive solution: the previous alpha, warm start kept
    torch.testing.assert_close(bal.weights, previous.to(bal.weights))
    torch.testing.assert_close(bal.previous, previous)


def test_no_solution_on_the_first_step_takes_ones():
    bal = lb.NashMTL(3, max_norm=0.0)
    step(bal, zero_task=True)
    torch.testing.assert_close(bal.weights, torch.ones(3, dtype=bal.weights.dtype))
    assert not torch.isfinite(bal.previous).any()  # nothing solved, nothing kept


def test_the_fallback_is_clipped_to_max_norm():
    bal = lb.NashMTL(3, max_norm=1e-3)
    step(bal, zero_task=True)
    gram = bal.stats["gram"].double()
    w = bal.weights.double()
    assert float(w @ gram @ w) ** 0.5 <= 1e-3 * (1 + 1e-6)  # stats["gram"] is float32
