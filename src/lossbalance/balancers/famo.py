"""FAMO: Liu, Feng, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023
(Algorithm 1; its practical form, Algorithm 2 in Appendix C, and the official code).

Task logits xi (0 at the start) give z = softmax(xi). With b_i the losses' lower bounds
(``min_losses``, 0 by default) and D_i = L_i(theta_t) - b_i + eps, the model's update direction
is

    d_t = c_t sum_i (z_i / D_i) grad L_i,     c_t = ( sum_j z_j / D_j )^(-1),

the gradient of sum_i w_i L_i with w_i = c_t z_i / D_i held constant (the weights sum to 1;
the official code backpropagates c_t sum_i z_i log D_i, whose gradient is the same). After the
model's step, the logits learn from how much each loss fell:

    delta_i = log D_i(theta_t) - log D_i(theta_{t+1})
    xi <- xi - beta ( J_z(xi)^T delta + gamma xi )

J_z the softmax's Jacobian (J^T delta = z * (delta - z . delta)); as in Algorithm 2 and the
official code, this is an Adam step (lr beta, weight decay gamma) on the gradient
J_z(xi)^T delta, so tasks whose loss fell least gain weight.

L(theta_{t+1}) is where the update needs a loss after the step. Two ways:

- ``update="next"`` (the default, O(1) and no extra forward): the next ``backward``'s losses
  stand for L(theta_{t+1}); that call first updates xi from its own losses and the previous
  call's, then weights its losses. delta then also holds the change of batch.
- ``update="explicit"``: after ``optimizer.step()`` the caller evaluates the same batch again
  (under ``torch.no_grad()``) and calls ``bal.update(new_losses)``, as the official code
  does: one more forward a step, the paper's delta exactly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _checks
from .base import Balancer, SharedLike

UPDATES = ("next", "explicit")


class FAMO(Balancer):
    """Fast Adaptive Multitask Optimization (module docstring).

    Args:
        num_tasks: T >= 2.
        lr: beta, the logits' Adam learning rate (> 0); the paper's 0.025.
        gamma: the logits' weight decay (>= 0); Algorithm 2's and LibMTL's 1e-3 (the official
            code's default is 1e-5, its example script's 0.01).
        min_losses: b, a lower bound of each loss (T numbers; 0 by default).
        eps: added to L_i - b_i before the log and the division (> 0); the paper's 1e-8.
        update: "next" (the next ``backward``'s losses; the default) or "explicit"
            (``bal.update(new_losses)`` after each optimizer step).

    ``weights`` are the last step's w (1/T each before the first step); ``stats`` after a
    step: ``weight`` (w), ``z`` (softmax(xi)) and ``logits`` (xi) used.
    """

    def __init__(
        self,
        num_tasks: int,
        lr: float = 0.025,
        gamma: float = 1e-3,
        *,
        min_losses: Sequence[float] | Tensor | None = None,
        eps: float = 1e-8,
        update: str = "next",
        task_names: Sequence[str] | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__(num_tasks, task_names=task_names, on_nonfinite=on_nonfinite)
        self.lr = _checks.check_positive("lr", lr)
        self.gamma = _checks.check_nonnegative("gamma", gamma)
        self.eps = _checks.check_positive("eps", eps)
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        self.update_mode = update
        b = torch.zeros(num_tasks)
        if min_losses is not None:
            b = torch.as_tensor(
                min_losses.detach().cpu() if isinstance(min_losses, Tensor) else list(min_losses),
                dtype=torch.float32).reshape(-1)
            if b.numel() != num_tasks:
                raise ValueError(f"min_losses has {b.numel()} values, expected {num_tasks}")
            for i, value in enumerate(b.tolist()):
                if not math.isfinite(value):
                    raise ValueError(f"min_losses of {_checks.task_label(i, self.task_names)} "
                                     f"is {value}; it must be finite")
        self.register_buffer("min_losses", b)
        self.register_buffer("logits", torch.zeros(num_tasks))  # xi
        self.register_buffer("task_weights", torch.full((num_tasks,), 1.0 / num_tasks))
        # The last step's loss values L(theta_t), waiting for L(theta_{t+1}).
        self.register_buffer("previous_losses", torch.full((num_tasks,), float("nan")))
        self.register_buffer("has_previous", torch.zeros((), dtype=torch.bool))
        self._optimizer = torch.optim.Adam([self.logits], lr=self.lr, weight_decay=self.gamma)

    @staticmethod
    def weights_from(z: Tensor, gaps: Tensor) -> Tensor:
        """w_i = c z_i / D_i with c = 1 / sum_j z_j / D_j, for D = L - b + eps (``gaps``)."""
        ratio = z / gaps
        return ratio / ratio.sum()

    @property
    def weights(self) -> Tensor:
        return self.task_weights.detach().clone()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The Adam that steps the logits xi (lr beta, weight decay gamma)."""
        return self._optimizer

    def _gaps(self, values: Tensor, what: str) -> Tensor:
        """D = L - b + eps, refused (ValueError naming the task) unless every D > 0."""
        gaps = values.to(self.logits) - self.min_losses + self.eps
        for i, value in enumerate(gaps.tolist()):
            if not value > 0:
                raise ValueError(
                    f"{what} of {_checks.task_label(i, self.task_names)} is "
                    f"{float(values[i])}, not above its min_losses "
                    f"{float(self.min_losses[i])}: FAMO needs L_i - b_i + eps > 0"
                )
        return gaps

    def _update_logits(self, gaps: Tensor) -> None:
        """One Adam step of xi on J_z(xi)^T delta, delta = log D(prev) - log D(gaps)."""
        previous = self.previous_losses - self.min_losses + self.eps
        delta = torch.log(previous) - torch.log(gaps)
        z = torch.softmax(self.logits, dim=0)
        self.logits.grad = z * (delta - (z * delta).sum())
        try:
            self._optimizer.step()
        finally:
            self.logits.grad = None
        self.has_previous.fill_(False)

    def _step(self, losses: list[Tensor], stacked: Tensor, values: Tensor,
              shared: SharedLike, **signals: Any) -> Tensor:
        self._no_signals(signals)
        pending = bool(self.has_previous)
        if pending and self.update_mode == "explicit":
            raise RuntimeError(
                "FAMO(update='explicit'): call bal.update(new_losses) after the optimizer "
                "step, before the next backward"
            )
        gaps = self._gaps(values, "the loss")
        if pending:  # update="next": these losses are L(theta_{t+1}) of the previous step
            self._update_logits(gaps)
        z = torch.softmax(self.logits, dim=0)
        weights = self.weights_from(z, gaps)
        total = self._weighted_backward(stacked, weights)
        self.task_weights.copy_(weights)
        self.previous_losses.copy_(values)
        self.has_previous.fill_(True)
        self.stats = {"weight": weights, "z": z, "logits": self.logits.detach().clone()}
        return total

    def update(self, new_losses: _checks.LossesLike | Sequence[float]) -> None:
        """``update="explicit"``: step xi with delta from the last ``backward``'s losses and
        ``new_losses``, the same batch's losses after the optimizer step (T scalar tensors or
        numbers, a 1-D tensor, or a dict keyed by ``task_names``; no graph needed).

        A non-finite new loss follows ``on_nonfinite``: "raise" (ValueError, nothing
        changed) or "skip" (xi stays, the step's losses are dropped). After a ``backward``
        skipped for a non-finite loss there is nothing to update and this does nothing.
        """
        if self.update_mode != "explicit":
            raise RuntimeError(
                "FAMO.update is for FAMO(update='explicit'); with update='next' the next "
                "backward updates the logits from its own losses"
            )
        values = self._new_values(new_losses)
        if not bool(self.has_previous):
            if self.last_step_skipped:
                return
            raise RuntimeError("FAMO.update: no backward since the last update")
        bad = _checks.first_nonfinite(values)
        if bad is not None:
            if self.on_nonfinite == "skip":
                self.has_previous.fill_(False)
                self.last_step_skipped = True
                return
            raise ValueError(
                f"the new loss of {_checks.task_label(bad, self.task_names)} is "
                f"{float(values[bad])} (non-finite); pass on_nonfinite='skip' to skip such "
                "updates"
            )
        self._update_logits(self._gaps(values, "the new loss"))

    def _new_values(self, new_losses: Any) -> Tensor:
        """The T new loss values, detached, as a tensor like the logits."""
        if isinstance(new_losses, Tensor) and new_losses.dim() == 1:
            items: list[Any] = list(new_losses.unbind(0))
        elif isinstance(new_losses, dict):
            if self.task_names is None:
                raise TypeError(
                    "new_losses is a dict but the balancer was built without task_names=")
            if set(new_losses) != set(self.task_names):
                raise ValueError(f"new_losses has keys {sorted(map(str, new_losses))}, "
                                 f"expected {list(self.task_names)}")
            items = [new_losses[name] for name in self.task_names]
        elif isinstance(new_losses, Sequence) and not isinstance(new_losses, (str, bytes)):
            items = list(new_losses)
        else:
            raise TypeError(
                "new_losses must be a list/tuple of scalars, a 1-D tensor or a dict, got "
                f"{type(new_losses).__name__}")
        if len(items) != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} new losses, got {len(items)}")
        out = []
        for i, item in enumerate(items):
            if isinstance(item, Tensor):
                if item.numel() != 1:
                    raise ValueError(
                        f"the new loss of {_checks.task_label(i, self.task_names)} must be a "
                        f"scalar, got shape {tuple(item.shape)}")
                out.append(item.detach().reshape(()).to(self.logits))
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                out.append(torch.tensor(float(item)).to(self.logits))
            else:
                raise TypeError(
                    f"the new loss of {_checks.task_label(i, self.task_names)} must be a "
                    f"tensor or a number, got {type(item).__name__}")
        return torch.stack(out)

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": copy.deepcopy(self._optimizer.state_dict())}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``.to()``/``.double()``...: move xi and, in place, its optimizer's state."""
        saved = self._optimizer.state_dict()
        super()._apply(fn, recurse)
        self._optimizer.param_groups[0]["params"] = [self.logits]
        self._optimizer.state.clear()
        self._optimizer.load_state_dict(saved)
        return self

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, lr={self.lr}, gamma={self.gamma}, "
                f"update={self.update_mode!r}")
