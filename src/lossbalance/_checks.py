"""Input validation shared by every balancer: the one place for each error message.

Every check here runs before a balancer touches any state (weights, L(0), optimizer state,
model ``.grad``), so a caller who catches the error can fix the input and carry on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from . import _graph

LossesLike = Sequence[Tensor] | Tensor | Mapping[str, Tensor]
NONFINITE_MODES = ("raise", "skip")


def check_num_tasks(num_tasks: int) -> int:
    """``num_tasks`` must be an int >= 2 (a single task needs no balancing)."""
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int):
        raise TypeError(f"num_tasks must be an int, got {type(num_tasks).__name__}")
    if num_tasks < 2:
        raise ValueError(f"num_tasks must be >= 2, got {num_tasks}")
    return num_tasks


def check_task_names(task_names: Sequence[str] | None, num_tasks: int) -> tuple[str, ...] | None:
    """Task names, when given, are ``num_tasks`` distinct strings."""
    if task_names is None:
        return None
    names = tuple(task_names)
    if len(names) != num_tasks:
        raise ValueError(f"task_names has {len(names)} names but num_tasks={num_tasks}")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"task names must be str, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"task_names must be distinct, got {list(names)}")
    return names


def check_positive(name: str, value: float) -> float:
    """A hyperparameter that must be a finite number > 0 (learning rates, floors)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


