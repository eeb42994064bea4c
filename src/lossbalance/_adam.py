"""The weights' Adam step without ``Optimizer.step``'s per-call bookkeeping."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import optimizer as _torch_optimizer


def plain_adam_step(opt: torch.optim.Optimizer, p: Tensor, grad: Tensor) -> bool:
    """``opt.step()`` for a plain ``torch.optim.Adam`` on the weights, in 8 tensor operations.

    The update of torch's single-tensor Adam, operation for operation (so bit for bit on CPU):
    m <- lerp(m, g, 1 - b1); v <- b2 v + (1 - b2) g^2; with bias corrections
    c1 = 1 - b1^t, c2 = 1 - b2^t: p <- p - (lr / c1) m / (sqrt(v) / sqrt(c2) + eps).
    ``Optimizer.step`` spends as long again on bookkeeping for a T-vector (measured ~50 us of
    a ~75 us step inside a training loop). Returns False, doing nothing, unless the
    optimizer is exactly ``torch.optim.Adam`` with its state made (after one ordinary step),
    float hyperparameters, no amsgrad/weight decay/maximize/fused/capturable/differentiable
    and no step hooks or wrapper of ``step`` (a learning-rate scheduler wraps it): the caller
    then runs ``opt.step()``.
    """
    state = opt.state.get(p)
    if not state or type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1:
        return False
    if ("step" in vars(opt)  # wrapped on the instance, e.g. by a learning-rate scheduler
            or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks
            or _torch_optimizer._global_optimizer_pre_hooks
            or _torch_optimizer._global_optimizer_post_hooks):
        return False
    group = opt.param_groups[0]
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    if (group["amsgrad"] or group["weight_decay"] or group["maximize"] or group["fused"]
            or group["capturable"] or group["differentiable"]
            or not all(isinstance(v, float | int) for v in (lr, beta1, beta2, eps))):
        return False
    step_t, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
    step_t += 1
    step = float(step_t)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / ((1 - beta2**step) ** 0.5)).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-(lr / (1 - beta1**step)))
    return True
