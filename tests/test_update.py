"""The update stage on hand-made inputs: GradNorm's rule and the weights' steps."""

import math

import pytest
import torch

from lossbalance._update import gradnorm_rule, step_log_weights, step_weights


def test_gradnorm_rule_by_hand():
    # G = (2, 1) at w = (1, 1); L = (1, 2), L(0) = (1, 1), alpha = 1:
    # ||grad L|| = (2, 1); L~ = (1, 2); r = (2/3, 4/3); mean G = 1.5; target = (1, 2);
    # gap = (1, -1); dL_grad/dw = (+2, -1)
    d = torch.float64
    rule = gradnorm_rule(torch.tensor([2.0, 1.0], dtype=d), torch.ones(2, dtype=d),
                         torch.tensor([1.0, 2.0], dtype=d), torch.ones(2, dtype=d), 1.0)
    torch.testing.assert_close(rule.loss_ratio, torch.tensor([1.0, 2.0], dtype=d))
    torch.testing.assert_close(rule.inverse_rate, torch.tensor([2 / 3, 4 / 3], dtype=d))
    torch.testing.assert_close(rule.target, torch.tensor([1.0, 2.0], dtype=d))
    torch.testing.assert_close(rule.gap, torch.tensor([1.0, -1.0], dtype=d))
    torch.testing.assert_close(rule.dweights, torch.tensor([2.0, -1.0], dtype=d))
    # at w = (0.5, 2): G_i = w_i ||grad L_i|| so ||grad L|| = (4, 0.5) scales dL_grad/dw
    rule = gradnorm_rule(torch.tensor([2.0, 1.0], dtype=d), torch.tensor([0.5, 2.0], dtype=d),
                         torch.tensor([1.0, 2.0], dtype=d), torch.ones(2, dtype=d), 1.0)
    torch.testing.assert_close(rule.dweights, torch.tensor([4.0, -0.5], dtype=d))


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_gradnorm_rule_alpha(alpha):
    d = torch.float64
    rule = gradnorm_rule(torch.tensor([3.0, 1.0], dtype=d), torch.ones(2, dtype=d),
                         torch.tensor([1.0, 3.0], dtype=d), torch.ones(2, dtype=d), alpha)
    r = torch.tensor([0.5, 1.5], dtype=d)
    torch.testing.assert_close(rule.target, 2.0 * r ** alpha)


def test_step_weights_by_hand():
    # SGD lr 0.5 on dL_grad/dw = (1, -1) from w = (1, 1): (0.5, 1.5), already sum 2
    w = torch.ones(2, dtype=torch.float64)
    opt = torch.optim.SGD([w], lr=0.5)
    step_weights(opt, w, torch.tensor([1.0, -1.0], dtype=torch.float64), 1e-6)
    torch.testing.assert_close(w, torch.tensor([0.5, 1.5], dtype=torch.float64))
    # a step below zero: floored, then renormalised
    step_weights(opt, w, torch.tensor([2.0, 0.0], dtype=torch.float64), 0.1)
    torch.testing.assert_close(w, torch.tensor([0.1, 1.5], dtype=torch.float64) * 2 / 1.6)


def test_step_log_weights_by_hand():
    # SGD lr 0.5 on s = log w = 0 with dL_grad/dw = (1, -1) at w = (1, 1): dL/ds = (1, -1),
    # s = (-0.5, 0.5), renormalised: s - log((e^-0.5 + e^0.5) / 2), w = exp(s)
    d = torch.float64
    s, w = torch.zeros(2, dtype=d), torch.ones(2, dtype=d)
    opt = torch.optim.SGD([s], lr=0.5)
    step_log_weights(opt, s, w, torch.tensor([1.0, -1.0], dtype=d), w.clone(), 1e-6)
    shift = math.log(math.cosh(0.5))
    torch.testing.assert_close(s, torch.tensor([-0.5 - shift, 0.5 - shift], dtype=d))
    torch.testing.assert_close(w, s.exp(), rtol=0, atol=0)
    torch.testing.assert_close(w.sum(), torch.tensor(2.0, dtype=d))
    # the floor acts on s: log(min_weight), then the renormalisation
    s.fill_(0.0)
    step_log_weights(opt, s, w, torch.tensor([-40.0, 0.0], dtype=d),
                     torch.tensor([1.0, 1.0], dtype=d), 1e-3)
    # s = (20, 0) before the floor (no effect), then s - log((e^20 + 1) / 2)
    expect = torch.tensor([20.0, 0.0], dtype=d)
    expect -= torch.logsumexp(expect, 0) - math.log(2)
    torch.testing.assert_close(s, expect)
    s.fill_(0.0)
    step_log_weights(opt, s, w, torch.tensor([40.0, 0.0], dtype=d),
                     torch.tensor([1.0, 1.0], dtype=d), 1e-3)
    expect = torch.tensor([math.log(1e-3), 0.0], dtype=d)  # -20 floored at log 1e-3
    expect -= torch.logsumexp(expect, 0) - math.log(2)
    torch.testing.assert_close(s, expect)