def check_nonnegative(name: str, value: float) -> float:
    """A hyperparameter that must be a finite number >= 0 (GradNorm's alpha, DTP's gamma)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def check_int_at_least(name: str, value: object, minimum: int, *,
                       allow_none: bool = False) -> int | None:
    """A count that must be an int >= ``minimum`` (or None where that means "choose")."""
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        none = "None or " if allow_none else ""
        raise ValueError(f"{name} must be {none}an int >= {minimum}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """A switch that must be True or False (not 0, 1 or None)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_fraction(name: str, value: float) -> float:
    """A number in [0, 1) (exponential-moving-average decays)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def check_on_nonfinite(mode: str) -> str:
    """``on_nonfinite`` is "raise" (the default) or "skip"."""
    if mode not in NONFINITE_MODES:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE_MODES}, got {mode!r}")
    return mode


def task_label(i: int, task_names: tuple[str, ...] | None) -> str:
    """How error messages name task ``i``: ``task 2 ('depth')`` or ``task 2``."""
    return f"task {i} ({task_names[i]!r})" if task_names else f"task {i}"


def loss_list(
    losses: LossesLike, num_tasks: int, task_names: tuple[str, ...] | None
) -> list[Tensor]:
    """Turn ``losses`` (list/tuple of scalars, 1-D tensor of length T, or dict) into T scalars.

    A dict needs the balancer to be built with ``task_names`` and must have exactly those keys;
    the result follows the order of ``task_names``. Every loss must be a floating-point scalar
    tensor that requires grad.
    """
    if isinstance(losses, Mapping):
        if task_names is None:
            raise TypeError("losses is a dict but the balancer was built without task_names=")
        keys = set(losses)
        if keys != set(task_names):
            missing = sorted(set(task_names) - keys)
            extra = sorted(str(k) for k in keys - set(task_names))
            raise ValueError(f"losses has the wrong keys: missing {missing}, unexpected {extra}")
        items = [losses[name] for name in task_names]
    elif isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(
                f"a tensor of losses must be 1-D of length {num_tasks}, got shape "
                f"{tuple(losses.shape)}"
            )
        if losses.shape[0] != num_tasks:
            raise ValueError(f"expected {num_tasks} losses, got {losses.shape[0]}")
        items = list(losses.unbind(0))
    elif isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)):
        items = list(losses)
        if len(items) != num_tasks:
            raise ValueError(f"expected {num_tasks} losses, got {len(items)}")
    else:
        raise TypeError(
            "losses must be a list/tuple of scalar tensors, a 1-D tensor or a dict, got "
            f"{type(losses).__name__}"
        )
    if all(isinstance(loss, Tensor) and loss.dim() == 0 and loss.requires_grad
           and loss.is_floating_point() for loss in items):
        return items  # the usual case, checked in one pass
    for i, loss in enumerate(items):
        who = task_label(i, task_names)
        if not isinstance(loss, Tensor):
            raise TypeError(f"the loss of {who} must be a tensor, got {type(loss).__name__}")
        if loss.numel() != 1 or loss.dim() > 1:
            raise ValueError(
                f"the loss of {who} must be a scalar, got shape {tuple(loss.shape)} "
                "(reduce it with .mean() or .sum())"
            )
        if not loss.is_floating_point():
            raise TypeError(f"the loss of {who} must be floating point, got {loss.dtype}")
        if not loss.requires_grad:
            raise ValueError(
                f"the loss of {who} does not require grad: it is not connected to any parameter"
            )
    return [loss if loss.dim() == 0 else loss.reshape(()) for loss in items]


def shared_tensors(shared: object) -> list[Tensor]:
    """``shared`` as a list of tensors: [] for None (norms at the tapped h), [t] for a tensor,
    the parameters that require grad of an ``nn.Module`` (``shared=model.trunk[-2]``: the
    last shared layer, weight and bias), or the items of an iterable of tensors.
    """
    if shared is None:
        return []
    if isinstance(shared, Tensor):
        return [shared]
    if isinstance(shared, torch.nn.Module):
        items = [p for p in shared.parameters() if p.requires_grad]
        if not items:
            raise ValueError(
                f"shared={type(shared).__name__}(...) has no parameters that require grad"
            )
        return items
    try:
        items = list(shared)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(
            "shared must be a tensor, an nn.Module, a list of tensors or None, got "
            f"{type(shared).__name__}"
        ) from None
    if not items:
        raise ValueError("shared is empty: pass None to measure the norms at the tapped h")
    for k, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise TypeError(f"shared[{k}] must be a tensor, got {type(t).__name__}")
    return items


def check_requires_grad(shared: Sequence[Tensor]) -> None:
    """Every shared tensor must require grad (else it is outside the graph)."""
    for k, t in enumerate(shared):
        if not t.requires_grad:
            raise ValueError(f"shared[{k}] does not require grad, so it is outside the graph")


def tap_graph_error(problem: tuple, task_names: tuple[str, ...] | None) -> ValueError:
    """The error for what ``_graph.consumers_of`` found wrong with a tapped h: a loss that
    reaches the shared tensors around h ("bypass"), a loss that does not read h
    ("unreached"), or two tasks sharing an operation on h ("shared")."""
    if problem[0] == "bypass":
        _, i, k = problem
        return ValueError(
            f"the loss of {task_label(i, task_names)} reaches shared[{k}] "
            "by a path that does not go through the tapped h (a skip connection "
            "around h?), so its gradient there cannot be read at h: tap a tensor "
            "that every path from the heads to shared goes through, or call "
            "backward without a tap"
        )
    if problem[0] == "unreached":
        return ValueError(
            f"the loss of {task_label(problem[1], task_names)} does not "
            "reach the tapped representation h (did its head consume bal.tap(h) of "
            "this step?)"
        )
    _, i, j = problem
    return ValueError(
        f"{task_label(i, task_names)} and "
        f"{task_label(j, task_names)} share an operation on the tapped h, "
        "so their gradients at h cannot be told apart: tap the tensor their heads "
        "branch from, or pass shared= parameters without a tap"
    )


def check_losses_reach(losses: Sequence[Tensor], edges: list,
                       task_names: tuple[str, ...] | None) -> None:
    """ValueError unless every loss reaches a shared tensor (``edges``, from
    ``_graph.edges_of``) and every shared tensor is reached by some loss."""
    found: set[int] = set()
    for i, loss in enumerate(losses):
        reached = _graph.reached_edges(loss, edges)
        if not reached:
            raise ValueError(
                f"the loss of {task_label(i, task_names)} does not reach any "
                "of the shared tensors"
            )
        found |= reached
    if len(found) != len(edges):
        k = min(set(range(len(edges))) - found)
        raise ValueError(f"shared[{k}] is outside the graph of any loss")


def check_grad_scaler(scaler: object) -> object | None:
    """A ``torch.amp.GradScaler`` (anything with ``scale`` and ``is_enabled``) or None.

    A disabled scaler is the same as none.
    """
    if scaler is None:
        return None
    if not (callable(getattr(scaler, "scale", None))
            and callable(getattr(scaler, "is_enabled", None))):
        raise TypeError(
            f"grad_scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}"
        )
    return scaler if scaler.is_enabled() else None  # type: ignore[attr-defined]


def first_nonfinite(values: Tensor) -> int | None:
    """Index of the first non-finite entry of a 1-D tensor, or None (one host sync).

    The T values come to the host as Python floats in one copy (``tolist``, no tensor
    operation: in a training loop two tensor operations cost ~10 us more).
    """
    for i, value in enumerate(values.tolist()):
        if not math.isfinite(value):
            return i
    return None


def check_initial_losses(
    values: Tensor, task_names: tuple[str, ...] | None, what: str = "L_i(0)"
) -> None:
    """Loss ratios L_i(t)/L_i(0) need every L_i(0) finite and > 0."""
    ok = torch.isfinite(values) & (values > 0)
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0, 0])
        raise ValueError(
            f"{what} of {task_label(i, task_names)} is {float(values[i])}: loss ratios "
            "L_i(t)/L_i(0) need a finite initial loss > 0 (use alpha=0, or pass "
            "initial_losses=)"
        )


def check_kpis(kpis: object, num_tasks: int, task_names: tuple[str, ...] | None) -> Tensor:
    """KPIs (e.g. accuracies) are T finite numbers in [0, 1]; returns them as a float tensor."""
    if kpis is None:
        raise ValueError(
            "DynamicTaskPrioritization.backward needs kpis= (one value in [0, 1] per task)"
        )
    if isinstance(kpis, Mapping):
        if task_names is None:
            raise TypeError("kpis is a dict but the balancer was built without task_names=")
        if set(kpis) != set(task_names):
            raise ValueError(f"kpis has keys {sorted(map(str, kpis))}, expected {list(task_names)}")
        kpis = [kpis[name] for name in task_names]
    if isinstance(kpis, Tensor):
        values = kpis.detach().reshape(-1).to(torch.float32)
    else:
        try:
            values = torch.stack(
                [k.detach().reshape(()).float() if isinstance(k, Tensor) else torch.tensor(float(k))
                 for k in kpis]  # type: ignore[union-attr]
            )
        except (TypeError, ValueError) as exc:
            raise TypeError(f"kpis must be numbers or tensors, got {kpis!r}") from exc
    if values.numel() != num_tasks:
        raise ValueError(f"expected {num_tasks} kpis, got {values.numel()}")
    ok = torch.isfinite(values) & (values >= 0) & (values <= 1)
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0, 0])
        raise ValueError(
            f"the kpi of {task_label(i, task_names)} is {float(values[i])}, outside [0, 1]"
        )
    return values
