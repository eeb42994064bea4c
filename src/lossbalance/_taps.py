"""measure: per-task gradient quantities at h or at shared tensors (the step's first stage).

``measure_at_tap`` (fast path) and ``measure_general`` (no tap) each return a ``Measurement``
of one call: G_i = ||grad_S (w_i L_i)|| for every task at the shared tensors S and, where the
exact combination needs them, the per-task gradients themselves. ``Site`` says where a call
measures; the rest of this module is how. For the aggregation methods (``Site.gram``) the
tasks' Gram matrix G_ij = <g_i, g_j>: on the general path from the per-task gradients, on the
fast path by ``gram_at_tap`` from each g_i at h, which a ``Capture`` in "grads" mode keeps
(there, unlike for norms, a [T, *h.shape] buffer is held: every g_i is needed at once).

Fast path (``tap``): every head consumes the shared representation h itself. Before the one
ordinary backward of sum_i w_i L_i, the graph is walked from each loss to find the autograd
nodes of its head that take h as an input; a post-hook on each such node sees
g_i = w_i dL_i/dh the moment it is formed, before autograd adds it to the other tasks'
gradients at h. So nothing of size T x |h| is ever held: memory stays that of the plain step.
Norms at h are ||g_i||. Norms at shared parameters upstream of h: when h is
``act(x @ W.T + b)`` (an ``nn.Linear`` then element-wise activations) the hooks write
delta_i = g_i * act'(z) into a small kept buffer and every ``chunk`` tasks one batched matmul
forms dW_i = delta_i^T x (and db_i = sum_b delta_i); when the layer is wider than the batch,
||dW_i||^2 = <delta_i, (x x^T) delta_i> costs B^2 out instead of B in out multiply-adds
(8x fewer for 1024 -> 1024 at batch 128); for any other layer each hook runs one
vector-Jacobian product from h to the shared tensors, whose graph is still alive then (no
``retain_graph`` on the network, no ``create_graph``).

General path (no tap): the T per-task gradients dL_i/d(shared) come from one
``torch.autograd.grad`` per task (each walks head i and the trunk above ``shared`` only), or
from one batched ``autograd.grad`` over the stacked losses with the identity as cotangents
(``is_grads_batched=True``), which falls back to the loop when an operator has no batching
rule. The batched product walks every head once per task (T^2 head work): on the paper's toy
network it measured 2.8x the plain step at T=10 and 10.8x at T=64, the loop 1.8x and 1.9x.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _graph, _native
from ._checks import first_nonfinite

# Element-wise activations whose Jacobian is diagonal: their VJP of a ones tensor is that diagonal.
_ELEMENTWISE = frozenset(
    {
        "ReluBackward0",
        "LeakyReluBackward0",
        "TanhBackward0",
        "SigmoidBackward0",
        "GeluBackward0",
        "EluBackward0",
        "SiluBackward0",
        "SoftplusBackward0",
        "HardtanhBackward0",
    }
)


class LinearPattern(NamedTuple):
    """h = act(x @ W.T + b) as ``linear_pattern`` matched it: the activation nodes (from the
    Python match; None from the C++ one, which gives act'(z) itself), the layer's input x,
    the role of each shared tensor ({id: "weight" | "bias"}), and act'(z) as ReLU's output
    (one ReLU) or as the activation chain's VJP of ones (None when not known yet)."""

    acts: list | None
    x: Tensor
    roles: dict[int, str]
    relu_out: Tensor | None = None
    jac: Tensor | None = None


class Tap:
    """One step's tap of the shared representation h: remembered until ``backward``."""

    __slots__ = ("h",)

    def __init__(self, h: Tensor) -> None:
        self.h = h


class Site(NamedTuple):
    """Where one call measures, decided and checked before anything changes.

    ``h``: the tapped representation (fast path), or None (general path); ``shared``: the
    shared tensors S ([] for norms at h itself); ``pattern``: h = act(x @ W.T + b) when S are
    that ``nn.Linear``'s parameters (fast path), else None; ``per_sample``: whether the
    gradients at S are per-sample (h, non-leaf tensors: parts of a batch combine as the root of
    their summed squares) or a parameter's (parts add up); ``keep``: whether to keep each
    task's gradient at S, for the exact combination at parameters (``lossbalance._combine``);
    ``gram``: whether to form the tasks' Gram matrix <g_i, g_j> at S (the aggregation
    methods: on the general path from the kept per-task gradients, on the fast path from
    each g_i at h, see ``gram_at_tap``).
    """

    h: Tensor | None
    shared: list[Tensor]
    pattern: LinearPattern | None
    per_sample: bool
    keep: bool
    gram: bool = False


class Measurement(NamedTuple):
    """What *measure* found in one call, for T tasks at the shared tensors S.

    ``norms``: G_i = ||grad_S (w_i L_i)|| [T] with w the weights the backward used, the
    gradient scaler's scale divided out (float32 or wider). ``vectors``: grad_S (w_i L_i)
    flattened, [T, P] in ``shared``'s order (see ``per_task_vectors``), when ``Site.keep``,
    else None. ``per_sample``: as ``Site.per_sample``. ``total``: sum_i w_i L_i (detached)
    when the measurement ran the model's backward (fast path), else None (the general path
    measures before it).

    ``gram``: the tasks' Gram matrix G_ij = <g_i, g_j> [T, T] at S when ``Site.gram`` (the
    aggregation methods: MGDA, PCGrad, CAGrad, ...), else None; its diagonal is norms^2.
    """

    norms: Tensor
    vectors: Tensor | None
    per_sample: bool
    total: Tensor | None
    gram: Tensor | None = None


def measure_at_tap(capture: Capture, site: Site, backward: Callable[[], Tensor],
                   scale: Tensor | None) -> Measurement:
    """Fast path: run ``backward`` (the model's one ordinary backward of sum_i w_i L_i,
    returning the detached total) with ``capture``'s hooks on each head's reads of h.

    Returns the Measurement of this call: G_i at h or at ``site.shared`` (divided by the
    gradient scaler's ``scale`` when there is one: the backward ran on scaled losses), the
    per-task gradients when ``site.keep``, and the total. ``capture.walk`` must have found
    the heads' nodes (the graph check does it).
    """
    capture.begin(site.h, site.shared, site.pattern, vectors=site.keep)
    try:
        total = backward()
        norms = capture.finish()  # G_i = ||grad_S (w_i L_i)||
        vectors = capture.vectors  # grad_S (w_i L_i) when kept, else None
    finally:
        capture.end()
    if scale is not None:
        norms = norms / scale.to(norms)
        vectors = None if vectors is None else vectors / scale.to(vectors)
    return Measurement(norms, vectors, site.per_sample, total)


def measure_general(losses: Sequence[Tensor], site: Site, weights: Tensor, batched: bool,
                    scale: Tensor | None) -> Measurement:
    """General path (no tap): the T per-task gradients dL_i/dS from ``autograd.grad``, one
    call per task, or one batched call (``batched``; its non-finite results are redone by
    the loop, which alone tells which task overflowed), before the model's backward.

    Returns the Measurement with G_i = w_i ||dL_i/dS|| (``weights``: w as the backward will
    use them), the weighted per-task gradients when ``site.keep`` or ``site.gram``, their
    Gram matrix when ``site.gram``, and ``total`` None: the caller runs the backward once
    the norms are known to be finite.
    """
    keep = site.keep or site.gram
    measure = per_task_vectors if keep else per_task_norms
    grads = measure(losses, site.shared, batched, scale)
    norms = row_norms(grads) if keep else grads
    if batched and first_nonfinite(norms) is not None:
        grads = measure(losses, site.shared, False, scale)  # the right task
        norms = row_norms(grads) if keep else grads
    norms_w = weights.to(norms) * norms
    vectors = grads.mul_(weights.to(grads)[:, None]) if keep else None
    gram = gram_of(vectors) if site.gram else None  # type: ignore[arg-type]
    return Measurement(norms_w, vectors, site.per_sample, None, gram)


def gram_of(vectors: Tensor) -> Tensor:
    """G = V V^T [T, T] for the rows of V [T, P] (one matmul), made exactly symmetric."""
    gram = vectors @ vectors.T
    return (gram + gram.T) / 2


def gram_at_tap(grads: Tensor, h: Tensor, shared: Sequence[Tensor],
                pattern: LinearPattern | None, vectors: bool = False,
                workspace: Workspace | None = None) -> tuple[Tensor, Tensor | None]:
    """The Gram matrix of the per-task gradients at ``shared`` (at h itself when empty),
    from each task's gradient at h, ``grads`` [T, *h.shape] (a ``Capture`` in "grads" mode
    kept them), in float32 or wider. Returns (G [T, T], the per-task vectors [T, P] or None).

    At h: G = V V^T with V = grads viewed [T, |h|] (T^2 |h| multiply-adds, one matmul).
    At one ``nn.Linear`` (``pattern``): delta_i = g_i * act'(z) [T, R, out] (R rows of the
    layer's input x [R, in]) and dW_i = delta_i^T x, db_i = sum_r delta_i; for the weight,
    <dW_i, dW_j> = sum_{r,s} (x x^T)_{rs} (delta_i delta_j^T)_{rs}, from K delta_j with
    K = x x^T when the layer is wider than the batch (R < in: T R^2 out + T^2 R out
    multiply-adds), else from dW_i formed by one batched matmul (T R out in + T^2 out in).
    Elsewhere: one vector-Jacobian product from h to ``shared`` per task (the graph below h
    is still alive when the hook on h runs). ``vectors`` (the per-task gradients at
    ``shared`` themselves, for an average over processes) forms dW_i and db_i whatever the
    widths. ``workspace``: where delta_i and dW_i (or K delta_i) are written, kept between
    steps (else they are allocated).
    """
    dtype = _norm_dtype(h)
    num_tasks = grads.shape[0]
    flat = grads.view(num_tasks, -1)
    if not shared:
        flat = flat if flat.dtype == dtype else flat.to(dtype)
        return gram_of(flat), (flat if vectors else None)
    if pattern is None:  # the generic vector-Jacobian product, one per task
        rows = torch.stack([
            flat_rows(torch.autograd.grad(h, list(shared), grads[i], retain_graph=True,
                                          allow_unused=True), shared, None, dtype)
            for i in range(num_tasks)
        ])
        return gram_of(rows), (rows if vectors else None)
    x = pattern.x
    rows_, out_ = x.shape[0], h.shape[-1]

    def buffer(name: str, shape: tuple[int, ...]) -> Tensor:
        if workspace is None:
            return torch.empty(shape, dtype=grads.dtype, device=grads.device)
        return workspace.get(name, shape, grads)

    delta = torch.mul(grads, activation_derivative(pattern, h),
                      out=buffer("gram-delta", tuple(grads.shape)))
    delta = delta.view(num_tasks, rows_, out_)  # [T, R, out]
    if vectors:
        rows = torch.cat([
            torch.matmul(delta.transpose(1, 2), x).reshape(num_tasks, -1)
            if pattern.roles[id(p)] == "weight" else delta.sum(dim=1)
            for p in shared
        ], dim=1).to(dtype)
        return gram_of(rows), rows
    gram = None
    for p in shared:
        if pattern.roles[id(p)] == "weight" and x.shape[0] < x.shape[1]:
            kd = torch.matmul(x @ x.T, delta,  # K delta_j, K = x x^T [R, R]
                              out=buffer("gram-kd", (num_tasks, rows_, out_)))
            part = delta.reshape(num_tasks, -1).to(dtype) @ kd.reshape(num_tasks, -1).to(dtype).T
        elif pattern.roles[id(p)] == "weight":
            dw = torch.matmul(delta.transpose(1, 2), x,  # dW_i = delta_i^T x
                              out=buffer("gram-dw", (num_tasks, out_, x.shape[1])))
            dw = dw.view(num_tasks, -1).to(dtype)
            part = dw @ dw.T
        else:
            db = delta.sum(dim=1).to(dtype)  # db_i = sum_r delta_i
            part = db @ db.T
        gram = part if gram is None else gram + part
    assert gram is not None
    return (gram + gram.T) / 2, None


def activation_derivative(pattern: LinearPattern, h: Tensor) -> Tensor:
    """act'(z) for h = act_k(...act_1(z)), z = x W^T + b: element-wise, as h's shape (the
    activation chain's VJP of ones; ones without activations)."""
    if pattern.jac is not None:
        return pattern.jac
    if pattern.relu_out is not None:
        return (pattern.relu_out > 0).to(h.dtype)
    jac = torch.ones_like(h)
    with torch.no_grad():
        for node in pattern.acts or ():
            jac = node(jac)
    return jac


def row_norms(vectors: Tensor) -> Tensor:
    """||v_i|| for each row of a [T, P] tensor."""
    return torch.linalg.vector_norm(vectors, dim=1)


def _flat_norms(g: Tensor) -> Tensor:
    """Row-wise Euclidean norms of a [T, ...] stack, accumulated in float32 or wider."""
    return torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1, dtype=_norm_dtype(g))


