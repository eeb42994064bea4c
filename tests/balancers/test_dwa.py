"""DWA against Liu et al.'s Eq. 7 (tests/literal.py: LiteralDWA) over six epochs of training."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from literal import LiteralDWA, ToyNet, assert_same_state
from torch.nn import functional as F

import lossbalance as lb

T, STEPS, EPOCH = 3, 24, 4


def batches():
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 8, dtype=torch.float64, generator=gen) for _ in range(EPOCH)]
    ys = [[torch.randn(16, 4, dtype=torch.float64, generator=gen) * s for s in (1, 10, 100)]
          for _ in range(EPOCH)]
    return xs, ys


def losses_of(net, x, ys):
    h = net.trunk(x)
    return [F.mse_loss(net.heads[i](h), ys[i]) for i in range(T)]


def train(bal, net, *, epoch_end=True, steps=STEPS):
    """SGD on the same epoch of 4 batches, ``bal.epoch_end()`` after each epoch; returns the
    weights used and the model's gradients of each step."""
    xs, ys = batches()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    out = []
    for step in range(steps):
        opt.zero_grad()
        bal.backward(losses_of(net, xs[step % EPOCH], ys[step % EPOCH]))
        out.append((bal.stats["weight"], [p.grad.clone() for p in net.parameters()]))
        opt.step()
        if epoch_end and (step + 1) % EPOCH == 0:
            bal.epoch_end()
    return out


def test_matches_eq7_over_six_epochs():
    torch.manual_seed(0)
    net = ToyNet(T).double()
    ref_net = copy.deepcopy(net)
    trace = train(lb.DWA(T).double(), net)
    ref = LiteralDWA(T, temperature=2.0)
    xs, ys = batches()
    opt = torch.optim.SGD(ref_net.parameters(), lr=1e-3)
    for step in range(STEPS):
        opt.zero_grad()
        losses = losses_of(ref_net, xs[step % EPOCH], ys[step % EPOCH])
        w = ref.weights()
        sum(wi * loss for wi, loss in zip(w, losses, strict=True)).backward()
        ref.record(losses)
        got_w, got_g = trace[step]
        torch.testing.assert_close(got_w, torch.tensor(w, dtype=torch.float64),
                                   rtol=1e-6, atol=0)
        for g, p in zip(got_g, ref_net.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-12)
        opt.step()
        if (step + 1) % EPOCH == 0:
            ref.epoch_end()
    # the first two epochs weigh 1, the later ones do not
    assert all(torch.equal(w, torch.ones(T, dtype=torch.float64)) for w, _ in trace[:2 * EPOCH])
    assert not torch.equal(trace[-1][0], torch.ones(T, dtype=torch.float64))
    torch.testing.assert_close(trace[-1][0].sum(), torch.tensor(3.0, dtype=torch.float64))


def test_period_is_epoch_end_every_n_steps():
    torch.manual_seed(0)
    net = ToyNet(T).double()
    by_hand = train(lb.DWA(T).double(), copy.deepcopy(net))
    by_period = train(lb.DWA(T, period=EPOCH).double(), copy.deepcopy(net), epoch_end=False)
    for (wa, ga), (wb, gb) in zip(by_hand, by_period, strict=True):
        assert torch.equal(wa, wb)
        assert all(torch.equal(u, v) for u, v in zip(ga, gb, strict=True))


def test_epoch_end_refuses_before_anything_changes():
    bal = lb.DWA(2, task_names=["a", "b"])
    with pytest.raises(ValueError, match="no backward since the last epoch_end"):
        bal.epoch_end()
    p = torch.tensor(1.0, requires_grad=True)
    bal.backward([p * 2.0, p * 0.0])
    before = copy.deepcopy(bal.state_dict())
    with pytest.raises(ValueError, match=r"task 1 \('b'\).*0\.0.*> 0"):
        bal.epoch_end()
    assert_same_state(before, bal.state_dict())
    # with period=, the bad average is refused before that step's backward
    bal = lb.DWA(2, period=1)
    q = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(ValueError, match="task 0"):
        bal.backward([q * -1.0, q * 1.0])
    assert q.grad is None and int(bal.epoch_steps) == 0
    with pytest.raises(ValueError, match="temperature"):
        lb.DWA(2, temperature=0.0)
    with pytest.raises(ValueError, match="period"):
        lb.DWA(2, period=0)


def test_a_skipped_step_is_not_averaged():
    bal = lb.DWA(2, on_nonfinite="skip")
    p = torch.tensor(1.0, requires_grad=True)
    bal.backward([p * 2.0, p * 4.0])
    bal.backward([p * float("nan"), p * 4.0])
    assert bal.last_step_skipped and int(bal.epoch_steps) == 1
    bal.epoch_end()
    assert bal.epoch_losses()[1].tolist() == [2.0, 4.0]


positive = st.floats(0.1, 10.0)  # ratios up to 100: exp(-r/T) stays far above float64's tiny


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(positive, positive), min_size=2, max_size=6), st.floats(0.5, 10),
       st.randoms(use_true_random=False), st.floats(1e-3, 1e3))
def test_weights_invariants(pairs, temperature, rnd, k):
    before = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    last = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    w = lb.DWA.weights_from(before, last, temperature)
    K = len(pairs)
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(float(K), dtype=torch.float64))
    perm = list(range(K))
    rnd.shuffle(perm)
    torch.testing.assert_close(lb.DWA.weights_from(before[perm], last[perm], temperature),
                               w[perm])
    # a task's loss in other units (both epochs times k) changes no weight
    scaled_before, scaled_last = before.clone(), last.clone()
    scaled_before[0] *= k
    scaled_last[0] *= k
    torch.testing.assert_close(lb.DWA.weights_from(scaled_before, scaled_last, temperature), w)
    # the task whose loss fell least weighs most
    ratio = last / before
    assert int(w.argmax()) in (ratio == ratio.max()).nonzero().flatten().tolist()
