"""FAMO against the official code's algorithm (tests/literal.py: LiteralFAMO), both ways of
taking L(theta_{t+1}): the same batch re-evaluated after the step (``update="explicit"``), and
the next step's losses (``update="next"``)."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from literal import LiteralFAMO, ToyNet, assert_same_state
from torch.nn import functional as F

import lossbalance as lb

T, STEPS = 3, 22


def problem():
    torch.manual_seed(0)
    net = ToyNet(T).double()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 8, dtype=torch.float64, generator=gen),
             [torch.randn(16, 4, dtype=torch.float64, generator=gen) * s for s in (1, 10, 100)])
            for _ in range(STEPS)]
    return net, data


def losses_of(net, batch):
    x, ys = batch
    h = net.trunk(x)
    return [F.mse_loss(net.heads[i](h), ys[i]) for i in range(T)]


def compare(net, ref_net, bal, ref):
    torch.testing.assert_close(bal.stats["weight"], ref.weights(), rtol=1e-6, atol=0)
    for p, q in zip(net.parameters(), ref_net.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("min_losses", [None, [0.01, 0.5, 2.0]])
def test_explicit_update_matches_the_official_algorithm(min_losses):
    net, data = problem()
    ref_net = copy.deepcopy(net)
    bal = lb.FAMO(T, update="explicit", min_losses=min_losses).double()
    ref = LiteralFAMO(T, lr=0.025, gamma=1e-3, min_losses=min_losses)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    ref_opt = torch.optim.Adam(ref_net.parameters(), lr=1e-3)
    for step in range(STEPS):
        batch = data[step % 4]
        opt.zero_grad()
        bal.backward(losses_of(net, batch))
        opt.step()
        with torch.no_grad():
            bal.update(losses_of(net, batch))
        ref_opt.zero_grad()
        ref.loss(losses_of(ref_net, batch)).backward()
        torch.testing.assert_close(bal.stats["z"], torch.softmax(ref.w, -1).detach(),
                                   rtol=1e-6, atol=0)
        compare(net, ref_net, bal, ref)
        ref_opt.step()
        with torch.no_grad():
            new = losses_of(ref_net, batch)
        ref.update(new)
        torch.testing.assert_close(bal.logits, ref.w.detach(), rtol=1e-6, atol=1e-12)
    assert not torch.allclose(bal.logits, torch.zeros(T, dtype=torch.float64))


def test_next_step_update_matches_the_algorithm_on_the_next_losses():
    net, data = problem()
    ref_net = copy.deepcopy(net)
    bal = lb.FAMO(T).double()
    ref = LiteralFAMO(T)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    ref_opt = torch.optim.Adam(ref_net.parameters(), lr=1e-3)
    for step in range(STEPS):
        opt.zero_grad()
        bal.backward(losses_of(net, data[step]))
        ref_opt.zero_grad()
        losses = losses_of(ref_net, data[step])
        if step > 0:
            ref.update([loss.detach() for loss in losses])
        ref.loss(losses).backward()
        compare(net, ref_net, bal, ref)
        torch.testing.assert_close(bal.stats["logits"], ref.w.detach(), rtol=1e-6, atol=1e-12)
        opt.step()
        ref_opt.step()
    assert not torch.allclose(bal.logits, torch.zeros(T, dtype=torch.float64))


def test_order_of_calls_and_bad_input_are_refused_before_anything_changes():
    p = torch.tensor(1.0, requires_grad=True)
    nxt = lb.FAMO(2)
    with pytest.raises(RuntimeError, match="update='explicit'"):
        nxt.update([1.0, 1.0])
    bal = lb.FAMO(2, update="explicit", min_losses=[0.0, 0.5], task_names=["a", "b"])
    with pytest.raises(RuntimeError, match="no backward"):
        bal.update([1.0, 1.0])
    bal.backward([p * 2.0, p * 3.0])
    state = copy.deepcopy(bal.state_dict())
    with pytest.raises(RuntimeError, match=r"call bal.update\(new_losses\)"):
        bal.backward([p * 2.0, p * 3.0])
    for bad, error, match in (([1.0], ValueError, "expected 2 new losses"),
                              ([1.0, float("nan")], ValueError, r"task 1 \('b'\).*non-finite"),
                              ([1.0, 0.25], ValueError, r"task 1 \('b'\).*min_losses"),
                              ([1.0, "x"], TypeError, "tensor or a number"),
                              ({"a": 1.0}, ValueError, "keys"),
                              (3.0, TypeError, "list/tuple")):
        with pytest.raises(error, match=match):
            bal.update(bad)
        assert_same_state(state, bal.state_dict())
    bal.update({"a": torch.tensor(1.5), "b": torch.tensor(2.0)})
    assert not bool(bal.has_previous)
    p.grad = None
    with pytest.raises(ValueError, match=r"task 0 \('a'\)"):
        bal.backward([p * -1.0, p * 3.0])  # below its min_losses of 0
    assert p.grad is None
    for kwargs, match in (({"lr": 0.0}, "lr"), ({"gamma": -1.0}, "gamma"),
                          ({"update": "later"}, "update"), ({"min_losses": [0.0]}, "min_losses"),
                          ({"min_losses": [0.0, float("inf")]}, "finite"), ({"eps": 0}, "eps")):
        with pytest.raises(ValueError, match=match):
            lb.FAMO(2, **kwargs)


def test_skip_policy():
    p = torch.tensor(1.0, requires_grad=True)
    bal = lb.FAMO(2, update="explicit", on_nonfinite="skip")
    bal.backward([p * float("nan"), p * 1.0])  # skipped: nothing to update after it
    bal.update([1.0, 1.0])
    bal.backward([p * 2.0, p * 3.0])
    logits = bal.logits.clone()
    bal.update([float("inf"), 1.0])  # skipped: the step's losses are dropped
    assert bal.last_step_skipped and torch.equal(bal.logits, logits)
    bal.backward([p * 2.0, p * 3.0])  # no pending update left
    bal.update([1.0, 1.0])
    assert not torch.equal(bal.logits, logits)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(-3, 3), st.floats(1e-4, 1e4)), min_size=2, max_size=6),
       st.randoms(use_true_random=False), st.floats(1e-3, 1e3))
def test_weights_invariants(pairs, rnd, k):
    z = torch.softmax(torch.tensor([a for a, _ in pairs], dtype=torch.float64), 0)
    D = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    w = lb.FAMO.weights_from(z, D)
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    perm = list(range(len(pairs)))
    rnd.shuffle(perm)
    torch.testing.assert_close(lb.FAMO.weights_from(z[perm], D[perm]), w[perm])
    # one loss in other units: every w_i L_i scales together, the direction is kept
    scaled = D.clone()
    scaled[0] *= k
    w2 = lb.FAMO.weights_from(z, scaled)
    ratio = (w2 * scaled) / (w * D)
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio))
