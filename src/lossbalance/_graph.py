"""Reachability in the autograd graph: does a task's loss depend on the shared tensors?

Checked before any backward runs, so that "task 2 does not reach the shared layer" is an error
raised with the model's ``.grad`` and the balancer's state untouched. The walks follow
``grad_fn.next_functions`` edges (node, output index); ``consumers_of`` also finds, for the
fast path, the nodes of each head that read the tapped h.

The Python objects that stand for autograd nodes are made on demand and may be freed (and
their ``id`` reused) once nothing refers to them, so every walk keeps the nodes it has seen,
and every target edge keeps its node, alive until it is done.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

# The class of the nodes that accumulate into a leaf's .grad (they have no inputs).
_AccumulateGrad = type(get_gradient_edge(torch.zeros((), requires_grad=True)).node)


def edge_of(tensor: Tensor) -> GradientEdge | None:
    """The edge (node, output index) through which gradients reach ``tensor``, or None."""
    if not tensor.requires_grad:
        return None
    return get_gradient_edge(tensor)


def edges_of(tensors: Iterable[Tensor]) -> list[GradientEdge | None]:
    """:func:`edge_of` for each tensor."""
    return [edge_of(t) for t in tensors]


def _key(edge: GradientEdge) -> tuple[int, int]:
    return (id(edge.node), edge.output_nr)


def _start_node(loss: Tensor) -> object | None:
    """Where gradients from ``loss`` enter the graph.

    A loss taken out of a stacked tensor (``torch.stack(losses)[i]`` or its ``unbind``) starts
    at the i-th input of the stack, not at the stack that all tasks share.
    """
    node = loss.grad_fn
    if node is None or type(node).__name__ not in ("UnbindBackward0", "SelectBackward0"):
        return node
    # autograd exposes a node's saved arguments as _saved_* attributes
    if node._saved_dim != 0:  # type: ignore[attr-defined]
        return node
    unbind = type(node).__name__ == "UnbindBackward0"
    index = loss.output_nr if unbind else node._saved_index  # type: ignore[attr-defined]
    src = node.next_functions[0][0]
    if src is None or type(src).__name__ != "StackBackward0":
        return node
    if src._saved_dim != 0:  # type: ignore[attr-defined]
        return node
    if not isinstance(index, int) or not 0 <= index < len(src.next_functions):
        return node
    return src.next_functions[index][0]


def consumers_of(losses: Sequence[Tensor], h: Tensor,
                 shared: Sequence[GradientEdge] = ()
                 ) -> tuple[list[list[tuple[object, int]]], tuple | None]:
    """For each loss, the autograd nodes that take h as an input, with the input's index.

    A post-hook on such a node sees that task's gradient at h as soon as it is formed, before
    autograd adds it to the other tasks'. Returns (consumers, problem): ``problem`` is None,
    ``("unreached", i)`` when loss i does not depend on h, or ``("shared", i, j)`` when a node
    that reads h serves losses i and j both (their gradients at h are not separable there), or
    ``("bypass", i, k)`` when loss i reaches the edge ``shared[k]`` by a path that does not go
    through h (then its gradient there cannot be read at h). A node upstream of h's readers
    that two losses share is found through them: the reader it leads to is then reached, and
    listed, from both losses.

    Leaves (``AccumulateGrad``, the parameters' gradient sinks) have no inputs and are not
    expanded; otherwise every node that loss i reaches above h is visited once for it.
    """
    edge = get_gradient_edge(h)
    h_node, h_nr = edge.node, edge.output_nr
    consumers: list[list[tuple[object, int]]] = []
    owner: dict[int, int] = {}  # id(reader of h) -> the first task that reached it
    avoid = {_key(edge): k for k, edge in enumerate(shared)}
    for i, loss in enumerate(losses):
        found: list[tuple[object, int]] = []
        start = _start_node(loss)
        if start is None:
            return consumers, ("unreached", i)
        seen = {id(start): start}  # id -> node: keeps the wrappers (and so their ids) alive
        stack = [start]
        bypass = None
        while stack:
            node = stack.pop()
            for k, (nxt, nr) in enumerate(node.next_functions):
                if nxt is h_node:
                    if nr == h_nr:
                        found.append((node, k))
                elif nxt is not None:
                    if avoid and bypass is None and (id(nxt), nr) in avoid:
                        bypass = ("bypass", i, avoid[(id(nxt), nr)])
                    if type(nxt) is not _AccumulateGrad and id(nxt) not in seen:
                        seen[id(nxt)] = nxt
                        stack.append(nxt)
        if not found:
            return consumers, ("unreached", i)
        if bypass is not None:
            return consumers, bypass
        for node, _ in found:
            j = owner.setdefault(id(node), i)
            if j != i:
                return consumers, ("shared", j, i)
        consumers.append(found)
    return consumers, None


def reached_edges(root: Tensor, targets: Sequence[GradientEdge], *, first: bool = False
                  ) -> set[int]:
    """Indices of the ``targets`` reachable from ``root`` (all of them, or the first found)."""
    return reached_from(root.grad_fn, targets, first=first)


def reached_from(start: object | None, targets: Sequence[GradientEdge], *, first: bool = False
                 ) -> set[int]:
    """Indices of the ``targets`` reachable from the autograd node ``start``."""
    wanted: dict[tuple[int, int], list[int]] = {}
    for k, edge in enumerate(targets):
        wanted.setdefault(_key(edge), []).append(k)
    found: set[int] = set()
    if start is None:
        return found
    seen = {id(start): start}
    stack = [start]
    while stack and len(found) < len(targets):
        for nxt, nr in stack.pop().next_functions:  # type: ignore[attr-defined]
            if nxt is None:
                continue
            hit = wanted.get((id(nxt), nr))
            if hit is not None:
                found.update(hit)
                if first:
                    return found
            if id(nxt) not in seen:
                seen[id(nxt)] = nxt
                stack.append(nxt)
    return found
