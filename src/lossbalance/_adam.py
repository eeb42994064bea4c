"""The weights' Adam step without ``Optimizer.step``'s per-call bookkeeping."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.optim import optimizer as _torch_optimizer

_NUMBERS = (float, int)  # plain Python numbers (a tensor learning rate is not)


class AdamArgs(NamedTuple):
    """What one plain Adam step of a single tensor reads: its state and hyperparameters."""

    step: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    lr: float
    beta1: float
    beta2: float
    eps: float
    fused: bool


def plain_adam_args(opt: torch.optim.Optimizer, p: Tensor) -> AdamArgs | None:
    """The state and hyperparameters of ``p``'s step when ``opt`` is a plain Adam, else None.

    Plain: exactly ``torch.optim.Adam`` with one parameter group and its state made (after
    one ordinary step), float hyperparameters, no amsgrad/weight decay/maximize/capturable/
    differentiable, and no step hooks or wrapper of ``step`` (a learning-rate scheduler
    wraps it): anything else must run ``opt.step()``.
    """
    if type(opt) is not torch.optim.Adam:
        return None
    state, groups = opt.state.get(p), opt.param_groups
    if not state or len(groups) != 1:
        return None
    if ("step" in opt.__dict__  # wrapped on the instance, e.g. by a learning-rate scheduler
            or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks
            or _torch_optimizer._global_optimizer_pre_hooks
            or _torch_optimizer._global_optimizer_post_hooks):
        return None
    group = groups[0]
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    if (group["amsgrad"] or group["weight_decay"] or group["maximize"]
            or group["capturable"] or group["differentiable"]
            or type(lr) not in _NUMBERS or type(beta1) not in _NUMBERS
            or type(beta2) not in _NUMBERS or type(eps) not in _NUMBERS):
        return None
    return AdamArgs(state["step"], state["exp_avg"], state["exp_avg_sq"], lr, beta1, beta2,
                    eps, bool(group["fused"]))


def plain_adam_step(opt: torch.optim.Optimizer, p: Tensor, grad: Tensor) -> bool:
    """``opt.step()`` for a plain ``torch.optim.Adam`` on the weights, without its bookkeeping.

    Adam: m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2; with bias corrections
    c1 = 1 - b1^t, c2 = 1 - b2^t: p <- p - (lr / c1) m / (sqrt(v) / sqrt(c2) + eps).
    With ``fused=True`` (GradNorm's default) this is the two operations torch's fused Adam
    runs (the step count, then ``torch._fused_adam_``); otherwise the single-tensor update,
    operation for operation (8). Either way bit for bit what ``opt.step()`` computes, which
    spends several times as long on bookkeeping for a T-vector (in a training loop ~50 us of
    ~75 us for the single-tensor update). Returns False, doing nothing, unless the optimizer
    is plain (``plain_adam_args``): the caller then runs ``opt.step()``.
    """
    args = plain_adam_args(opt, p)
    if args is None:
        return False
    step_t, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, fused = args
    step_t += 1
    if fused:
        torch._fused_adam_([p], [grad], [exp_avg], [exp_avg_sq], [], [step_t], amsgrad=False,
                           lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps,
                           maximize=False, grad_scale=None, found_inf=None)
        return True
    step = float(step_t)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / ((1 - beta2**step) ** 0.5)).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-(lr / (1 - beta1**step)))
    return True
