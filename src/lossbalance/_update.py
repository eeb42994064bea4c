"""update: GradNorm's rule and the weights' optimizer step (the step's third stage).

``gradnorm_rule`` is the paper's arithmetic from what *measure* and *combine* produced (L_i,
G_i, the weights w of the step), a function of tensors that can be tested with hand-made
inputs; ``step_weights`` and ``step_log_weights`` move the weights with their optimizer, on w
(the paper) or on s = log w (``GradNorm(log_weights=True)``). ``lossbalance._native``'s
``gradnorm_update`` is the same stage in C++ (paper's update, plain fused Adam only).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._adam import plain_adam_step
from .balancers.base import _like


class GradNormRule(NamedTuple):
    """The terms of Algorithm 1 for one update, each [T]."""

    dweights: Tensor  # dL_grad/dw_i = sign(G_i - target_i) ||grad_W L_i||
    target: Tensor  # target_i = mean_j G_j * r_i^alpha
    loss_ratio: Tensor  # L~_i = L_i / L_i(0)
    inverse_rate: Tensor  # r_i = L~_i / mean_j L~_j
    gap: Tensor  # G_i - target_i; L_grad = sum_i |gap_i|


def gradnorm_rule(grad_norm_w: Tensor, w: Tensor, values: Tensor, initial: Tensor,
                  alpha: float) -> GradNormRule:
    """Chen et al. (ICML 2018), Algorithm 1 and Eq. 2, from G_i = ||grad_W (w_i L_i)||
    (``grad_norm_w``), the weights w of the step, L_i (``values``) and L_i(0) (``initial``):

        ||grad_W L_i|| = G_i / w_i;  L~_i = L_i / L_i(0);  r_i = L~_i / mean_j L~_j
        target_i = mean_j G_j * r_i^alpha;  dL_grad/dw_i = sign(G_i - target_i) ||grad_W L_i||

    Returns every term (``GradNormRule``), in the norms' dtype.
    """
    grad_norm = grad_norm_w / _like(w, grad_norm_w)  # ||grad_W L_i||
    loss_ratio = _like(values / initial, grad_norm)
    inverse_rate = loss_ratio / loss_ratio.mean()
    target = grad_norm_w.mean() * inverse_rate.pow(alpha)
    gap = grad_norm_w - target
    return GradNormRule(torch.sign(gap).mul_(grad_norm), target, loss_ratio, inverse_rate, gap)


def optimizer_step(optimizer: torch.optim.Optimizer, p: Tensor, grad: Tensor) -> None:
    """One step of ``optimizer`` on its single tensor ``p`` with gradient ``grad``."""
    # a plain Adam skips Optimizer.step's bookkeeping (~50 of ~75 us a step, see _adam)
    if not plain_adam_step(optimizer, p, grad):
        p.grad = grad
        optimizer.step()
        p.grad = None


def step_weights(optimizer: torch.optim.Optimizer, weights: Tensor, dweights: Tensor,
                 min_weight: float) -> None:
    """The paper's update of ``weights`` (w, in place): one optimizer step on dL_grad/dw,
    then w <- T * max(w, min_weight) / sum_j max(w_j, min_weight)."""
    optimizer_step(optimizer, weights, _like(dweights, weights))
    weights.clamp_(min=min_weight)
    weights.mul_(weights.numel() / weights.sum())


def step_log_weights(optimizer: torch.optim.Optimizer, log_weights: Tensor, weights: Tensor,
                     dweights: Tensor, w: Tensor, min_weight: float) -> None:
    """The update on s = log w (``log_weights``, stepped by ``optimizer``; ``weights`` gets
    exp(s)), from dL_grad/dw (``dweights``, overwritten) at the step's weights ``w``:

        dL_grad/ds_i = w_i dL_grad/dw_i;  one optimizer step on s;
        s_i <- max(s_i, log min_weight);  s_i <- s_i - log(sum_j exp(s_j) / T);  w = exp(s).
    """
    dlog = dweights.mul_(_like(w, dweights))  # dL_grad/ds_i = w_i dL_grad/dw_i
    optimizer_step(optimizer, log_weights, _like(dlog, log_weights))
    log_weights.clamp_(min=math.log(min_weight))
    log_weights.sub_(torch.logsumexp(log_weights, 0).sub_(math.log(log_weights.numel())))
    torch.exp(log_weights, out=weights)