def _norm_of(tensors: Sequence[Tensor | None], like: Tensor, dtype: torch.dtype) -> Tensor:
    """One task's norm over several gradient tensors taken together (missing ones are 0)."""
    present = [t for t in tensors if t is not None]
    if len(present) == 1:
        return torch.linalg.vector_norm(present[0], dtype=dtype)
    if not present:
        return torch.zeros((), dtype=dtype, device=like.device)
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t, dtype=dtype) for t in present]))


def _joint_norms(grads: Sequence[Tensor | None], num_tasks: int, like: Tensor) -> Tensor:
    """Per-task norm over several [T, ...] gradient stacks taken together."""
    present = [_flat_norms(g) for g in grads if g is not None]
    if not present:
        return torch.zeros(num_tasks, dtype=torch.float32, device=like.device)
    if len(present) == 1:
        return present[0]
    return torch.linalg.vector_norm(torch.stack(present, dim=1), dim=1)


def linear_pattern(h: Tensor, shared: Sequence[Tensor], edges: Sequence | None = None,
                   native: Any = None) -> LinearPattern | None:
    """Match h = act_k(...act_1(x @ W.T + b)) with ``shared`` among {W, b}.

    ``nn.Linear`` on inputs with more than two dimensions ([B, L, in]: sequences, tokens)
    matches too: it runs as one matmul over the B*L rows whose result is viewed as h, so
    x is then the [B*L, in] input and delta_i is read as [B*L, out].
    Returns (activation nodes, x, {id(param): "weight" | "bias"}) or None when h is not of
    that form; the caller then uses the generic VJP. A match also proves that h reaches every
    tensor of ``shared``. It is refused when a shared tensor is also used below the layer
    (tied weights, a recurrent trunk), where delta_i^T x would be only part of its gradient;
    telling that needs a walk of the graph below the layer (a few us a node in Python).
    With ``native`` (the C++ capture) the same match runs in C++.
    """
    if h.dim() < 2 or not shared:
        return None
    if native is not None:
        match = native.match_linear(h, list(shared))
        if match is None:
            return None
        x, roles, relu_out, jac = match
        return LinearPattern(None, x, {id(p): r for p, r in zip(shared, roles, strict=True)},
                             relu_out, jac)
    node = h.grad_fn
    acts = []
    while node is not None and type(node).__name__ in _ELEMENTWISE:
        acts.append(node)
        node = node.next_functions[0][0]
    if node is not None and type(node).__name__ in ("ViewBackward0", "UnsafeViewBackward0"):
        node = node.next_functions[0][0]  # the [B*L, out] result viewed as [B, L, out]
    elif h.dim() != 2:
        return None
    if node is None:
        return None
    kind = type(node).__name__
    if kind == "AddmmBackward0":
        if node._saved_alpha != 1 or node._saved_beta != 1:
            return None
        bias_edge, _, weight_edge = node.next_functions
    elif kind == "MmBackward0":
        bias_edge, weight_edge = (None, 0), node.next_functions[1]
    else:
        return None
    t_node = weight_edge[0]
    if t_node is None or type(t_node).__name__ != "TBackward0":
        return None
    w_acc = t_node.next_functions[0][0]
    roles: dict[int, str] = {}
    if w_acc is not None and type(w_acc).__name__ == "AccumulateGrad":
        roles[id(w_acc.variable)] = "weight"
    b_acc = bias_edge[0]
    if b_acc is not None and type(b_acc).__name__ == "AccumulateGrad":
        roles[id(b_acc.variable)] = "bias"
    if any(id(p) not in roles for p in shared):
        return None
    x = node._saved_mat1 if kind == "AddmmBackward0" else node._saved_self
    if x is None or x.dim() != 2 or h.numel() != x.shape[0] * h.shape[-1]:
        return None  # h must be the matmul's [rows, out] result, rows split at most
    x_node = node.next_functions[1 if kind == "AddmmBackward0" else 0][0]
    edges = _graph.edges_of(shared) if edges is None else edges  # the shared tensors' edges
    if _graph.reached_from(x_node, edges, first=True):
        return None  # a shared tensor is used below this layer too
    return LinearPattern(acts, x, roles)


