"""Reachability in the autograd graph: does a task's loss depend on the shared tensors?

Checked before any backward runs, so that "task 2 does not reach the shared layer" is an error
raised with the model's ``.grad`` and the balancer's state untouched. The walk follows
``grad_fn.next_functions`` edges (node, output index) and stops at the first target it meets.

The Python objects that stand for autograd nodes are made on demand and may be freed (and
their ``id`` reused) once nothing refers to them, so every walk keeps the nodes it has seen,
and every target edge keeps its node, alive until it is done.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge


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


def reaches_output(root: Tensor, node: object, output_nr: int) -> bool:
    """Whether gradients from ``root`` flow into output ``output_nr`` of autograd ``node``.

    The fast-path check (one per task and step), so it is kept tight: ``node`` itself is not
    expanded, and leaves (no next functions) end a branch.
    """
    start = root.grad_fn
    if start is None:
        return False
    seen = {id(start): start}
    stack = [start]
    pop, push = stack.pop, stack.append
    while stack:
        for nxt, nr in pop().next_functions:
            if nxt is node:
                if nr == output_nr:
                    return True
                continue
            if nxt is None or id(nxt) in seen:
                continue
            seen[id(nxt)] = nxt
            push(nxt)
    return False


def reached_edges(root: Tensor, targets: Sequence[GradientEdge], *, first: bool = False
                  ) -> set[int]:
    """Indices of the ``targets`` reachable from ``root`` (all of them, or the first found)."""
    wanted: dict[tuple[int, int], list[int]] = {}
    for k, edge in enumerate(targets):
        wanted.setdefault(_key(edge), []).append(k)
    found: set[int] = set()
    start = root.grad_fn
    if start is None:
        return found
    seen = {id(start): start}
    stack = [start]
    while stack and len(found) < len(targets):
        for nxt, nr in stack.pop().next_functions:
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
