"""Each aggregation method's balancer against the literal step with its paper's rule.

The literal step (tests/balancers/test_aggregator.py: per-task ``autograd.grad`` at h or at
the parameters, the Gram matrix of those vectors, the update applied by hand) with the
method's rule from ``lossbalance._rules`` (each checked against its paper on vectors in
tests/rules), and the method's state kept by the literal side as the paper keeps it
(PCGrad's generator with the same seed, Nash-MTL's previous alpha): c, G, every ``.grad``
and the parameters over 20 optimizer steps, at h and at W. And each method's options,
state and input checks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_aggregator import balancer_step, make, run_both

import lossbalance as lb
from lossbalance import _rules

F64 = {"rtol": 1e-6, "atol": 1e-10}


def literal_rules():
    """name -> (balancer, the rule as the literal side runs it: a function of G)."""
    generator = torch.Generator().manual_seed(7)
    previous = [None]

    def nash(gram):
        alpha = _rules.nash_mtl_weights(gram, previous=previous[0])
        previous[0] = alpha
        return alpha

    return {
        "mgda": (lb.MGDA(3), _rules.mgda_weights),
        "mgda-l2": (lb.MGDA(3, normalize="l2"),
                    lambda g: _rules.mgda_weights(g, normalize="l2")),
        "pcgrad": (lb.PCGrad(3, seed=7),
                   lambda g: _rules.pcgrad_weights(g, generator=generator)),
        "cagrad": (lb.CAGrad(3), _rules.cagrad_weights),
        "cagrad-0.2": (lb.CAGrad(3, c=0.2, rescale=0),
                       lambda g: _rules.cagrad_weights(g, c=0.2, rescale=0)),
        "imtl-g": (lb.IMTLG(3), _rules.imtl_g_weights),
        "nash-mtl": (lb.NashMTL(3), nash),
        "aligned-mtl": (lb.AlignedMTL(3), _rules.aligned_mtl_weights),
        "upgrad": (lb.UPGrad(3), _rules.upgrad_weights),
    }


@pytest.mark.parametrize("where", ["h", "W"])
@pytest.mark.parametrize("name", sorted(literal_rules()))
def test_matches_literal_step_with_the_papers_rule(name, where):
    bal, rule = literal_rules()[name]
    bal = run_both(where, rule, instance=bal.double())
    if name.startswith("mgda"):
        torch.testing.assert_close(bal.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_pcgrad_state_dict_carries_the_generator():
    net, x, ys = make(3)
    bal = lb.PCGrad(3, seed=3).double()
    balancer_step(bal, net, x, ys, "h")
    state = copy.deepcopy(bal.state_dict())
    resumed = lb.PCGrad(3, seed=99).double()
    resumed.load_state_dict(state)
    for _ in range(3):
        balancer_step(bal, copy.deepcopy(net), x, ys, "h")
        balancer_step(resumed, copy.deepcopy(net), x, ys, "h")
        assert torch.equal(bal.weights, resumed.weights)
    assert torch.equal(bal._generator.get_state(), resumed._generator.get_state())


def test_nash_mtl_warm_start_is_state():
    net, x, ys = make(3)
    bal = lb.NashMTL(3).double()
    assert torch.isnan(bal.previous).all()
    balancer_step(bal, net, x, ys, "W")
    assert torch.equal(bal.previous, bal.weights)
    resumed = lb.NashMTL(3).double()
    resumed.load_state_dict(bal.state_dict())
    assert torch.equal(resumed.previous, bal.previous)


def test_a_total_never_backpropagated_draws_nothing():
    # PCGrad at parameters draws its orders when loss() is called; they are committed only
    # when the total's backward runs
    net, x, ys = make(3)
    bal = lb.PCGrad(3, seed=3).double()
    state = bal._generator.get_state()
    h = net.trunk(x)
    bal.loss([torch.nn.functional.mse_loss(net.heads[i](h), ys[i]) for i in range(3)],
             net.trunk[2].weight)
    assert torch.equal(bal._generator.get_state(), state)


def test_options_are_checked():
    with pytest.raises(ValueError, match="normalize"):
        lb.MGDA(3, normalize="loss")
    with pytest.raises(ValueError, match="seed"):
        lb.PCGrad(3, seed=-1)
    with pytest.raises(ValueError, match="c must be"):
        lb.CAGrad(3, c=-0.1)
    with pytest.raises(ValueError, match="rescale"):
        lb.CAGrad(3, rescale=3)
    with pytest.raises(ValueError, match="max_norm"):
        lb.NashMTL(3, max_norm=float("inf"))
    with pytest.raises(ValueError, match="optim_niter"):
        lb.NashMTL(3, optim_niter=0)
    with pytest.raises(ValueError, match="num_tasks"):
        lb.UPGrad(1)


@pytest.mark.parametrize("name", ["mgda", "cagrad", "imtl-g", "nash-mtl", "aligned-mtl",
                                  "upgrad"])
def test_permuting_tasks_permutes_the_coefficients(name):
    # (PCGrad's random orders are drawn per task index: a permutation changes the draw)
    net, x, ys = make(3)
    order = [2, 0, 1]
    nets = [copy.deepcopy(net), copy.deepcopy(net)]
    bals = [literal_rules()[name][0].double(), literal_rules()[name][0].double()]
    for _ in range(3):
        for k, o in enumerate((None, order)):
            nets[k].zero_grad()
            balancer_step(bals[k], nets[k], x, ys, "h", order=o)
        torch.testing.assert_close(bals[1].weights, bals[0].weights[order], **F64)
        for pa, pb in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, **F64)


@pytest.mark.parametrize("make", [lb.MGDA, lb.UPGrad, lb.CAGrad], ids=["mgda", "upgrad", "cagrad"])
def test_a_missing_solver_is_named_at_construction(make, monkeypatch):
    import importlib

    real = importlib.import_module

    def without_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError("no scipy here")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_scipy)
    with pytest.raises(ImportError, match=r"scipy.*solvers"):
        make(3)