class Workspace:
    """Buffers kept across steps so the per-task products allocate nothing after step one."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._rows: dict[str, tuple[Tensor, tuple[Tensor, ...]]] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor,
            dtype: torch.dtype | None = None) -> Tensor:
        dtype = like.dtype if dtype is None else dtype
        buf = self._buffers.get(name)
        if (buf is None or buf.shape != shape or buf.dtype != dtype
                or buf.device != like.device):
            buf = torch.empty(shape, dtype=dtype, device=like.device)
            self._buffers[name] = buf
        return buf

    def rows(self, name: str, shape: tuple[int, ...], like: Tensor,
             dtype: torch.dtype | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        """A kept buffer and its views along the first dimension, made once (not one view
        a task a step): the hooks write each task's result into its row with ``out=``."""
        buf = self.get(name, shape, like, dtype)
        kept = self._rows.get(name)
        if kept is None or kept[0] is not buf:
            kept = (buf, buf.unbind(0))
            self._rows[name] = kept
        return kept

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


class Capture:
    """Collects each task's gradient at h from post-hooks on its head's consumer nodes.

    Kept by the balancer across steps (its hook functions and buffers are made once).
    ``begin(...)`` registers this step's hooks, one per node that takes h as an input; after
    the backward, ``finish()`` returns G_i, the norm of the task's weighted gradient at the
    shared tensors (at h when ``shared`` is empty), and ``end()`` closes the step.

    Each hook hands the task's gradient g_i to ``_take``, chosen per step: "h" writes ||g_i||
    into row i of a kept [T] buffer; "linear" writes delta_i = g_i * act'(z) into a chunk
    buffer and every ``chunk`` tasks forms their norms at once; "vjp" maps g_i to the shared
    tensors by one vector-Jacobian product.
    """

    def __init__(self, workspace: Workspace, chunk: int) -> None:
        self.workspace, self.chunk_size = workspace, chunk
        self.generation = 0  # counts the steps: a hook acts only in its own step
        self._orders: dict[tuple[tuple[int, ...], bool], Tensor] = {}  # see _index
        self.filled: list[int] = []  # tasks whose delta sits in the chunk buffer
        self.order: list[int] = []  # tasks in the order their chunk norms were formed
        self.partial: dict[int, Tensor] = {}
        self._native: Any = None  # the C++ capture, made on first use
        self._native_made = False
        self._walked: Any = None  # what ``walk`` found: consumers or the native
        self.native: Any = None  # the C++ capture serving this step
        self.end()

    def __getstate__(self) -> dict:
        """For ``copy.deepcopy`` and pickling: the C++ capture neither copies nor pickles
        (a copy makes its own on first use), and the cached index tensors are made again
        on demand."""
        state = self.__dict__.copy()
        state["_orders"] = {}
        state["_native"], state["_native_made"] = None, False  # a C++ object: made again
        state["_walked"] = None
        return state

    def walk(self, losses: Sequence[Tensor], h: Tensor, shared: Sequence[Tensor],
             edges: Sequence | None, pattern: LinearPattern | None, vectors: bool,
             grads: bool = False) -> tuple | None:
        """Find each loss's nodes that read h (``_graph.consumers_of``), for ``begin``.

        Returns ``consumers_of``'s problem or None. The C++ capture (``lossbalance._native``)
        walks and hooks when it serves the step's mode: norms at h, or at one ``nn.Linear``
        weight no wider than the batch without kept vectors; otherwise (and for ``grads``,
        the per-task gradients at h that ``begin(..., grads=True)`` keeps) the Python walk
        runs.
        """
        native = (self.native_capture()
                  if not grads and _native_serves(shared, pattern, vectors) else None)
        if native is not None:
            self._walked = native
            return native.walk(list(losses), h, list(shared))
        if edges is None:
            edges = _graph.edges_of(shared)
        consumers, problem = _graph.consumers_of(losses, h, edges)
        self._walked = consumers
        return problem

    def native_capture(self) -> Any:
        """The C++ capture object (made on first use), or None."""
        if not self._native_made:
            self._native, self._native_made = _native.new_capture(), True
        return self._native

    def begin(self, h: Tensor, shared: Sequence[Tensor],
              pattern: LinearPattern | None, vectors: bool = False,
              grads: bool = False) -> None:
        """Hook the consumer nodes that ``walk`` found. ``vectors``: also keep each task's
        gradient at the shared parameters, as row i of ``self.vectors`` [T, P] (see
        ``per_task_vectors`` for the layout), for the exact combination over micro-batches
        or processes. ``grads`` (the aggregation methods): keep each task's gradient at h
        itself, as row i of ``self.grads`` [T, *h.shape] (a buffer of the workspace), and
        nothing else; ``kept_grads()`` returns it once every task has delivered."""
        walked, self._walked = self._walked, None
        self.h, self.shared, self.pattern = h, list(shared), pattern
        self.norm_dtype = _norm_dtype(h)
        self.mode = "h" if not self.shared else ("linear" if pattern is not None else "vjp")
        if grads:
            self.mode = "grads"
        if not isinstance(walked, list):  # the C++ capture walked; it hooks too
            num_tasks = walked.num_consumers()
            self.out = self.workspace.get("norms", (num_tasks,), h, self.norm_dtype)
            if self.mode == "h":
                walked.begin_h(h, self.out, self.norm_dtype)
            else:
                self._begin_linear(h, num_tasks, walked)
            self.native, self.active = walked, True
            return
        consumers = walked
        num_tasks = len(consumers)
        self.done = [False] * num_tasks
        self.remaining = [len(edges) for edges in consumers]
        self.out, self.rows = self.workspace.rows("norms", (num_tasks,), h, self.norm_dtype)
        self._take = {"h": self._take_h, "vjp": self._take_vjp,
                      "linear": self._take_linear, "grads": self._take_grad}[self.mode]
        if self.mode == "grads":
            self.grads, self.grad_rows = self.workspace.rows("grads", (num_tasks, *h.shape), h)
        if vectors and self.mode != "h":
            size = sum(p.numel() for p in self.shared)
            self.vectors = self.workspace.get("vectors", (num_tasks, size), h, self.norm_dtype)
        if self.mode == "linear":
            self._begin_linear(h, num_tasks)
        self.generation += 1
        for i, edges in enumerate(consumers):
            single = len(edges) == 1
            for node, k in edges:
                node.register_hook(  # type: ignore[attr-defined]
                    self._make_hook(i, k, single, self.generation))
        self.active = True

    def _begin_linear(self, h: Tensor, num_tasks: int, native: Any = None) -> None:
        acts, x, roles, self.relu_out, self.jac = self.pattern  # type: ignore[misc]
        self.chunk = max(1, min(self.chunk_size or auto_chunk(num_tasks), num_tasks))
        self.x = x
        # (from the C++ match, acts is None and relu_out or jac came with the pattern)
        if acts and len(acts) == 1 and type(acts[0]).__name__ == "ReluBackward0":
            # act'(z) = [h > 0]: delta_i = relu's own backward of g_i, no Jacobian kept
            self.relu_out = acts[0]._saved_result.detach()
        elif acts:
            with torch.no_grad():  # act'(z): the activation chain's VJP of ones
                jac = torch.ones_like(h)
                for node in acts:
                    jac = node(jac)
            self.jac = jac
        batch, fan_in = x.shape
        if native is not None:  # it serves one weight no wider than the batch only
            delta = self.workspace.get("delta", (self.chunk, *h.shape), h)
            self.dw = self.workspace.get("dw", (self.chunk, h.shape[-1], fan_in), h)
            native.begin_linear(h, self.out, self.norm_dtype, delta, x, self.dw,
                                self.relu_out, self.jac)
            return
        self.delta, self.slots = self.workspace.rows("delta", (self.chunk, *h.shape), h)
        self.delta_rows = self.delta.view(self.chunk, x.shape[0], h.shape[-1])  # [n, rows, out]
        self.pos = 0
        if (len(self.shared) == 1 and roles[id(self.shared[0])] == "weight" and batch >= fan_in
                and self.vectors is None):
            self.dw = self.workspace.get("dw", (self.chunk, h.shape[-1], fan_in), h)

    def _make_hook(self, i: int, k: int, single: bool, generation: int):
        def hook(grad_inputs, grad_outputs):  # hooks run under the backward's no-grad mode
            if not self.active or self.generation != generation:
                return  # a node of an earlier step, backpropagated again
            g = grad_inputs[k]
            if g is None:
                g = torch.zeros_like(self.h)
            if not single:  # a head that reads h in several places: sum them first
                self.remaining[i] -= 1
                self.partial[i] = g if i not in self.partial else self.partial[i] + g
                if self.remaining[i]:
                    return
                g = self.partial.pop(i)
            self._take(i, g)
        return hook

    def _take_h(self, i: int, g: Tensor) -> None:
        # into row i of the kept buffer: no tensor a task, no stack of T scalars at the end
        torch.linalg.vector_norm(g, dtype=self.norm_dtype, out=self.rows[i])
        self.done[i] = True

    def _take_grad(self, i: int, g: Tensor) -> None:
        self.grad_rows[i].copy_(g)
        self.done[i] = True

    def kept_grads(self) -> Tensor:
        """The tasks' gradients at h [T, *h.shape] kept in "grads" mode, once the hooks of
        every task have run (the workspace's buffer: read it before the next step)."""
        missing = [i for i, done in enumerate(self.done) if not done]
        if missing:  # the graph walk promised every task a consumer node
            raise RuntimeError(f"no gradient at h was seen for tasks {missing}")
        return self.grads

    def _take_vjp(self, i: int, g: Tensor) -> None:
        grads = torch.autograd.grad(self.h, self.shared, g, retain_graph=True,
                                    allow_unused=True)
        if self.vectors is None:
            self.rows[i].copy_(_norm_of(grads, g, self.norm_dtype))
        else:
            row = self.vectors[i]
            row.copy_(flat_rows(grads, self.shared, None, self.norm_dtype))
            torch.linalg.vector_norm(row, out=self.rows[i])
        self.done[i] = True

    def _take_linear(self, i: int, g: Tensor) -> None:
        filled = self.filled
        slot = self.slots[len(filled)]
        if self.relu_out is not None:
            torch.ops.aten.threshold_backward.grad_input(g, self.relu_out, 0, grad_input=slot)
        elif self.jac is not None:
            torch.mul(g, self.jac, out=slot)
        else:
            slot.copy_(g)
        filled.append(i)
        if len(filled) == self.chunk or self.pos + len(filled) == len(self.done):
            self._flush()

    def _flush(self) -> None:
        """Norms of the tasks in the chunk buffer, into ``out`` in the order they came."""
        n = len(self.filled)
        if not n:
            return
        delta = self.delta_rows if n == self.chunk else self.delta_rows[:n]
        rows = self.out[self.pos:self.pos + n]
        if self.vectors is not None:  # keep dW_i (and db_i) themselves, as rows i
            flat = self._chunk_vectors(delta)
            torch.linalg.vector_norm(flat, dim=1, dtype=self.norm_dtype, out=rows)
            self.vectors.index_copy_(0, self._index(tuple(self.filled), flat.device),
                                     flat.to(self.vectors.dtype))
        elif self.dw is not None:  # one weight, no wider than the batch: the usual case
            dw = self.dw if n == self.chunk else self.dw[:n]
            torch.matmul(delta.transpose(1, 2), self.x, out=dw)  # dW_i = delta_i^T x
            torch.linalg.vector_norm(dw.view(n, -1), dim=1, dtype=self.norm_dtype, out=rows)
        else:
            rows.copy_(self._chunk_norms(delta))
        self.pos += n
        self.order += self.filled
        for i in self.filled:
            self.done[i] = True
        self.filled.clear()

    def _chunk_vectors(self, delta: Tensor) -> Tensor:
        """[n, P]: dW_i = delta_i^T x and db_i = sum_b delta_i, flattened in ``shared``'s order."""
        x, roles = self.pattern.x, self.pattern.roles  # type: ignore[union-attr]
        n = delta.shape[0]
        parts = [
            torch.matmul(delta.transpose(1, 2), x).reshape(n, -1)
            if roles[id(p)] == "weight" else delta.sum(dim=1)
            for p in self.shared
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _chunk_norms(self, delta: Tensor) -> Tensor:
        """||dW_i||, ||db_i|| (jointly) from delta_i, for any mix of weight and bias."""
        x, roles = self.pattern.x, self.pattern.roles  # type: ignore[union-attr]
        n = delta.shape[0]
        batch, fan_in = x.shape
        parts = []
        for p in self.shared:
            if roles[id(p)] == "weight" and batch < fan_in:
                # ||delta_i^T x||^2 = <delta_i, (x x^T) delta_i>: B^2 out multiply-adds a task
                # instead of B in out, for layers wider than the batch.
                if self.gram is None:
                    self.gram = x @ x.T
                sq = (torch.matmul(self.gram, delta) * delta).sum(dim=(1, 2),
                                                                   dtype=self.norm_dtype)
                parts.append(sq.clamp_(min=0).sqrt_())
            elif roles[id(p)] == "weight":
                dw = torch.matmul(delta.transpose(1, 2), x)  # dW_i = delta_i^T x
                parts.append(torch.linalg.vector_norm(dw.reshape(n, -1), dim=1,
                                                      dtype=self.norm_dtype))
            else:  # db_i = sum over the batch of delta_i
                parts.append(torch.linalg.vector_norm(delta.sum(dim=1), dim=1,
                                                      dtype=self.norm_dtype))
        if len(parts) == 1:
            return parts[0]
        return torch.linalg.vector_norm(torch.stack(parts, dim=1), dim=1)

    def finish(self) -> Tensor:
        """G_i for every task, once the backward has run all the hooks (a new tensor)."""
        if self.native is not None:
            norms = self.native.finish()  # or the tasks not seen
            if isinstance(norms, Tensor):
                return norms
            missing = norms
        else:
            if self.mode == "linear":
                with torch.no_grad():
                    self._flush()
            missing = [i for i, done in enumerate(self.done) if not done]
        if missing:  # the graph walk promised every task a consumer node
            raise RuntimeError(f"no gradient at h was seen for tasks {missing}")
        if self.mode != "linear":
            return self.out.clone()
        norms = self.out  # in fill order
        return norms[self._index(tuple(self.order), norms.device, invert=True)]

    def _index(self, tasks: tuple[int, ...], device: torch.device, invert: bool = False
               ) -> Tensor:
        """``tasks`` as an index tensor on ``device``, or its inverse permutation, made once
        per distinct order: the fill order is usually the same every step, and making it
        anew would copy it from the host every step (a synchronisation on a GPU)."""
        index = self._orders.get((tasks, invert))
        if index is None or index.device != device:
            if len(self._orders) > 32:  # orders that change every step: keep a few
                self._orders.clear()
            index = torch.tensor(tasks, dtype=torch.long)
            if invert:  # inverse[tasks[j]] = j
                index = torch.empty_like(index).index_copy_(0, index, torch.arange(len(tasks)))
            index = index.to(device)
            self._orders[(tasks, invert)] = index
        return index

    def release(self) -> None:
        """After a failed step: drop what ``walk`` found too (it holds the step's graph)."""
        self._walked = None
        self.end()
        if self._native is not None:
            self._native.end()

    def end(self) -> None:
        """Drop this step's references (h, the layer input, gradients) after a step.

        The hooks stay on this step's nodes, which die with the graph; they do nothing once
        the step has ended (removing them one by one cost ~1-2 us a task).
        """
        self.active = False
        if self.native is not None:
            self.native.end()
        self.native = None
        self.h = self.pattern = self.jac = self.gram = None  # type: ignore[assignment]
        self.x = self.relu_out = self.dw = self.vectors = self.grads = None
        self.shared, self.done, self.slots, self.rows, self.grad_rows = [], [], (), (), ()
        self.delta = self.delta_rows = None
        self.mode, self._take = "h", self._take_h
        self.partial.clear()
        self.filled.clear()
        self.order.clear()


def _native_serves(shared: Sequence[Tensor], pattern: LinearPattern | None,
                   vectors: bool) -> bool:
    """Whether the C++ capture serves the mode: norms at h, or at one ``nn.Linear`` weight
    no wider than the batch (one matmul a chunk) when no per-task vectors are kept."""
    if not shared:
        return True
    if pattern is None or vectors or len(shared) != 1:
        return False
    x = pattern.x
    return pattern.roles[id(shared[0])] == "weight" and x.shape[0] >= x.shape[1]


def auto_chunk(num_tasks: int) -> int:
    """Tasks per batched matmul when not chosen: T // 2, between 1 and 4.

    Four tasks a call cut the Python around the matmuls (T=64: 1.36x the plain step against
    1.54x one at a time); fewer keep the kept buffers, chunk x (|h| + |W|), small next to a
    network of few heads (measured on the toy network: see docs/performance.md).
    """
    return max(1, min(4, num_tasks // 2))


def _norm_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _batched_grads(losses: Sequence[Tensor], shared: list[Tensor]
                   ) -> tuple[Tensor | None, ...] | None:
    """dL_i/d(shared) for all tasks from one vmapped ``autograd.grad`` (identity cotangents),
    each [T, *shape]; None when an operator has no batching rule."""
    stacked = torch.stack(list(losses))
    eye = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
    try:
        return torch.autograd.grad(stacked, shared, eye, retain_graph=True, allow_unused=True,
                                   is_grads_batched=True)
    except RuntimeError:
        return None


def per_task_norms(
    losses: Sequence[Tensor], shared: Sequence[Tensor], batched: bool = False,
    scale: Tensor | None = None,
) -> Tensor:
    """Norms ||dL_i/d(shared)|| for each task, over all ``shared`` tensors together.

    One batched ``autograd.grad`` (identity cotangents) with a per-task loop as fallback (or
    when ``batched=False``). The graph is retained for the ordinary backward that follows.
    In the batched product an infinite derivative of one task meets the zero cotangents of
    the others (0 * inf = nan), so a non-finite result is only trusted from the loop.
    With ``scale`` (a gradient scaler's scale) the products run on scale * L_i, as the
    scaled backward does in reduced precision, and the norms are divided by it.
    """
    if scale is not None:
        losses = [loss * scale.to(loss) for loss in losses]
        return per_task_norms(losses, shared, batched) / scale
    shared = list(shared)
    grads = _batched_grads(losses, shared) if batched else None
    if grads is not None:
        return _joint_norms(grads, len(losses), losses[0])
    dtype = _norm_dtype(losses[0])
    return torch.stack([
        _norm_of(torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True), loss,
                 dtype)
        for loss in losses
    ])


def per_task_vectors(
    losses: Sequence[Tensor], shared: Sequence[Tensor], batched: bool = False,
    scale: Tensor | None = None,
) -> Tensor:
    """The per-task gradients dL_i/d(shared) themselves, as rows of a [T, P] tensor.

    Row i is the concatenation of dL_i/dp flattened for each p of ``shared`` in order (P =
    sum of their sizes; zeros where L_i does not reach p), in float32 or wider: what the
    exact combination of norms over micro-batches or processes sums (see
    ``lossbalance._combine``). Batched or looped as :func:`per_task_norms`, with its
    ``scale``.
    """
    if scale is not None:
        losses = [loss * scale.to(loss) for loss in losses]
        return per_task_vectors(losses, shared, batched).div_(scale)
    shared = list(shared)
    dtype = _norm_dtype(losses[0])
    grads = _batched_grads(losses, shared) if batched else None
    if grads is not None:
        return flat_rows(grads, shared, len(losses), dtype)
    return torch.stack([
        flat_rows(torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True),
                  shared, None, dtype)
        for loss in losses
    ])


def flat_rows(grads: Sequence[Tensor | None], shared: Sequence[Tensor], rows: int | None,
              dtype: torch.dtype) -> Tensor:
    """Gradients of ``shared`` (each [rows, *p.shape], or p.shape when ``rows`` is None)
    flattened and concatenated along the last dimension; a missing one is zeros."""
    lead = () if rows is None else (rows,)
    parts = [
        torch.zeros((*lead, p.numel()), dtype=dtype, device=p.device) if g is None
        else g.reshape(*lead, -1).to(dtype)
        for g, p in zip(grads, shared, strict=True)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
