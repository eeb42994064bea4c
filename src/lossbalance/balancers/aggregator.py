"""Gradient aggregation: one update sum_i c_i g_i, with c from the tasks' Gram matrix.

MGDA, PCGrad, CAGrad, IMTL-G, Nash-MTL, Aligned-MTL and UPGrad each combine the tasks'
gradients g_i at the shared tensors into one update d = sum_i c_i g_i whose coefficients c
[T] depend on the Gram matrix G_ij = <g_i, g_j> alone (``lossbalance._rules``). The update
is then the gradient of sum_i c_i L_i with c held constant, so the model needs one ordinary
backward once c is known. ``Aggregator`` is the plumbing they share; a method is a subclass
with its rule in ``_coefficients(gram, values) -> c``. A step runs the three stages of
DESIGN.md: *measure* the Gram matrix (``lossbalance._taps``), *combine* it over processes
(and, at parameters, over an accumulation window: ``lossbalance._combine``), *update*: c.

Where the gradients are taken:

* At the representation (``feats = bal.tap(h)``, ``bal.backward(losses)``: MGDA's "upper
  bound" form, LibMTL's ``rep_grad``). One backward of sum_i L_i; the hooks of the tap keep
  each task's gradient g_i at h as its head delivers it ([T, *h.shape], one buffer kept
  between steps), and a hook on h, which runs once every head has delivered and before the
  trunk's backward, forms G = V V^T (V = the g_i as rows: one matmul), c = rule(G), and
  returns d = c^T V (one matmul) as the gradient that goes on into the trunk. Head i's
  parameters get the gradient of L_i itself (as in LibMTL and torchjd); every parameter
  below h gets sum_i c_i dL_i/dp. With ``shared=`` parameters below h as well (the tap
  still taken), c comes from the Gram matrix of the per-task gradients at those parameters,
  formed from the g_i at h (for one ``nn.Linear``: from delta_i = g_i * act'(z) and the
  layer's input x, without forming dW_i when the layer is wider than the batch; otherwise
  one vector-Jacobian product per task), and the replacement at h is the same: the
  parameters below h get sum_i c_i dL_i/dp, exactly the update at ``shared``.
* At shared tensors without a tap (``bal.backward(losses, shared=params)``): the per-task
  gradients there from one ``autograd.grad`` per task, G, c, then the ordinary backward of
  sum_i c_i L_i with c constant: the shared tensors get exactly sum_i c_i g_i, every other
  parameter the c-weighted sum of its tasks' gradients (a head: c_i times its own).

Cost of a step at h (T tasks, h of B x d numbers, in the dtype of h unless said). Kept
between steps (the balancer's workspace, allocated on the first step and when a shape
changes): the buffer of the g_i [T, B, d], into whose rows the hooks copy each head's
gradient. Allocated each step: G (a few T x T tensors, float32 or wider; a float32 copy of
the buffer first when h is narrower), the rule's own small CPU tensors, and d (B x d, the
gradient handed on into the trunk); besides them the step's Python objects (a capture of the
call, one hook a head's read of h, the pending step) and the scalar total's copy. Autograd
still sums the heads' g_i into the gradient at h before the hook replaces it, as in the plain
step. Multiply-adds beyond the plain step: T^2 B d for G, T B d for d, T B d for the copies
into the buffer. One host synchronisation (G's diagonal checked finite; the rule runs on the
CPU). With ``shared`` one ``nn.Linear`` below h (R rows of input x [R, in], out = d): kept
delta [T, R, out] and either dW [T, out, in] (R >= in: T R out in + T^2 out in
multiply-adds) or K delta [T, R, out] (R < in: K = x x^T [R, R] allocated, T R^2 out +
T^2 R out), and act'(z) [R, out] allocated.

Over processes (DDP; ``distributed``): every process gets the Gram matrix of the global
per-task gradients, so c is the same on all. At h (per-sample: process p holds dL_p/dh_p of
its own samples, the global gradient at the stacked h is (1/P) [dL_p/dh_p]_p): G = (1/P^2)
sum_p G_p, one all-reduce of T^2 numbers, issued from the hook on h during the backward.
At parameters (and at a weight below a tap): the per-task gradients are averaged over the
processes (one all-reduce of T x |shared| numbers), then G.

Accumulation windows (``accumulation_steps=k``): each call backpropagates 1/k of its total.
At parameters (leaf tensors, no tap) the update is exact: each call keeps its per-task
gradients there, the window sums them (the gradients of the window's mean losses), and its
last call forms G and c from the sum and adds sum_i (c_i - w_i) v_i to the shared
parameters' ``.grad`` (w: the coefficients the window's calls backpropagated, the last
update's c, ones before the first), so that after the window they hold exactly sum_i c_i
v_i; the other parameters hold the w-weighted sum. At h (a tap, or non-leaf ``shared``)
exactness would need c before the window ends (each call's trunk backward needs it), which
one backward per call cannot have: each call takes c from its own micro-batch's Gram matrix
(of its unscaled gradients: the rule sees what a step on that micro-batch alone would) and
applies it to its 1/k-scaled gradients, so the window's update at h is the mean over its
micro-batches of each one's aggregated direction (not the aggregation of the window's mean
gradient; documented, and tested against that literal rule).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch import distributed as dist

from .. import _checks, _graph
from .._combine import (
    Window,
    check_distributed,
    is_synced,
    mean_over_processes,
    process_group,
)
from .._taps import (
    Capture,
    LinearPattern,
    Measurement,
    Site,
    Tap,
    Workspace,
    gram_at_tap,
    gram_of,
    linear_pattern,
    measure_general,
)
from .base import Balancer, SharedLike, _like, _set
from .gradnorm import _Deferred, arrived_scale

Commit = Callable[[], None] | None


class _Pending:
    """What one call leaves for its backward: held by the total's graph only (``_Deferred``'s
    context and the hook on h), so that a total never backpropagated changes nothing.

    ``arrived`` runs first in the backward (the total's node) with the gradient at the
    total: the gradient scaler's scale, or 1. At h the hook on h (``at_h``) then aggregates;
    at parameters ``arrived`` commits the coefficients measured when the call was made.
    """

    def __init__(self, bal: Aggregator, values: Tensor, weights: Tensor, site: Site) -> None:
        self.bal, self.values, self.weights, self.site = bal, values, weights, site
        self.factor = bal.accumulation_steps if bal._undivided else 1
        self.scale: Tensor | None = None
        self.capture: Capture | None = None  # at h: the tap's hooks of this call
        self.measured: Measurement | None = None  # at parameters
        self.coefficients: Tensor | None = None  # at parameters, one call a step
        self.commit: Commit = None

    def arrived(self, grad: Tensor) -> None:
        if self.scale is not None:  # a second backward through the graph: nothing again
            return
        # a loss() total under caller_divides was divided by k by the caller: grad = s/k
        self.scale = arrived_scale(grad, self.factor)
        if self.site.h is None:
            try:
                self.bal._finish_at_parameters(self)
            finally:
                self.measured = self.values = None  # the per-task gradients: not kept

    def at_h(self, grad: Tensor) -> Tensor | None:
        """The hook on h: the replacement sum_i c_i g_i (None: the gradient goes on as is)."""
        capture, self.capture = self.capture, None
        if capture is None or self.scale is None:
            return None  # a later backward through the graph, or one not from the total
        try:
            return self.bal._aggregate_at_h(self, capture)
        finally:
            capture.end()
            self.site = self.values = None  # h and the layer's input: not kept

    def hook(self) -> Callable[[Tensor], Tensor | None]:
        """The hook to register on h, holding this pending step weakly: h holds its hooks,
        and a strong reference back to h (through the site or the capture) would make a
        cycle through autograd's C++ nodes that Python's garbage collector cannot free.
        The step itself is held by the total's graph (``_Deferred``'s context), alive
        throughout its backward."""
        ref = weakref.ref(self)

        def at_h(grad: Tensor) -> Tensor | None:
            pending = ref()
            return None if pending is None else pending.at_h(grad)
        return at_h


class Aggregator(Balancer):
    """Base class of the gradient-aggregation methods: update sum_i c_i g_i, c = rule(G).

    Subclasses implement ``_coefficients(gram, values) -> c`` (G [T, T] the Gram matrix of
    the tasks' gradients, float32 or wider, the gradient scaler's scale divided out; values
    the T loss values; c [T]); a rule with state (a random generator, a warm start)
    overrides ``_prepare`` instead, which returns c and a function that commits the new
    state (run only when the step's backward runs).

    Args:
        num_tasks: T >= 2.
        task_names: names, to pass losses as a dict and to name tasks in errors.
        on_nonfinite: "raise" (default) or "skip" for a non-finite loss or gradient. At
            parameters the per-task gradients are known before the model's backward: a
            non-finite one raises, or skips the step, with ``.grad`` untouched. At h they
            are known only inside the backward: "raise" raises from it (the heads'
            ``.grad`` then hold this step's gradients: zero them), "skip" lets the summed
            gradient go on unchanged and leaves the coefficients as they were. Under a
            gradient scaler (a scale other than 1 arriving at the total) a non-finite
            gradient or G always skips (``last_step_skipped``); at h the trunk then gets
            NaN, so that the scaler skips the optimizer step and lowers the scale even
            where only G overflowed.
        distributed: for data-parallel training (DDP): None (default) synchronises when
            torch.distributed is initialised with more than one process, True (the default
            group) or a process group always, False never. Synchronised, every process
            forms the Gram matrix of the global per-task gradients and holds the same c
            (see the module docstring).
        accumulation_steps: k micro-batches per optimizer step (see the module docstring:
            exact at parameters, c per micro-batch at h).
        general_path: per-task gradients without a tap: "loop" (default, one
            ``autograd.grad`` per task) or "batched" (one vmapped call).
        caller_divides: concerns ``loss()`` only, inside an accumulation window. False
            (default): its total is 1/k of what ``backward`` would backpropagate with k =
            ``accumulation_steps`` (sum_i L_i at h, sum_i c_i L_i at parameters). True:
            whoever backpropagates it divides it by k itself (Lightning's
            ``accumulate_grad_batches=k``, Accelerate's ``gradient_accumulation_steps=k``,
            ``(total / k).backward()``), so the total is undivided, and the scale is the
            gradient arriving at it times k (the gradients at h and at ``shared`` then carry
            what they carry with False). ``backward`` is unaffected; with
            ``accumulation_steps=1`` the option changes nothing.

    ``weights``: the last c (ones before the first step). ``stats`` after a step:
    ``weight`` (c), ``gram`` (G, unscaled) and ``grad_norm`` (sqrt(G_ii)).
    """

    def __init__(
        self,
        num_tasks: int,
        *,
        task_names: Sequence[str] | None = None,
        on_nonfinite: str = "raise",
        distributed: bool | Any | None = None,
        accumulation_steps: int = 1,
        general_path: str = "loop",
        caller_divides: bool = False,
    ) -> None:
        super().__init__(num_tasks, task_names=task_names, on_nonfinite=on_nonfinite)
        self.caller_divides = _checks.check_bool("caller_divides", caller_divides)
        self._undivided = False  # this call's total is undivided (loss() under caller_divides)
        self.distributed = check_distributed(distributed)
        self.accumulation_steps = _checks.check_int_at_least(
            "accumulation_steps", accumulation_steps, 1)
        if general_path not in ("loop", "batched"):
            raise ValueError(f"general_path must be 'loop' or 'batched', got {general_path!r}")
        self.general_path = general_path
        self._window = Window(accumulation_steps)
        self.register_buffer("task_weights", torch.ones(num_tasks))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self._tap: Tap | None = None
        self._workspace = Workspace()  # the [T, *h.shape] buffer of the g_i at h

    # ------------------------------------------------------------------ the rule
    def _coefficients(self, gram: Tensor, values: Tensor) -> Tensor:
        """c [T] from the Gram matrix G [T, T] (and the loss values, for rules that use
        them): the method's rule. Must not change the balancer's state."""
        raise NotImplementedError

    def _prepare(self, gram: Tensor, values: Tensor) -> tuple[Tensor, Commit]:
        """c and what commits the rule's new state (None: a rule without state)."""
        return self._coefficients(gram, values), None

    def _rule_state(self) -> dict[str, Any]:
        """The rule's state for ``state_dict`` (tensors and plain values)."""
        return {}

    def _load_rule_state(self, state: dict[str, Any]) -> None:
        """Restore what ``_rule_state`` returned."""

    # ------------------------------------------------------------------ public
    @property
    def weights(self) -> Tensor:
        """The last coefficients c (ones before the first step), detached."""
        return self.task_weights.detach().clone()

    def tap(self, h: Tensor) -> tuple[Tensor, ...]:
        """Mark ``h`` as the shared representation the heads consume (feed ``feats[i]`` to
        head i): ``backward`` then aggregates the tasks' gradients at h (or, with ``shared``
        parameters below h, at those) and hands sum_i c_i g_i on into the trunk."""
        if not isinstance(h, Tensor):
            raise TypeError(f"tap expects a tensor, got {type(h).__name__}")
        if not h.requires_grad:
            raise ValueError("tap(h): h does not require grad, so no task gradient can reach it")
        _set(self, "_tap", Tap(h))
        return (h,) * self.num_tasks

    def backward(self, losses: _checks.LossesLike, shared: SharedLike = None, *,
                 grad_scaler: Any = None, **signals: Any) -> Tensor:
        """One backward whose gradient at the shared tensors is sum_i c_i g_i.

        With a tap (``feats = bal.tap(h)``) and ``shared=None``: at h; with a tap and
        ``shared`` parameters below h: c from the Gram matrix at those, the replacement at h;
        without a tap: at ``shared`` (parameters, or intermediate tensors), with the
        backward of sum_i c_i L_i. ``grad_scaler``: the backward runs on the scaled total
        and the scale is divided out of G before the rule. Returns the backpropagated total
        (detached, unscaled): sum_i L_i at h, sum_i c_i L_i at parameters (each 1/k of it
        in an accumulation window).
        """
        try:
            return super().backward(losses, shared, grad_scaler=grad_scaler, **signals)
        finally:
            _set(self, "_tap", None)  # a tap serves one step only

    def loss(self, losses: _checks.LossesLike, shared: SharedLike = None,
             **signals: Any) -> Tensor:
        """The total with graph whose ordinary backward (``total.backward()``,
        ``scaler.scale(total).backward()``, a trainer's) does what ``backward`` does: at h
        the hook on h replaces the gradient during that backward (the gradient arriving at
        the total is taken as a scaler's scale); at parameters c is formed now and the total
        is sum_i c_i L_i. The state (c, ``stats``, the rule's state) changes in that
        backward only: a total never backpropagated changes nothing. In an accumulation
        window the total is 1/k of that, or undivided with ``caller_divides=True`` (for a
        caller that divides it by k itself)."""
        try:
            return super().loss(losses, shared, **signals)
        finally:
            _set(self, "_tap", None)

    # ------------------------------------------------------------------ the step
    def _step(self, losses: list[Tensor], stacked: Tensor, values: Tensor, shared: SharedLike,
              **signals: Any) -> Tensor:
        _set(self, "_undivided", False)  # backward divides a window's total by k itself
        total = self._total(losses, stacked, values, shared, signals)
        if total.requires_grad:
            self._backward(total)
        return total.detach()

    def _loss_step(self, losses: list[Tensor], stacked: Tensor, values: Tensor,
                   shared: SharedLike, **signals: Any) -> Tensor:
        # under caller_divides the total is returned undivided: the caller divides it by k
        _set(self, "_undivided", self.caller_divides and self.accumulation_steps > 1)
        total = self._total(losses, stacked, values, shared, signals)
        return total if total.requires_grad else total.requires_grad_()

    def _total(self, losses: list[Tensor], stacked: Tensor, values: Tensor, shared: SharedLike,
               signals: dict[str, Any]) -> Tensor:
        """The call's checks and *measure*'s set-up; returns the total to backpropagate
        (wrapped: its backward runs the pending step), or a detached one when a non-finite
        gradient skips the step before any backward."""
        self._no_signals(signals)
        tap = self._tap
        _set(self, "_tap", None)
        shared_list = _checks.shared_tensors(shared)
        if tap is not None:
            total = self._at_h(losses, stacked, values, tap, shared_list)
        elif shared_list:
            total = self._at_parameters(losses, stacked, values, shared_list)
        else:
            raise ValueError(
                "shared=None aggregates the gradients at the tapped representation: call "
                "feats = bal.tap(h) and feed feats[i] to head i, or pass shared= tensors"
            )
        return total

    def _at_h(self, losses: list[Tensor], stacked: Tensor, values: Tensor, tap: Tap,
              shared: list[Tensor]) -> Tensor:
        """Checks and hooks for the replacement at h; returns the total sum_i L_i (1/k of
        it in a window) wrapped so that its backward hands the pending step the scale."""
        k = self.accumulation_steps
        if k > 1 and self._window.count:
            raise ValueError(
                "an accumulation window at parameters is in progress; a call in the same "
                "window cannot aggregate at the tapped h"
            )
        # a capture of this call only, referenced by the total's graph and not by self
        capture = Capture(self._workspace, None)
        pattern = self._check_tap_graph(losses, tap.h, shared, capture)
        site = Site(tap.h, shared, pattern, per_sample=not shared, keep=False, gram=True)
        ones = torch.ones_like(values)
        weights = ones if k == 1 else ones / k
        pending = _Pending(self, values, weights, site)
        pending.capture = capture
        capture.begin(tap.h, [], None, grads=True)
        tap.h.register_hook(pending.hook())
        total = stacked @ _like(ones if self._undivided else weights, stacked)
        return _Deferred.apply(total, pending)

    def _at_parameters(self, losses: list[Tensor], stacked: Tensor, values: Tensor,
                       shared: list[Tensor]) -> Tensor:
        """Measure the per-task gradients at ``shared`` now; returns the total (sum_i c_i L_i
        with this call's c, or the window's w-weighted total) wrapped as at h."""
        self._check_general_graph(losses, shared)
        leaves = [t.is_leaf for t in shared]
        if any(leaves) and not all(leaves):
            raise ValueError(
                "shared mixes parameters (leaf tensors) and intermediate tensors: pass one "
                "kind (parameters, or e.g. the representation h)"
            )
        per_sample = not leaves[0]
        k = self.accumulation_steps
        window = k > 1 and not per_sample
        if window:
            self._window.check(False, (self.num_tasks, sum(t.numel() for t in shared)))
        site = Site(None, shared, None, per_sample, keep=window, gram=not window)
        ones = torch.ones_like(values)
        measured = measure_general(losses, site, ones, self.general_path == "batched", None)
        synced = self._synced()
        if synced and not window:
            measured = self._gram_over_processes(measured)
        seen = measured.norms
        if synced and window:  # T numbers, so that every process agrees on a non-finite one
            seen = mean_over_processes(seen, self._group())
        bad = _checks.first_nonfinite(seen)
        if bad is not None:
            self._nonfinite(bad, seen, before_backward=True)
            if window:
                self._window.add_skipped()
            return values @ _like(self.task_weights, values)  # no backward
        pending = _Pending(self, values, ones, site)
        if window:
            pending.measured = measured._replace(vectors=measured.vectors.div_(k),
                                                 norms=measured.norms / k)
            weights = _like(self.task_weights, values).clone()
            pending.weights = weights
            total = stacked @ _like(weights if self._undivided else weights / k, stacked)
        else:
            gram = measured.gram
            assert gram is not None
            c, pending.commit = self._prepare(gram, values)
            pending.coefficients, pending.measured = c, measured
            divided = k > 1 and not self._undivided
            total = stacked @ _like(c.detach() / k if divided else c.detach(), stacked)
        return _Deferred.apply(total, pending)

    def _aggregate_at_h(self, pending: _Pending, capture: Capture) -> Tensor | None:
        """Inside the backward, every head having delivered: G, c, and sum_i c_i g_i."""
        grads = capture.kept_grads()  # g_i at h [T, *h.shape], each carrying scale / k
        site = pending.site
        synced = self._synced()
        gram, vectors = gram_at_tap(grads, site.h, site.shared, site.pattern,  # type: ignore
                                    vectors=synced and bool(site.shared),
                                    workspace=self._workspace)
        assert pending.scale is not None
        unit = pending.scale.to(gram) / self.accumulation_steps  # what each g_i carries
        if vectors is not None:  # at a weight, over processes: average the gradients
            vectors = mean_over_processes(vectors.div_(unit), self._group(), in_place=True)
            gram = gram_of(vectors)
        else:
            gram = gram / unit.square()
            if synced:  # per-sample: (1/P^2) sum_p G_p
                size = dist.get_world_size(self._group())
                dist.all_reduce(gram, group=self._group())
                gram = gram.div_(size * size)
        norms = gram.diagonal().clamp(min=0).sqrt()
        bad = _checks.first_nonfinite(gram.diagonal())
        if bad is not None:
            scaled = bool(pending.scale != 1)
            self._nonfinite(bad, norms, before_backward=False, scaled=scaled)
            if scaled:  # the scaled gradients overflowed (or only G did): the scaler must
                # see it, skip the optimizer step and lower the scale
                return torch.full_like(site.h, float("nan"))  # type: ignore[arg-type]
            return None  # "skip": the summed gradient goes on
        c, commit = self._prepare(gram, pending.values)
        flat = grads.view(grads.shape[0], -1)
        direction = torch.matmul(_like(c.detach(), flat), flat).view_as(site.h)  # type: ignore
        self._commit_step(c, gram, norms, commit)
        return direction

    def _finish_at_parameters(self, pending: _Pending) -> None:
        """At the total's arrival: commit this call's c, or add the call to the window and,
        at its last call, form c from the window's per-task gradients and correct
        ``.grad``."""
        measured = pending.measured
        assert measured is not None
        if pending.coefficients is not None:
            gram = measured.gram
            assert gram is not None
            self._commit_step(pending.coefficients, gram, measured.norms, pending.commit)
            return
        out = self._window.add(pending.values, measured.norms, False, True, measured.vectors)
        if out is None:
            return
        values, _, finite, vectors = out
        if not finite:
            self.last_step_skipped = True
            return
        if self._synced():
            vectors = mean_over_processes(vectors, self._group(), in_place=True)
        gram = gram_of(vectors)
        norms = gram.diagonal().sqrt()
        bad = _checks.first_nonfinite(norms)
        if bad is not None:  # finite parts whose sum overflowed
            self._nonfinite(bad, norms, before_backward=False)
            return
        c, commit = self._prepare(gram, values)
        # .grad of the shared tensors holds (scale times) sum_i w_i v_i once this backward
        # is done; add the difference to sum_i c_i v_i (before or after: it adds up)
        assert pending.scale is not None
        delta = (_like(c.detach(), vectors) - pending.weights.to(vectors)) @ vectors
        delta = delta * pending.scale.to(delta)
        start = 0
        for p in pending.site.shared:
            part = delta[start:start + p.numel()].view_as(p).to(p.dtype)
            start += p.numel()
            if p.grad is None:
                p.grad = part.clone()
            else:
                p.grad.add_(part)
        self._commit_step(c, gram, norms, commit)

    def _commit_step(self, c: Tensor, gram: Tensor, norms: Tensor, commit: Commit) -> None:
        """The update's commit: c, the rule's state, the step count and ``stats``."""
        c = c.detach()
        if commit is not None:
            commit()
        self.task_weights.copy_(c)
        self.num_steps.add_(1)
        _set(self, "stats", {"weight": c.clone(), "gram": gram.detach(),
                             "grad_norm": norms.detach()})

    def _nonfinite(self, bad: int, seen: Tensor, *, before_backward: bool,
                   scaled: bool = False) -> None:
        """A non-finite gradient: skip (``on_nonfinite="skip"`` or under a gradient scaler,
        ``last_step_skipped``) or raise a ValueError naming the task."""
        if self.on_nonfinite == "skip" or scaled or self._scaler is not None:
            self.last_step_skipped = True
            return
        who = _checks.task_label(bad, self.task_names)
        where = ("the model's .grad is untouched" if before_backward else
                 "the model's .grad already holds part of this step's gradient: zero it "
                 "before the next step")
        raise ValueError(
            f"the gradient of {who} is non-finite (norm {float(seen[bad])}) with "
            f"finite losses; the balancer's state is untouched and {where}. Pass "
            "on_nonfinite='skip' to skip such steps"
        )

    # ------------------------------------------------------------------ processes
    def _synced(self) -> bool:
        """Whether this step synchronises over processes (``_combine.is_synced``)."""
        return is_synced(self.distributed)

    def _group(self) -> Any:
        """The process group to synchronise over (None: the default group)."""
        return process_group(self.distributed, type(self).__name__)

    def _loss_values(self, values: Tensor) -> Tensor:
        """L_i: this process's, or the mean over the processes (every process then decides
        alike on a non-finite loss)."""
        if not self._synced():
            return values
        return mean_over_processes(values, self._group())

    def _gram_over_processes(self, measured: Measurement) -> Measurement:
        """The Gram matrix of the global per-task gradients at ``shared`` (no tap): at
        parameters from the per-task gradients averaged over the processes, at per-sample
        tensors (1/P^2) sum_p G_p."""
        group = self._group()
        if measured.per_sample:
            gram = measured.gram.clone()  # type: ignore[union-attr]
            size = dist.get_world_size(group)
            dist.all_reduce(gram, group=group)
            gram = gram.div_(size * size)
        else:
            vectors = mean_over_processes(measured.vectors, group,  # type: ignore[arg-type]
                                          in_place=True)
            gram = gram_of(vectors)
            measured = measured._replace(vectors=vectors)
        return measured._replace(gram=gram, norms=gram.diagonal().clamp(min=0).sqrt())

    def _skipped_call(self) -> None:
        """A call skipped for a non-finite loss counts in a window at parameters."""
        if self.accumulation_steps > 1 and self._tap is None:
            self._window.add_skipped()

    # ------------------------------------------------------------------ validation
    def _check_tap_graph(self, losses: list[Tensor], h: Tensor, shared: list[Tensor],
                         capture: Capture) -> LinearPattern | None:
        """Each loss reaches h through operations of its own, h every shared tensor (and no
        loss reaches them around h); returns the ``nn.Linear`` pattern of h at ``shared``
        when it matches (the Gram matrix from delta_i and x), else None."""
        edges = self._shared_edges(shared) if shared else []
        pattern = linear_pattern(h, shared, edges) if shared else None
        problem = capture.walk(losses, h, shared, edges, pattern, False, grads=True)
        if problem is not None:
            raise _checks.tap_graph_error(problem, self.task_names)
        if shared and pattern is None:
            found = _graph.reached_edges(h, edges)
            if len(found) != len(edges):
                k = min(set(range(len(edges))) - found)
                raise ValueError(f"shared[{k}] is outside the graph of the tapped "
                                 "representation h")
        return pattern

    def _check_general_graph(self, losses: list[Tensor], shared: list[Tensor]) -> None:
        _checks.check_losses_reach(losses, self._shared_edges(shared), self.task_names)

    @staticmethod
    def _shared_edges(shared: list[Tensor]) -> list:
        _checks.check_requires_grad(shared)
        return _graph.edges_of(shared)

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {"window": copy.deepcopy(self._window.state()), "rule": self._rule_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._window.load(copy.deepcopy(state["window"]))
        self._load_rule_state(state["rule"])

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        self._window.apply(fn)  # a window in progress moves with the coefficients
        return self
