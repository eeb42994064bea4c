"""The interface every balancer shares.

A balancer turns T task losses into one backward of a weighted total, sum_i w_i L_i, and
updates its weights w from what it measured in that step. It is a ``torch.nn.Module`` so that
``state_dict``/``load_state_dict`` and ``.to(device)`` work as for any model part.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from .. import _checks
from .._checks import LossesLike

SharedLike = Tensor | nn.Module | Iterable[Tensor] | None


def _like(t: Tensor, other: Tensor) -> Tensor:
    """``t.to(other)`` without the call when dtype and device already match.

    A step converts about six T-vectors; skipping their dispatch saved 0.006-0.007x of the
    T = 10 toy step (benchmarks/compare_versions.py, interleaved, at W and at h)."""
    return t if t.dtype == other.dtype and t.device == other.device else t.to(other)


def _set(module: nn.Module, name: str, value: Any) -> None:
    """``setattr`` of a plain attribute past ``nn.Module.__setattr__``, whose checks for
    parameters, buffers and submodules run on each of a step's assignments: 0.014-0.016x of
    the T = 10 toy step (benchmarks/compare_versions.py, interleaved, at W and at h)."""
    object.__setattr__(module, name, value)


def _outside_autocast(t: Tensor) -> AbstractContextManager[Any]:
    """Autocast off on ``t``'s device for a balancer's own arithmetic, when a caller's
    autocast region is on (a trainer runs ``training_step``, where ``loss`` is called, under
    it): inside, the total's matmul sum_i w_i L_i would run in bfloat16/float16, rounding the
    total and, through its backward, every w_i the model's gradients carry (to 3 significant
    digits in bfloat16). Outside, the step runs in the losses' dtype, as without autocast."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return nullcontext()


