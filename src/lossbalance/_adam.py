"""The weights' Adam step without ``Optimizer.step``'s per-call bookkeeping."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import optimizer as _torch_optimizer


def plain_adam_step(opt: torch.optim.Optimizer, p: Tensor, grad: Tensor) -> bool:
    """``opt.step()`` for a plain ``torch.optim.Adam`` on the weights, without its bookkeeping.

    Adam: m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2; with bias corrections
    c1 = 1 - b1^t, c2 = 1 - b2^t: p <- p - (lr / c1) m / (sqrt(v) / sqrt(c2) + eps).
    With ``fused=True`` (GradNorm's default) this is the two operations torch's fused Adam
    runs (the step count, then ``torch._fused_adam_``); otherwise the single-tensor update,
    operation for operation (8). Either way bit for bit what ``opt.step()`` computes, which
    spends several times as long on bookkeeping for a T-vector (in a training loop ~50 us of
    ~75 us for the single-tensor update). Returns False, doing nothing, unless the
    optimizer is exactly ``torch.optim.Adam`` with its state made (after one ordinary step),
    float hyperparameters, no amsgrad/weight decay/maximize/capturable/differentiable and no
    step hooks or wrapper of ``step`` (a learning-rate scheduler wraps it): the caller then
    runs ``opt.step()``.
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
    if (group["amsgrad"] or group["weight_decay"] or group["maximize"]
            or group["capturable"] or group["differentiable"]
            or not all(isinstance(v, float | int) for v in (lr, beta1, beta2, eps))):
        return False
    step_t, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
    step_t += 1
    if group["fused"]:
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
