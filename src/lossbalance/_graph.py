"""Reachability in the autograd graph: does a task's loss depend on the shared tensors?

Checked before any backward runs, so that "task 2 does not reach the shared layer" is an error
raised with the model's ``.grad`` and the balancer's state untouched. The walk follows
``grad_fn.next_functions`` edges (node, output index) and stops at the first target it meets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor
from torch.autograd.graph import get_gradient_edge

Edge = tuple[int, int]


def edge_of(tensor: Tensor) -> Edge | None:
    """The (node id, output index) through which gradients reach ``tensor``, or None."""
    if not tensor.requires_grad:
        return None
    edge = get_gradient_edge(tensor)
    return (id(edge.node), edge.output_nr)


def edges_of(tensors: Iterable[Tensor]) -> list[Edge | None]:
    """:func:`edge_of` for each tensor."""
    return [edge_of(t) for t in tensors]


def reaches(root: Tensor, targets: set[Edge]) -> Edge | None:
    """The first target edge met walking back from ``root``'s grad_fn, or None if none is.

    Target nodes are not expanded further: the walk only needs to know that one is reached.
    """
    start = root.grad_fn
    if start is None or not targets:
        return None
    target_nodes = {node for node, _ in targets}
    seen = {id(start)}
    stack = [start]
    while stack:
        node = stack.pop()
        for nxt, nr in node.next_functions:
            if nxt is None:
                continue
            key = id(nxt)
            if (key, nr) in targets:
                return (key, nr)
            if key in seen or key in target_nodes:
                continue
            seen.add(key)
            stack.append(nxt)
    return None


def reaches_output(root: Tensor, node: object, output_nr: int) -> bool:
    """Whether gradients from ``root`` flow into output ``output_nr`` of autograd ``node``.

    The fast-path check (one per task and step), so it is kept tight: ``node`` itself is not
    expanded, and leaves (no next functions) end a branch.
    """
    start = root.grad_fn
    if start is None:
        return False
    seen = {id(start)}
    stack = [start]
    pop, push, add = stack.pop, stack.append, seen.add
    while stack:
        for nxt, nr in pop().next_functions:
            if nxt is node:
                if nr == output_nr:
                    return True
                continue
            if nxt is None or id(nxt) in seen:
                continue
            add(id(nxt))
            push(nxt)
    return False


def reached_targets(root: Tensor, targets: Sequence[Edge]) -> set[Edge]:
    """Every target edge reachable from ``root`` (a full walk; used for diagnosis only)."""
    wanted = set(targets)
    found: set[Edge] = set()
    start = root.grad_fn
    if start is None:
        return found
    seen = {id(start)}
    stack = [start]
    while stack and found != wanted:
        node = stack.pop()
        for nxt, nr in node.next_functions:
            if nxt is None:
                continue
            key = id(nxt)
            if (key, nr) in wanted:
                found.add((key, nr))
            if key not in seen:
                seen.add(key)
                stack.append(nxt)
    return found