class Balancer(nn.Module):
    """Base class: validation, the weighted backward, and the non-finite policy.

    Subclasses implement ``weights`` and ``_step(losses, stacked, values, shared, **signals)``,
    where ``losses`` are the T validated scalar losses, ``stacked`` their stack [T] (with
    graph) and ``values`` the detached loss values the balancer's state uses (the stack's, or
    their mean over processes for a distributed GradNorm).
    """

    def __init__(
        self,
        num_tasks: int,
        *,
        task_names: Sequence[str] | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__()
        self.num_tasks = _checks.check_num_tasks(num_tasks)
        self.task_names = _checks.check_task_names(task_names, self.num_tasks)
        self.on_nonfinite = _checks.check_on_nonfinite(on_nonfinite)
        #: What the last step measured, as detached tensors (no host sync to fill it).
        self.stats: dict[str, Tensor] = {}
        #: True when the last ``backward`` was skipped because of a non-finite value.
        self.last_step_skipped = False
        self._scaler: Any = None  # the gradient scaler of the step in progress
        self._deferred: list[Tensor] | None = None  # ``loss``: totals kept, not backpropagated

    @property
    def weights(self) -> Tensor:
        """The task weights w [T] the next ``backward`` uses (a detached copy)."""
        raise NotImplementedError

    def tap(self, h: Tensor) -> tuple[Tensor, ...]:
        """One alias of the shared representation ``h`` per task, for the heads to consume.

        Balancers that need no per-task gradients return ``h`` itself T times, so a training
        loop written for GradNorm's fast path runs unchanged with any balancer.
        """
        if not isinstance(h, Tensor):
            raise TypeError(f"tap expects a tensor, got {type(h).__name__}")
        return (h,) * self.num_tasks

    def backward(self, losses: LossesLike, shared: SharedLike = None, *,
                 grad_scaler: Any = None, **signals: Any) -> Tensor:
        """Backpropagate sum_i w_i L_i (weights detached) and update the weights.

        ``losses``: T scalar tensors (list/tuple, 1-D tensor or dict keyed by ``task_names``).
        ``shared``: the shared parameter(s) at which gradient norms are measured, for balancers
        that use them (GradNorm): a tensor, a list of tensors, or a module (its parameters,
        e.g. ``model.trunk[-2]`` for the last shared layer's weight and bias); ignored by the
        others.
        ``grad_scaler``: a ``torch.amp.GradScaler`` for mixed precision: the backward runs on
        ``grad_scaler.scale(sum_i w_i L_i)`` (then call ``grad_scaler.step(opt)`` and
        ``grad_scaler.update()`` as usual); balancers that measure gradients divide the scale
        out, and skip their own update on a step whose scaled gradients overflowed (the
        scaler skips the optimizer step then too).
        Returns the weighted total (detached, unscaled) for logging.
        """
        items, stacked, values, skipped = self._begin(losses, grad_scaler)
        if skipped is not None:
            return skipped
        with _outside_autocast(stacked):
            return self._step(items, stacked, values, shared, **signals)

    def _begin(self, losses: LossesLike, grad_scaler: Any
               ) -> tuple[list[Tensor], Tensor, Tensor, Tensor | None]:
        """What ``backward`` and ``loss`` do first: the checked losses, their stack [T], the
        loss values the state uses, and, for a non-finite loss under ``on_nonfinite="skip"``,
        the (detached) total to return instead of a step (else None). A non-finite loss
        under "raise" is a ValueError, before anything changes."""
        _set(self, "last_step_skipped", False)
        _set(self, "_scaler", _checks.check_grad_scaler(grad_scaler))
        items = _checks.loss_list(losses, self.num_tasks, self.task_names)
        stacked = torch.stack(items)
        values = self._loss_values(stacked.detach())
        bad = _checks.first_nonfinite(values)
        if bad is None:
            return items, stacked, values, None
        if self.on_nonfinite == "skip":
            self.last_step_skipped = True
            self._skipped_call()
            return items, stacked, values, (self.weights.to(values) * values).sum()
        raise ValueError(
            f"the loss of {_checks.task_label(bad, self.task_names)} is "
            f"{float(values[bad])} (non-finite); pass on_nonfinite='skip' to skip such steps"
        )

    def loss(self, losses: LossesLike, shared: SharedLike = None, **signals: Any) -> Tensor:
        """The weighted total sum_i w_i L_i, with graph, for a trainer to backpropagate.

        ``total.backward()`` (or ``scaler.scale(total).backward()``, or a trainer's own
        backward of it) then gives the model exactly the gradients ``backward(losses,
        shared, **signals)`` gives. Arguments and checks are those of ``backward``, with
        no ``grad_scaler``: a scaler the trainer applies needs no telling. For the balancers
        that measure no gradient (Equal, Static, Uncertainty, DTP, DWA, RLW, GLS, FAMO,
        IMTLL) the balancer's own state changes here as in ``backward`` (DTP smooths its
        KPIs, DWA adds to its epoch, RLW draws, FAMO steps its logits with update="next";
        Uncertainty's and IMTL-L's parameters train through the total's graph). A non-finite
        loss with ``on_nonfinite="skip"`` returns sum_i w_i L_i as a leaf whose backward
        changes no model gradient.
        """
        items, stacked, values, skipped = self._begin(losses, None)
        if skipped is not None:
            return skipped.requires_grad_()
        with _outside_autocast(stacked):
            return self._loss_step(items, stacked, values, shared, **signals)

    def _loss_step(self, losses: list[Tensor], stacked: Tensor, values: Tensor,
                   shared: SharedLike, **signals: Any) -> Tensor:
        """``loss`` past the checks: ``_step`` with its backward kept instead of run."""
        kept: list[Tensor] = []
        _set(self, "_deferred", kept)
        try:
            self._step(losses, stacked, values, shared, **signals)
        finally:
            _set(self, "_deferred", None)
        if len(kept) != 1:
            raise RuntimeError(f"{type(self).__name__}._step ran {len(kept)} backwards, not 1")
        return kept[0]

    def _step(
        self, losses: list[Tensor], stacked: Tensor, values: Tensor, shared: SharedLike,
        **signals: Any
    ) -> Tensor:
        raise NotImplementedError

    def _skipped_call(self) -> None:
        """A call skipped for a non-finite loss (GradNorm counts it in its window)."""

    def _loss_values(self, values: Tensor) -> Tensor:
        """The loss values that the checks and the balancer's state see (here: this step's)."""
        return values

    def _weighted_backward(self, stacked: Tensor, weights: Tensor) -> Tensor:
        """One ordinary backward of sum_i w_i L_i with ``weights`` treated as constants."""
        total = stacked @ _like(weights.detach(), stacked)
        self._backward(total)
        return total.detach()

    def _backward(self, total: Tensor) -> None:
        """``total.backward()``, through this step's gradient scaler when there is one."""
        if self._deferred is not None:  # ``loss``: the caller backpropagates it
            self._deferred.append(total)
            return
        scaler = self._scaler
        torch.autograd.backward(total if scaler is None else scaler.scale(total))

    def _no_signals(self, signals: dict[str, Any]) -> None:
        if signals:
            raise TypeError(
                f"{type(self).__name__}.backward got unexpected arguments {sorted(signals)}"
            )

    def extra_repr(self) -> str:
        names = f", task_names={list(self.task_names)}" if self.task_names else ""
        return f"num_tasks={self.num_tasks}{names}"
