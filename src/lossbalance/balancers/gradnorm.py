"""GradNorm: Chen, Badrinarayanan, Lee, Rabinovich, ICML 2018 (arXiv 1711.02257), Algorithm 1.

Per step t, with task weights w_i(t) and W the shared tensors where norms are measured:

    G_i(t)    = || grad_W (w_i(t) L_i(t)) ||_2              (norm over all of W)
    G_bar(t)  = mean_i G_i(t)
    L~_i(t)   = L_i(t) / L_i(0)                             (loss ratio)
    r_i(t)    = L~_i(t) / mean_j L~_j(t)                    (relative inverse training rate)
    target_i  = G_bar(t) * r_i(t)^alpha, held constant      (Eq. 1)
    L_grad    = sum_i | G_i(t) - target_i |                 (Eq. 2)

The model receives the gradient of sum_i w_i(t) L_i(t) with the weights of this step. The
weights then take one step of their own optimizer on dL_grad/dw and are renormalised so that
sum_i w_i = T. Because G_i = w_i ||grad_W L_i|| with ||grad_W L_i|| independent of w,

    dL_grad / dw_i = sign(G_i - target_i) * || grad_W L_i ||,

so no second-order graph (``create_graph``) and no per-task backward is needed: the per-task
norms come from one ordinary backward. A step runs in three stages: *measure* the G_i of this
call (``lossbalance._taps``), *combine* them over an accumulation window and over processes
(``lossbalance._combine``), *update* the weights (``lossbalance._update``).

Option ``log_weights=True`` (not in the paper): the optimizer steps s_i = log w_i instead of
w_i. By the chain rule, with w_i = exp(s_i),

    dL_grad / ds_i = w_i * dL_grad / dw_i = sign(G_i - target_i) * G_i,

and after the step w = exp(s) is renormalised to sum T in log space,
s_i <- s_i - log(sum_j exp(s_j) / T). A step then changes w_i by a factor exp(+-~lr) rather
than by +-~lr: a weight that should sit near 1e-3 approaches it geometrically instead of
overshooting below zero and being clamped to ``min_weight`` (which the paper's update does
when Adam's steps of ~lr exceed the weight itself), and it never reaches zero.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .. import _checks, _graph, _native
from .._adam import plain_adam_args
from .._combine import (
    Window,
    check_distributed,
    is_synced,
    mean_over_processes,
    over_processes,
    process_group,
)
from .._taps import (
    Capture,
    LinearPattern,
    Measurement,
    Site,
    Tap,
    Workspace,
    linear_pattern,
    measure_at_tap,
    measure_general,
    row_norms,
)
from .._update import gradnorm_rule, step_log_weights, step_weights
from .base import Balancer, SharedLike, _like, _set


def arrived_scale(grad: Tensor, factor: int) -> Tensor:
    """The scale s of the backward through a ``loss()`` total, from the gradient ``grad``
    arriving at it: ``grad`` itself (a gradient scaler's scale, or 1), or, when the caller
    divides the total by k before its backward (``caller_divides``, ``factor`` = k), grad * k
    (grad = s/k). fl(fl(1/k) * k) misses 1 by an ulp for some k (41, 47, ... in float32);
    within 4 ulps of 1 it is taken as exactly 1 (no scaler)."""
    scale = grad.detach()
    if factor == 1:
        return scale
    scale = scale * factor
    if bool((scale - 1).abs() <= 4 * torch.finfo(scale.dtype).eps):
        scale = torch.ones_like(scale)
    return scale


class _PendingStep:
    """What a ``GradNorm.loss`` call leaves for after its backward: held by the total's
    graph only (``_Deferred``'s context), so that a total never backpropagated is dropped
    with its graph."""

    def __init__(self, balancer: GradNorm, capture: Capture | None, per_sample: bool,
                 measured: Measurement | None, values: Tensor, w: Tensor, first: bool,
                 total: Tensor) -> None:
        self.balancer, self.capture, self.per_sample = balancer, capture, per_sample
        self.measured, self.values, self.w, self.first = measured, values, w, first
        self.total = total
        self.scale: Tensor | None = None
        self.queued = False
        # the caller divides the total by k before its backward: the scale is grad * k
        self.factor = balancer.accumulation_steps if balancer.caller_divides else 1

    def arrived(self, grad: Tensor) -> None:
        """The backward reached the total with ``grad`` (the scaler's scale, or 1; divided by
        k under ``caller_divides``): queue the rest of the step for when the whole backward
        has finished, once per total."""
        if self.queued:
            return
        self.queued = True
        self.scale = arrived_scale(grad, self.factor)
        torch.autograd.Variable._execution_engine.queue_callback(self.run)

    def run(self) -> None:
        """Stages 1 (the fast path's norms, gathered from the hooks), 2 and 3 of the step."""
        bal, capture = self.balancer, self.capture
        self.capture = None
        scaled = bool(self.scale != 1)
        measured = self.measured
        try:
            if capture is not None:
                try:
                    norms = capture.finish()
                    vectors = capture.vectors
                finally:
                    capture.end()
                if scaled:
                    scale = self.scale
                    norms = norms / scale.to(norms)
                    vectors = None if vectors is None else vectors / scale.to(vectors)
                measured = bal._over_processes(Measurement(norms, vectors, self.per_sample,
                                                           self.total))
            assert measured is not None
            _set(bal, "_scaler", True if scaled else None)  # an overflow then skips
            # the general path measured unscaled norms; under a scaler, G_i * scale stands
            # for the scaled gradients' norms, so that their overflow skips the update too
            seen = (measured.norms * self.scale.to(measured.norms)
                    if scaled and capture is None else measured.norms)
            finite = bal._check_finite_norms(seen, before_backward=False)
            combined = bal._over_window(self.values, measured, finite)
            if combined is not None:
                bal._update(*combined, self.w, self.first)
        finally:
            _set(bal, "_scaler", None)
            self.measured = None


class _Deferred(torch.autograd.Function):
    """Identity on the total; its backward hands the arriving gradient to the pending step."""

    @staticmethod
    def forward(ctx: Any, total: Tensor, pending: _PendingStep) -> Tensor:
        ctx.pending = pending
        return total.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        ctx.pending.arrived(grad)
        return grad, None


class GradNorm(Balancer):
    """GradNorm weights learned from gradient norms at a shared layer (Algorithm 1).

    Args:
        num_tasks: T >= 2.
        alpha: the asymmetry exponent (>= 0). ``alpha=0`` pulls every task to the same gradient
            norm; larger values push slow tasks (large L_i(t)/L_i(0)) harder.
        lr: learning rate of the weights' optimizer (> 0).
        optimizer: optimizer class for the weights (``torch.optim.Adam`` by default).
        optimizer_kwargs: extra keyword arguments for it. Adam and AdamW get ``fused=True``
            unless ``fused``, ``foreach`` or ``differentiable`` is given (the same update as
            the default single-tensor one up to float rounding, in one kernel).
        initial_losses: L_i(0); by default the losses of the first ``backward`` call.
        min_weight: floor applied to the weights after the optimizer step and before
            renormalisation, so every weight stays > 0: w <- T * max(w, min_weight) /
            sum_j max(w_j, min_weight) (with ``log_weights``, the same on s = log w: a guard
            that multiplicative steps seldom reach).
        log_weights: False (default) steps w itself, as the paper's Algorithm 1; True steps
            s = log w with the optimizer (multiplicative steps, see the module docstring):
            dL_grad/ds_i = w_i dL_grad/dw_i, then s_i <- max(s_i, log min_weight) and
            s_i <- s_i - log(sum_j exp(s_j) / T), w = exp(s). The C++ update does not serve
            it (the Python update runs).
        general_path: how per-task gradients are formed without a tap: "loop" (default, one
            ``autograd.grad`` per task from L_i to ``shared``: each walks only head i and the
            trunk above ``shared``) or "batched" (one vmapped ``autograd.grad`` over all tasks,
            which walks every head T times: faster only when heads are tiny next to the
            trunk above ``shared``).
        chunk: on the fast path with ``shared`` an ``nn.Linear`` weight, how many tasks one
            batched matmul serves; the buffers kept between steps hold chunk x (|h| + |W|)
            numbers. Larger is a little faster and holds more memory; None (default) takes
            T // 2, between 1 and 4 (``lossbalance._taps.auto_chunk``).
        task_names: names, to pass losses as a dict and to name tasks in errors.
        on_nonfinite: "raise" (default) or "skip" for non-finite losses or gradient norms.
        distributed: for data-parallel training (DDP). None (default): synchronise over
            the default process group whenever torch.distributed is initialised with more
            than one process (as Lightning, Accelerate and torchrun set it up), else not;
            True (the default process group, which must be initialised) or a process group:
            always; False: never (each process keeps its own weights, e.g. processes that
            do not train one model on shards of one batch). Synchronised, every process
            holds the same weights. Each step all-reduces
            the T losses (L_i is the mean over processes, as DDP's gradient is) and what G_i
            needs: at the tapped h, or at any non-leaf tensors, the T norms, G_i =
            sqrt(sum_p G_i,p^2) / P (exact: each process holds its own samples' gradient at
            h, scaled by 1/P); at parameters see ``parameter_norms``.
        accumulation_steps: k micro-batches per optimizer step. Each ``backward`` call then
            backpropagates (1/k) sum_i w_i L_i (after k calls ``.grad`` holds the gradient of
            the window's mean weighted loss) and returns that total; the weights stay fixed
            within the window, and the k-th call takes one GradNorm step with L_i the
            window's mean and G_i that of the window's mean loss: at h exact from the calls'
            norms (root of the summed squares); at parameters see ``parameter_norms``.
        caller_divides: concerns ``loss()`` only, inside an accumulation window. False
            (default): ``loss`` returns (1/k) sum_i w_i L_i, as ``backward`` backpropagates,
            for a caller that backpropagates it as is. True: whoever backpropagates
            ``loss``'s total divides it by k = ``accumulation_steps`` itself (Lightning's
            ``accumulate_grad_batches=k``, Accelerate's ``gradient_accumulation_steps=k``,
            a loop's ``(total / k).backward()``), so ``loss`` returns the undivided
            sum_i w_i L_i, and the gradient g arriving at it is s/k (s: a gradient scaler's
            scale, or 1): the scale is taken as g * k, and the hooks see (s/k) w_i dL_i =
            s (1/k) w_i dL_i, what they see with False. The model, the weights and
            ``stats`` then get what ``backward`` gives (bit for bit when k is a power of two;
            else up to the rounding of fl(1/k) w_i against fl(w_i/k)). ``backward`` is
            unaffected, and with ``accumulation_steps=1`` the option changes nothing.
        parameter_norms: how G_i at shared parameters combines over an accumulation
            window's micro-batches and over processes (nothing changes without either):
            "exact" (default) keeps each task's gradient there, T x |shared| numbers
            (float32 or wider), sums them over the window and averages them over the
            processes (one all-reduce of T x |shared| numbers a step, or a window), then
            takes the norms: the G_i of one process on the whole batch, for at most
            2 x T x |shared| numbers of extra memory (the window's sum and one call's).
            "mean" combines the norms alone (the mean over processes, the sum of the
            1/k-scaled norms over a window): an upper bound of the exact G_i (triangle
            inequality), no extra memory or communication.

    ``stats`` after a step: ``grad_norm`` (G_i), ``target`` (target_i), ``loss_ratio``
    (L~_i), ``inverse_rate`` (r_i), ``gradnorm_loss`` (L_grad) and ``weight`` (w used).
    """

    def __init__(
        self,
        num_tasks: int,
        alpha: float = 1.5,
        lr: float = 0.025,
        *,
        optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        initial_losses: Sequence[float] | Tensor | None = None,
        min_weight: float = 1e-6,
        general_path: str = "loop",
        chunk: int | None = None,
        task_names: Sequence[str] | None = None,
        on_nonfinite: str = "raise",
        distributed: bool | Any | None = None,
        accumulation_steps: int = 1,
        parameter_norms: str = "exact",
        log_weights: bool = False,
        caller_divides: bool = False,
    ) -> None:
        super().__init__(num_tasks, task_names=task_names, on_nonfinite=on_nonfinite)
        self.caller_divides = _checks.check_bool("caller_divides", caller_divides)
        self.distributed = check_distributed(distributed)
        self.accumulation_steps = _checks.check_int_at_least(
            "accumulation_steps", accumulation_steps, 1)
        self._window = Window(accumulation_steps)
        if parameter_norms not in ("exact", "mean"):
            raise ValueError(
                f"parameter_norms must be 'exact' or 'mean', got {parameter_norms!r}")
        self.parameter_norms = parameter_norms
        self.alpha = _checks.check_nonnegative("alpha", alpha)
        self.lr = _checks.check_positive("lr", lr)
        self.min_weight = _checks.check_positive("min_weight", min_weight)
        if not isinstance(log_weights, bool):
            raise TypeError(f"log_weights must be True or False, got {log_weights!r}")
        self.log_weights = log_weights
        if general_path not in ("loop", "batched"):
            raise ValueError(f"general_path must be 'loop' or 'batched', got {general_path!r}")
        self.general_path = general_path
        _checks.check_int_at_least("chunk", chunk, 1, allow_none=True)
        self._optimizer_cls = optimizer
        self._optimizer_kwargs = dict(optimizer_kwargs or {})
        if (optimizer in (torch.optim.Adam, torch.optim.AdamW)
                and not {"fused", "foreach", "differentiable"} & set(self._optimizer_kwargs)):
            # one kernel for the whole update: ~5x less time than the single-tensor update
            self._optimizer_kwargs["fused"] = True
        self.register_buffer("task_weights", torch.ones(num_tasks))
        if log_weights:  # s = log w, what the optimizer steps
            self.register_buffer("task_log_weights", torch.zeros(num_tasks))
        self.register_buffer("initial_losses", torch.full((num_tasks,), float("nan")))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self._initialized = False
        if initial_losses is not None:
            l0 = torch.as_tensor(
                initial_losses.detach().cpu() if isinstance(initial_losses, Tensor)
                else list(initial_losses),
                dtype=torch.float32,
            ).reshape(-1)
            if l0.numel() != num_tasks:
                raise ValueError(f"initial_losses has {l0.numel()} values, expected {num_tasks}")
            if self.alpha > 0:
                _checks.check_initial_losses(l0, self.task_names, "initial_losses")
            self.initial_losses.copy_(l0)
            self._initialized = True
        self._optimizer = self._make_optimizer()
        self._tap: Tap | None = None
        self._use_native: bool | None = None  # see _native_module
        self._workspace = Workspace()
        self._capture = Capture(self._workspace, chunk)

    def _synced(self) -> bool:
        """Whether this step synchronises over processes (``_combine.is_synced``)."""
        return is_synced(self.distributed)

    def _group(self) -> Any:
        """The process group to synchronise over (None: the default group)."""
        return process_group(self.distributed, "GradNorm")

    def _skipped_call(self) -> None:
        if self.accumulation_steps > 1:
            self._window.add_skipped()

    def _loss_values(self, values: Tensor) -> Tensor:
        """L_i: this process's, or the mean over the processes (one all-reduce of T values)."""
        if not self._synced():
            return values
        return mean_over_processes(values, self._group())

    def _make_optimizer(self) -> torch.optim.Optimizer:
        try:
            return self._optimizer_cls([self._stepped()], lr=self.lr, **self._optimizer_kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"could not build the weights' optimizer: {exc}") from exc

    def _stepped(self) -> Tensor:
        """The tensor the weights' optimizer steps: w, or s = log w with ``log_weights``."""
        return self.task_log_weights if self.log_weights else self.task_weights

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer that steps the weights on dL_grad/dw (on s = log w and dL_grad/ds
        with ``log_weights``)."""
        return self._optimizer

    @property
    def weights(self) -> Tensor:
        return self.task_weights.detach().clone()

    def tap(self, h: Tensor) -> tuple[Tensor, ...]:
        """Mark ``h`` as the shared representation the heads consume: the fast path.

        Returns ``h`` once per task (feed ``feats[i]`` to head i). ``backward`` then finds,
        in the graph, the operations of each head that read h and hooks them, so one ordinary
        backward yields every task's gradient at h; with ``shared`` parameters upstream of h
        it maps them there (see ``lossbalance._taps``).
        """
        if not isinstance(h, Tensor):
            raise TypeError(f"tap expects a tensor, got {type(h).__name__}")
        if not h.requires_grad:
            raise ValueError("tap(h): h does not require grad, so no task gradient can reach it")
        _set(self, "_tap", Tap(h))
        return (h,) * self.num_tasks

    # ------------------------------------------------------------------ validation
    def _check_fast_graph(self, losses: list[Tensor], tap: Tap, shared: list[Tensor],
                          vectors: bool) -> LinearPattern | None:
        """Each loss must reach h through operations of its own, and h every shared tensor.

        The capture keeps the consumer nodes of h per task for ``begin``; returns the
        ``nn.Linear`` pattern of h when it matches (see ``_taps.linear_pattern``).
        """
        native = self._capture.native_capture()
        if native is None:
            edges = self._shared_edges(shared) if shared else []
        else:  # the C++ walks find the edges themselves
            self._check_requires_grad(shared)
            edges = None
        pattern = linear_pattern(tap.h, shared, edges, native)
        problem = self._capture.walk(losses, tap.h, shared, edges, pattern, vectors)
        if problem is not None:
            raise _checks.tap_graph_error(problem, self.task_names)
        if shared and pattern is None:
            self._check_shared_reached([tap.h], shared, "the tapped representation h", edges)
        return pattern

    def _check_general_graph(self, losses: list[Tensor], shared: list[Tensor]) -> None:
        edges = self._shared_edges(shared)
        for i, loss in enumerate(losses):
            if not _graph.reached_edges(loss, edges, first=True):
                raise ValueError(
                    f"the loss of {_checks.task_label(i, self.task_names)} does not reach any "
                    "of the shared tensors"
                )
        self._check_shared_reached(losses, shared, "any loss", edges)

    @staticmethod
    def _shared_edges(shared: list[Tensor]) -> list:
        GradNorm._check_requires_grad(shared)
        return _graph.edges_of(shared)

    @staticmethod
    def _check_requires_grad(shared: list[Tensor]) -> None:
        _checks.check_requires_grad(shared)

    def _check_shared_reached(
        self, roots: list[Tensor], shared: list[Tensor], what: str, edges: list | None = None
    ) -> None:
        edges = self._shared_edges(shared) if edges is None else edges
        found: set[int] = set()
        for root in roots:
            found |= _graph.reached_edges(root, edges)
            if len(found) == len(edges):
                return
        k = min(set(range(len(edges))) - found)
        raise ValueError(f"shared[{k}] is outside the graph of {what}")

    # ------------------------------------------------------------------ the step
    def _step(
        self, losses: list[Tensor], stacked: Tensor, values: Tensor, shared: SharedLike,
        **signals: Any
    ) -> Tensor:
        """measure, combine, update: see DESIGN.md "One step, in three stages"."""
        tap, shared_list, first = self._step_inputs(values, shared, signals)
        site = self._site(losses, tap, shared_list)  # every check, before anything changes
        w = self.task_weights.clone()  # the weights of this step (the buffer changes)
        k = self.accumulation_steps
        w_back = w if k == 1 else w / k  # a window's calls each backpropagate 1/k of it
        # the scaler's scale as a tensor (no host sync): norms of scaled gradients / scale
        scale = None if self._scaler is None else self._scaler.scale(values.new_ones(()))

        # 1. measure G_i of this call (the fast path's hooks run in the model's backward)
        if site.h is not None:
            measured = measure_at_tap(self._capture, site,
                                      partial(self._weighted_backward, stacked, w_back), scale)
        else:
            measured = measure_general(losses, site, w_back, self.general_path == "batched",
                                       scale)
        # 2. combine over the processes, so that every process decides alike on a non-finite
        # norm; the general path backpropagates once that is known (on an overflow of scaled
        # gradients it still runs, so that the scaler sees it and skips the optimizer step) ...
        measured = self._over_processes(measured)
        finite = self._check_finite_norms(measured.norms,
                                          before_backward=measured.total is None)
        total = measured.total
        if total is None:
            total = (self._weighted_backward(stacked, w_back) if finite or scale is not None
                     else values @ _like(w_back, values))
        # ... and over the accumulation window: L_i and G_i to update from, once a window
        combined = self._over_window(values, measured, finite)
        # 3. update the weights (and commit)
        if combined is not None:
            self._update(*combined, w, first)
        return total

    def _step_inputs(self, values: Tensor, shared: SharedLike, signals: dict[str, Any]
                     ) -> tuple[Tap | None, list[Tensor], bool]:
        """A step's tap (taken: it serves one step), its shared tensors, and whether it is
        the first step (L(0) = these losses, checked > 0 when alpha > 0)."""
        self._no_signals(signals)
        tap = self._tap
        _set(self, "_tap", None)
        first = not self._initialized
        if first and self.alpha > 0:
            _checks.check_initial_losses(values, self.task_names)
        return tap, _checks.shared_tensors(shared), first

    def _site(self, losses: list[Tensor], tap: Tap | None, shared: list[Tensor]) -> Site:
        """Where this call measures (see ``_taps.Site``), with the graph and the window
        checked: raises before anything changes."""
        # per-sample tensors (h): norms of a window or of processes combine as root of the
        # summed squares; parameters: as a sum (window) or mean (processes)
        per_sample = (not shared) if tap is not None else all(not t.is_leaf for t in shared)
        k = self.accumulation_steps
        # exact G_i at parameters over micro-batches or processes: keep the per-task gradients
        keep = (self.parameter_norms == "exact" and (k > 1 or self._synced())
                and not per_sample and all(t.is_leaf for t in shared))
        pattern = None
        if tap is not None:
            pattern = self._check_fast_graph(losses, tap, shared, keep)
        elif not shared:
            raise ValueError(
                "shared=None measures gradient norms at the tapped representation: call "
                "feats = bal.tap(h) and feed feats[i] to head i, or pass shared= parameters"
            )
        else:
            self._check_general_graph(losses, shared)
        if k > 1:
            self._window.check(per_sample, (self.num_tasks, sum(t.numel() for t in shared))
                               if keep else None)
        if self._use_native is None:
            _native.enabled()  # a bad LOSSBALANCE_NATIVE raises here, not after the backward
        return Site(None if tap is None else tap.h, shared, pattern, per_sample, keep)

    def _over_processes(self, measured: Measurement) -> Measurement:
        """Stage 2 over the processes (``_combine.over_processes``); as is without DDP."""
        if not self._synced():
            return measured
        return over_processes(measured, self._group(), self.accumulation_steps > 1)

    def _over_window(self, values: Tensor, measured: Measurement, finite: bool
                     ) -> tuple[Tensor, Tensor] | None:
        """Stage 2 over the accumulation window: (L_i, G_i) to update from, or None (a call
        inside a window, or a non-finite norm). At the window's last call: the window's mean
        L_i and G_i of its summed gradient (exact at h; at parameters from the summed
        per-task gradients when kept, else the sum of the calls' norms)."""
        norms = measured.norms
        if self.accumulation_steps > 1:
            window = self._window.add(values, norms, measured.per_sample, finite,
                                      measured.vectors)
            if window is None:
                return None
            values, norms, finite, vectors = window
            self.last_step_skipped = not finite
            if vectors is not None and finite:  # G_i of the window's summed gradients
                if self._synced():
                    vectors = mean_over_processes(vectors, self._group(), in_place=True)
                norms = row_norms(vectors)
                finite = self._check_finite_norms(norms, before_backward=False)
        return (values, norms) if finite else None

    def _update(self, values: Tensor, grad_norm_w: Tensor, w: Tensor, first: bool) -> None:
        """Stage 3 and the commit: the paper's rule (``_update.gradnorm_rule``), one step of
        the weights' optimizer on w or on log w, the floor and the renormalisation, the step
        count and ``stats`` (the C++ update does all of it when it serves)."""
        if self._native_update(grad_norm_w, w, values, first):
            return
        initial = values if first else _like(self.initial_losses, values)
        rule = gradnorm_rule(grad_norm_w, w, values, initial, self.alpha)
        # Commit: everything below changes state; nothing below can fail on user input.
        # (The buffers need no autograd: none of them requires grad.)
        if first:
            self.initial_losses.copy_(values)
            self._initialized = True
        if self.log_weights:
            step_log_weights(self._optimizer, self.task_log_weights, self.task_weights,
                             rule.dweights, w, self.min_weight)
        else:
            step_weights(self._optimizer, self.task_weights, rule.dweights, self.min_weight)
        self.num_steps.add_(1)
        self._set_stats(w, grad_norm_w, rule.target, rule.loss_ratio, rule.inverse_rate,
                        torch.linalg.vector_norm(rule.gap, 1))  # L_grad = sum_i |gap_i|

    def _set_stats(self, w: Tensor, grad_norm_w: Tensor, target: Tensor, loss_ratio: Tensor,
                   inverse_rate: Tensor, gradnorm_loss: Tensor) -> None:
        _set(self, "stats", {
            "weight": w,
            "grad_norm": grad_norm_w,
            "target": target,
            "loss_ratio": loss_ratio,
            "inverse_rate": inverse_rate,
            "gradnorm_loss": gradnorm_loss,
        })

    def _native_update(self, grad_norm_w: Tensor, w: Tensor, values: Tensor, first: bool
                       ) -> bool:
        """What ``_update`` does for the paper's update (the rule, the Adam step, the floor,
        the renormalisation, the statistics), as one C++ loop over the tasks
        (``lossbalance._native``; equal to the Python code up to float rounding), when the
        module is built, the weights' optimizer is a plain fused Adam with its state made,
        every T-vector is a contiguous float32/float64 CPU tensor of the weights' dtype and
        every norm is finite. Returns False, changing nothing, otherwise."""
        if self.log_weights:
            return False
        module = self._native_module()
        if module is None:
            return False
        weights = self.task_weights
        adam = plain_adam_args(self._optimizer, weights)
        if adam is None or not adam.fused:
            return False
        out = module.gradnorm_update(
            grad_norm_w, w, values, self.initial_losses, first, self.alpha,
            weights, self.num_steps, self.min_weight, adam.step, adam.exp_avg,
            adam.exp_avg_sq, adam.lr, adam.beta1, adam.beta2, adam.eps)
        if out is None:
            return False
        if first:
            self._initialized = True
        self._set_stats(w, grad_norm_w, *out)  # target, loss ratio, inverse rate, L_grad
        return True

    def _native_module(self) -> Any:
        """The C++ module, or None; whether to use it is decided on the balancer's first
        step (``lossbalance.native.enabled()`` and a successful build) and kept, so that a
        run does not switch between the two steps (they round differently)."""
        if self._use_native is None:
            self._use_native = _native.load() is not None
        return _native.loaded() if self._use_native else None

    def _check_finite_norms(self, grad_norm_w: Tensor, *, before_backward: bool) -> bool:
        bad = _checks.first_nonfinite(grad_norm_w)
        if bad is None:
            return True
        who = _checks.task_label(bad, self.task_names)
        if self.on_nonfinite == "skip" or self._scaler is not None:
            self.last_step_skipped = True
            return False
        where = (
            "the model's .grad is untouched" if before_backward
            else "the model's .grad already holds this step's (non-finite) gradient: zero it "
            "before the next step"
        )
        raise ValueError(
            f"the gradient norm of {who} is {float(grad_norm_w[bad])} (non-finite) with finite "
            f"losses; the balancer's state is untouched and {where}. Pass on_nonfinite='skip' "
            "to skip such steps"
        )

    def backward(
        self, losses: _checks.LossesLike, shared: SharedLike = None, *,
        grad_scaler: Any = None, **signals: Any
    ) -> Tensor:
        """Backpropagate sum_i w_i L_i and take one GradNorm step on the weights.

        ``shared``: a parameter, a list of parameters, a module (its parameters that require
        grad: ``shared=model.trunk[-2]`` for the last shared layer), or None (norms at the
        tapped h).
        ``grad_scaler``: a ``torch.amp.GradScaler``; the backward runs on the scaled total,
        G_i are measured on scaled gradients and divided by the scale (exact: the scale is a
        power of two), and a step whose gradient norms overflowed skips the weights' update
        whatever ``on_nonfinite`` says (``last_step_skipped``), as the scaler skips the
        optimizer step and lowers the scale.
        Returns the weighted total sum_i w_i L_i (detached, unscaled).
        """
        try:
            return super().backward(losses, shared, grad_scaler=grad_scaler, **signals)
        except BaseException:
            self._capture.release()  # nothing of a failed step's graph stays referenced
            raise
        finally:
            _set(self, "_tap", None)  # a tap serves one step only

    def loss(self, losses: _checks.LossesLike, shared: SharedLike = None,
             **signals: Any) -> Tensor:
        """sum_i w_i L_i with graph, whose ordinary backward takes this GradNorm step.

        ``total = bal.loss(losses, shared)``, then ``total.backward()`` by whoever trains
        (a trainer, ``accelerator.backward(total)``, ``scaler.scale(total).backward()``)
        gives the model, the weights and ``stats`` exactly what ``backward(losses, shared)``
        gives. Everything is checked here, before anything changes. Fast path (``tap``): the
        capture's hooks are placed on the graph now and fire in that backward; general path:
        the per-task gradients are measured now. The gradient arriving at the total is taken
        as a gradient scaler's scale (1 without one): G_i are divided by it, and on an
        overflow the update is skipped, as with ``backward(..., grad_scaler=...)``. The
        update runs once that backward has finished (queued on autograd's engine); a total
        never backpropagated changes nothing, a second backward through it (``retain_graph``)
        updates nothing again. The pending step lives on the total's graph only.
        In an accumulation window (``accumulation_steps=k``) the total is
        (1/k) sum_i w_i L_i, as ``backward`` backpropagates; with ``caller_divides=True``
        it is sum_i w_i L_i, for a caller (a trainer) that divides it by k itself.
        """
        try:
            return super().loss(losses, shared, **signals)
        finally:
            _set(self, "_tap", None)  # a tap serves one step only

    def _loss_step(self, losses: list[Tensor], stacked: Tensor, values: Tensor,
                   shared: SharedLike, **signals: Any) -> Tensor:
        """``_step``'s stages for ``loss``: checks and *measure*'s set-up now, the rest in
        ``_PendingStep.run`` after the caller's backward."""
        tap, shared_list, first = self._step_inputs(values, shared, signals)
        # a capture of this call only, referenced by the total's graph and not by self
        kept, capture = self._capture, Capture(self._workspace, self._capture.chunk_size)
        _set(self, "_capture", capture)
        try:
            site = self._site(losses, tap, shared_list)
        finally:
            _set(self, "_capture", kept)
        w = self.task_weights.clone()
        k = self.accumulation_steps
        w_back = w if k == 1 else w / k  # what the model's backward carries, as in _step
        # the total: (1/k) sum_i w_i L_i, or undivided when the caller divides it by k
        w_total = w if self.caller_divides else w_back
        measured = None
        if site.h is not None:
            capture.begin(site.h, site.shared, site.pattern, vectors=site.keep)
        else:
            capture = None
            measured = measure_general(losses, site, w_back, self.general_path == "batched",
                                       None)
            measured = self._over_processes(measured)
            if not self._check_finite_norms(measured.norms, before_backward=True):
                self._over_window(values, measured, False)  # as backward: no model backward
                return (values @ _like(w_total, values)).requires_grad_()
        total = stacked @ _like(w_total.detach(), stacked)
        pending = _PendingStep(self, capture, site.per_sample, measured, values, w, first,
                               total.detach())
        return _Deferred.apply(total, pending)

    # ------------------------------------------------------------------ state
    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and pickling: a copy decides anew, on its first step, whether
        to use the C++ step (the process that loads it may not have or want it)."""
        state = self.__dict__.copy()
        state["_use_native"] = None
        return state

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "optimizer": copy.deepcopy(self._optimizer.state_dict()),
            "initialized": self._initialized,
            "window": copy.deepcopy(self._window.state()),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self._initialized = bool(state["initialized"])
        if "window" in state:
            self._window.load(copy.deepcopy(state["window"]))

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``.to()``/``.double()``...: move the weights and, in place, the optimizer's state.

        The optimizer object stays the same, so learning-rate schedulers and step hooks
        attached to ``bal.optimizer`` keep working.
        """
        saved = self._optimizer.state_dict()
        super()._apply(fn, recurse)
        self._window.apply(fn)  # a window in progress moves with the weights
        self._optimizer.param_groups[0]["params"] = [self._stepped()]
        self._optimizer.state.clear()
        self._optimizer.load_state_dict(saved)  # casts the state to the weights' dtype/device
        return self

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, alpha={self.alpha}, lr={self.lr}, "
            f"optimizer={getattr(self._optimizer_cls, '__name__', self._optimizer_cls)}"
            + (", log_weights=True" if self.log_weights else "")
            + (", caller_divides=True" if self.caller_divides else "")
        )
