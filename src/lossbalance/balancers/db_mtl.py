"""DB-MTL: B. Lin et al., "Dual-Balancing for Multi-Task Learning" (DB-MTL,
"Dual-Balancing Multi-Task Learning"), arXiv:2308.12029 (2023), Algorithm 1.

Two balancings, one of the losses and one of the gradients at the shared parameters theta:

* loss scale: each task's loss enters through its logarithm, log(L_i + eps), so that a task
  whose loss is 100 times another's has the same gradient as if both were of one scale
  (the gradient of log L_i is grad L_i / L_i);
* gradient magnitude: at step t (t = 1, 2, ...) with g_i(t) = grad_theta log(L_i + eps),

      ghat_i(t) = beta_t ghat_i(t-1) + (1 - beta_t) g_i(t),    beta_t = beta / t^sigma,
                                                               ghat_i(0) = 0,
      alpha_i   = max_j ||ghat_j(t)|| / (||ghat_i(t)|| + eps),
      d         = sum_i alpha_i ghat_i(t),

  so that every task's (smoothed) gradient enters d with the norm of the largest one, and d
  is the update at theta (not divided by T). Every other parameter (the heads, and whatever
  lies outside ``shared``) gets the gradient of sum_i log(L_i + eps).

The defaults are the official code's (LibMTL, ``LibMTL/weighting/DB_MTL.py`` and its
config): beta = 0.9, sigma = 0 (a constant beta), eps = 1e-8 both inside the logarithm and
under the norm, the EMA started at zero with no bias correction, and the sum of the
rescaled gradients as the update. The official code refuses representation gradients
(``rep_grad``); so does this class: an EMA kept at h would average the gradients of
different samples from step to step. ``shared`` must be parameters (leaf tensors).

How a step runs here: the per-task gradients of L_i at ``shared`` (one ``autograd.grad``
per task, or one batched call), times w_i = 1 / (L_i + eps), are g_i(t) [T, P]; the EMA
and d are formed from them; then one ordinary backward of sum_i w_i L_i with w held
constant (whose gradient is that of sum_i log(L_i + eps)) gives every parameter outside
``shared`` its gradient, and the shared parameters' ``.grad`` gets d - sum_i g_i(t) added
(at the start of that backward), so that they hold d once it has run. ``bal.loss(...)``
returns that total for a trainer to backpropagate, with the same effect bit for bit; its
value is sum_i log(L_i + eps).

Over processes (DDP, ``distributed``): L_i is the mean over the processes and g_i(t) the
mean of their per-task gradients (one all-reduce of T x P numbers), so g_i(t) =
grad log(L_i + eps) of the whole batch, as one process on it would have, and every process
holds the same ghat and d. Accumulation windows (``accumulation_steps=k``): each call
backpropagates 1/k of its own sum_i w_i L_i (w from its own losses), the window sums the
calls' g_i, and its last call makes the EMA step and corrects ``.grad``: the window's g_i is
the mean over its micro-batches of grad log(L_i^(m) + eps), what accumulating the backward
of sum_i log L_i gives (not the gradient of the log of the window's mean loss, which would
need that mean before the window's first backward).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _checks, _graph
from .._combine import (
    Window,
    check_distributed,
    is_synced,
    mean_over_processes,
    process_group,
)
from .._taps import Site, measure_general, row_norms
from .base import Balancer, SharedLike, _like, _set
from .gradnorm import _Deferred, arrived_scale


class _Pending:
    """What one call leaves for its backward, held by the total's graph only: a total never
    backpropagated changes nothing. ``arrived`` runs first in that backward."""

    def __init__(self, bal: DBMTL, values: Tensor, vectors: Tensor, norms: Tensor,
                 shared: list[Tensor]) -> None:
        self.bal, self.values, self.vectors, self.norms = bal, values, vectors, norms
        self.shared = shared
        self.scale: Tensor | None = None
        self.factor = bal.accumulation_steps if bal._undivided else 1

    def arrived(self, grad: Tensor) -> None:
        if self.scale is not None:  # a second backward through the graph: nothing again
            return
        # a loss() total under caller_divides was divided by k by the caller: grad = s/k
        self.scale = arrived_scale(grad, self.factor)
        try:
            self.bal._finish(self)
        finally:
            self.vectors = None  # the per-task gradients: not kept


class DBMTL(Balancer):
    """Dual-balancing multi-task learning: log losses, and the tasks' EMA'd gradients at the
    shared parameters rescaled to the largest one's norm (Algorithm 1).

    Args:
        num_tasks: T >= 2.
        beta: the EMA's coefficient, in [0, 1) (0.9, the official code's default).
        sigma: beta_t = beta / t^sigma (>= 0; 0, the official default, keeps beta constant).
        eps: added to each loss inside the logarithm and to each norm under alpha's
            division (>= 0; 1e-8 as in the official code). A loss below 0 (or 0 with
            ``eps=0``) is a ValueError.
        task_names: names, to pass losses as a dict and to name tasks in errors.
        on_nonfinite: "raise" (default) or "skip" for a non-finite loss or per-task
            gradient; both are found before the model's backward, so ``.grad`` and the
            balancer's state are untouched either way.
        distributed: DDP: None (default) synchronises when torch.distributed runs more than
            one process, True (the default group) or a process group always, False never.
        accumulation_steps: k micro-batches per optimizer step (see the module docstring).
        general_path: "loop" (default, one ``autograd.grad`` per task) or "batched" (one
            vmapped call) for the per-task gradients.
        caller_divides: concerns ``loss()`` inside an accumulation window only, as for
            ``Aggregator``: True when whoever backpropagates the total divides it by k
            itself (Lightning's ``accumulate_grad_batches``, Accelerate's
            ``gradient_accumulation_steps``); the total is then returned undivided.

    ``backward(losses, shared=params)`` needs ``shared``: the shared parameters theta (a
    tensor, a list, or a module). ``tap(h)`` returns h for every head and changes nothing
    (the gradients are taken at ``shared`` all the same). ``weights``: the last alpha (ones
    before the first step). ``stats`` after a step: ``weight`` (alpha), ``grad_norm``
    (||g_i(t)||, this step's gradients of log(L_i + eps)) and ``ema_norm`` (||ghat_i(t)||).
    The EMA itself is the buffer ``grad_ema`` [T, P] (P: the number of shared parameters'
    elements, in ``shared``'s order; [T, 0] before the first step), in ``state_dict``.
    """

    def __init__(
        self,
        num_tasks: int,
        *,
        beta: float = 0.9,
        sigma: float = 0.0,
        eps: float = 1e-8,
        task_names: Sequence[str] | None = None,
        on_nonfinite: str = "raise",
        distributed: bool | Any | None = None,
        accumulation_steps: int = 1,
        general_path: str = "loop",
        caller_divides: bool = False,
    ) -> None:
        super().__init__(num_tasks, task_names=task_names, on_nonfinite=on_nonfinite)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ValueError(f"DBMTL: beta must be a number in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.sigma = _checks.check_nonnegative("sigma", sigma)
        self.eps = _checks.check_nonnegative("eps", eps)
        self.distributed = check_distributed(distributed)
        self.accumulation_steps = _checks.check_int_at_least(
            "accumulation_steps", accumulation_steps, 1)
        if general_path not in ("loop", "batched"):
            raise ValueError(f"general_path must be 'loop' or 'batched', got {general_path!r}")
        self.general_path = general_path
        self.caller_divides = _checks.check_bool("caller_divides", caller_divides)
        self._undivided = False  # this call's total is undivided (loss() under caller_divides)
        self._window = Window(accumulation_steps)
        self.register_buffer("task_weights", torch.ones(num_tasks))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("grad_ema", torch.zeros(num_tasks, 0))

    # ------------------------------------------------------------------ public
    @property
    def weights(self) -> Tensor:
        """The last alpha_i = max_j ||ghat_j|| / (||ghat_i|| + eps) (ones before the first
        step), detached."""
        return self.task_weights.detach().clone()

    def backward(self, losses: _checks.LossesLike, shared: SharedLike = None, *,
                 grad_scaler: Any = None, **signals: Any) -> Tensor:
        """One step: ``shared`` (the shared parameters) get d = sum_i alpha_i ghat_i, every
        other parameter the gradient of sum_i log(L_i + eps). ``grad_scaler``: the backward
        runs on the scaled total, and d is scaled alike. Returns sum_i log(L_i + eps)
        (detached; 1/k of it in an accumulation window)."""
        _set(self, "_undivided", False)  # backward divides a window's total by k itself
        return super().backward(losses, shared, grad_scaler=grad_scaler, **signals)

    def loss(self, losses: _checks.LossesLike, shared: SharedLike = None,
             **signals: Any) -> Tensor:
        """The total (value sum_i log(L_i + eps)) whose ordinary backward does what
        ``backward`` does; the EMA and ``weights`` change in that backward only. In a
        window it is 1/k of the call's sum_i log(L_i + eps), or undivided with
        ``caller_divides=True``."""
        _set(self, "_undivided", self.caller_divides and self.accumulation_steps > 1)
        return super().loss(losses, shared, **signals)

    # ------------------------------------------------------------------ the step
    def _step(self, losses: list[Tensor], stacked: Tensor, values: Tensor, shared: SharedLike,
              **signals: Any) -> Tensor:
        total = self._total(losses, stacked, values, shared, signals)
        if total.requires_grad:
            self._backward(total)
        return total.detach()

    def _loss_step(self, losses: list[Tensor], stacked: Tensor, values: Tensor,
                   shared: SharedLike, **signals: Any) -> Tensor:
        total = self._total(losses, stacked, values, shared, signals)
        return total if total.requires_grad else total.requires_grad_()

    def _total(self, losses: list[Tensor], stacked: Tensor, values: Tensor, shared: SharedLike,
               signals: dict[str, Any]) -> Tensor:
        """Checks, the per-task gradients, and the total to backpropagate (wrapped: its
        backward runs the EMA step), or a detached one when a non-finite gradient skips."""
        self._no_signals(signals)
        shared_list = self._check_shared(shared)
        self._check_losses(values)
        self._check_graph(losses, shared_list)
        size = sum(t.numel() for t in shared_list)
        k = self.accumulation_steps
        window = k > 1
        if self.grad_ema.shape[1] and self.grad_ema.shape[1] != size:
            raise ValueError(
                f"DBMTL: the shared parameters have {size} elements, but the gradients' EMA "
                f"was kept for {self.grad_ema.shape[1]}: pass the same shared= every step"
            )
        if window:
            self._window.check(False, (self.num_tasks, size))
        w = 1.0 / (values + self.eps)  # d log(L_i + eps) / dL_i
        site = Site(None, shared_list, None, False, keep=True)
        measured = measure_general(losses, site, w, self.general_path == "batched", None)
        vectors, norms = measured.vectors, measured.norms  # g_i = w_i dL_i/dtheta
        assert vectors is not None
        synced = self._synced()
        if synced and not window:
            vectors = mean_over_processes(vectors, self._group(), in_place=True)
            norms = row_norms(vectors)
        elif synced:  # T numbers, so that every process agrees on a non-finite one
            norms = mean_over_processes(norms, self._group())
        logs = torch.log(values + self.eps)
        bad = _checks.first_nonfinite(norms)
        if bad is not None:
            self._nonfinite(bad, norms)
            if window:
                self._window.add_skipped()
            return logs.sum() if self._undivided else logs.sum() / k  # no backward
        if window:
            vectors, norms = vectors.div_(k), norms / k
        pending = _Pending(self, values, vectors, norms, shared_list)
        # gradient w_i / k at L_i, as sum_i log(L_i + eps) / k; value sum_i log(L_i + eps) / k
        total = ((stacked - _like(values, stacked)) @ _like(w, stacked)
                 + _like(logs, stacked).sum())
        if not self._undivided:
            total = total / k
        return _Deferred.apply(total, pending)

    def _finish(self, pending: _Pending) -> None:
        """At the total's arrival: the EMA step (at a window's last call), alpha, d, and the
        correction of the shared parameters' ``.grad`` to d."""
        vectors, norms = pending.vectors, pending.norms
        assert vectors is not None and pending.scale is not None
        if self.accumulation_steps > 1:
            out = self._window.add(pending.values, norms, False, True, vectors)
            if out is None:
                return
            _, _, finite, vectors = out
            if not finite:
                self.last_step_skipped = True
                return
            assert vectors is not None
            if self._synced():
                vectors = mean_over_processes(vectors, self._group(), in_place=True)
            norms = row_norms(vectors)
            bad = _checks.first_nonfinite(norms)
            if bad is not None:  # finite parts whose sum overflowed
                self._nonfinite(bad, norms)
                return
        # .grad of the shared parameters holds (scale times) the sum of the rows of vectors
        # once this backward (or the window's) is done; add the difference to d
        ema, t = self._ema_step(vectors)
        ema_norms = row_norms(ema)
        alpha = ema_norms.max() / (ema_norms + self.eps)
        direction = alpha @ ema
        delta = (direction - vectors.sum(dim=0)) * pending.scale.to(direction)
        start = 0
        for p in pending.shared:
            part = delta[start:start + p.numel()].view_as(p).to(p.dtype)
            start += p.numel()
            if p.grad is None:
                p.grad = part.clone()
            else:
                p.grad.add_(part)
        self._buffers["grad_ema"] = ema
        self.task_weights.copy_(alpha)
        self.num_steps.fill_(t)
        _set(self, "stats", {"weight": alpha.clone(), "grad_norm": norms.detach().clone(),
                             "ema_norm": ema_norms})

    def _ema_step(self, vectors: Tensor) -> tuple[Tensor, int]:
        """ghat(t) = beta_t ghat(t-1) + (1 - beta_t) g(t), beta_t = beta / t^sigma (a new
        tensor: the state changes at the commit), and t."""
        t = int(self.num_steps) + 1
        beta_t = self.beta / t ** self.sigma
        previous = self.grad_ema
        if previous.shape != vectors.shape:  # the first step: ghat(0) = 0
            previous = torch.zeros_like(vectors)
        return torch.lerp(previous.to(vectors), vectors, 1.0 - beta_t), t

    def _nonfinite(self, bad: int, norms: Tensor) -> None:
        """A non-finite gradient: skip (``on_nonfinite="skip"``, or under a gradient
        scaler) or a ValueError naming the task; found before the model's backward."""
        if self.on_nonfinite == "skip" or self._scaler is not None:
            self.last_step_skipped = True
            return
        raise ValueError(
            f"the gradient of log(L + eps) of {_checks.task_label(bad, self.task_names)} is "
            f"non-finite (norm {float(norms[bad])}) with finite losses; the balancer's state "
            "and the model's .grad are untouched. Pass on_nonfinite='skip' to skip such steps"
        )

    # ------------------------------------------------------------------ checks
    def _check_shared(self, shared: SharedLike) -> list[Tensor]:
        if shared is None:
            raise ValueError(
                "DBMTL needs shared= the shared parameters (e.g. shared=model.trunk): "
                "its gradients' EMA is kept at parameters. Gradients at the representation "
                "h (a tap, LibMTL's rep_grad) are refused, as the official code refuses them: "
                "an EMA at h would average the gradients of different samples"
            )
        shared_list = _checks.shared_tensors(shared)
        for k, t in enumerate(shared_list):
            if not t.is_leaf:
                raise ValueError(
                    f"DBMTL: shared[{k}] is not a parameter (a leaf tensor) but an "
                    "intermediate tensor such as the representation h; the gradients' EMA "
                    "is kept at parameters only (an EMA at h would average the gradients of "
                    "different samples): pass the shared parameters"
                )
        _checks.check_requires_grad(shared_list)
        return shared_list

    def _check_losses(self, values: Tensor) -> None:
        """log(L_i + eps) needs L_i + eps > 0; a negative loss is refused outright."""
        for i, value in enumerate(values.tolist()):
            if value < 0 or value + self.eps <= 0:
                raise ValueError(
                    f"DBMTL: the loss of {_checks.task_label(i, self.task_names)} is {value}; "
                    f"DB-MTL takes log(L + eps) (eps={self.eps}) and needs every loss >= 0 "
                    "(> 0 with eps=0)"
                )

    def _check_graph(self, losses: list[Tensor], shared: list[Tensor]) -> None:
        _checks.check_losses_reach(losses, _graph.edges_of(shared), self.task_names)

    # ------------------------------------------------------------------ processes
    def _synced(self) -> bool:
        """Whether this step synchronises over processes (``_combine.is_synced``)."""
        return is_synced(self.distributed)

    def _group(self) -> Any:
        """The process group to synchronise over (None: the default group)."""
        return process_group(self.distributed, "DBMTL")

    def _loss_values(self, values: Tensor) -> Tensor:
        """L_i: this process's, or the mean over the processes."""
        if not self._synced():
            return values
        return mean_over_processes(values, self._group())

    def _skipped_call(self) -> None:
        """A call skipped for a non-finite loss counts in a window."""
        if self.accumulation_steps > 1:
            self._window.add_skipped()

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore
        saved = state_dict.get(prefix + "grad_ema")
        if isinstance(saved, Tensor) and saved.shape != self.grad_ema.shape:
            # the EMA's width is known from the first step only: take the saved one's
            self._buffers["grad_ema"] = torch.zeros(saved.shape, dtype=saved.dtype,
                                                    device=self.grad_ema.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> dict[str, Any]:
        return {"window": copy.deepcopy(self._window.state())}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._window.load(copy.deepcopy(state["window"]))

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        self._window.apply(fn)  # a window in progress moves with the EMA
        return self

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, beta={self.beta}, sigma={self.sigma}, "
                f"eps={self.eps}" + (", caller_divides=True" if self.caller_divides else ""))
