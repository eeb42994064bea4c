"""Nash-MTL: Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task
Learning as a Bargaining Game", ICML 2022 (Eq. 2, Algorithm 1).

The update d = sum_i alpha_i g_i is the Nash bargaining solution: alpha > 0 with

    G alpha = 1 / alpha   (element-wise; alpha_i <g_i, d> = 1 for every task),

found from the Gram matrix (``lossbalance._rules.nash_mtl_weights``: Newton's method on the
convex 1/2 alpha^T G alpha - sum_i log alpha_i, started from the previous step's alpha, as
the official code warm-starts its solver). d is not proportional to the gradients' scale
(alpha scales with 1/||g||): the gradient scaler's scale is divided out of G before the rule.
As the official code clips the combined gradient's norm to ``max_norm``, alpha is scaled down
when ||d|| exceeds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _checks
from .._rules import nash_mtl_weights
from .._rules.nash_mtl import NoSolution, clip_norm
from .aggregator import Aggregator, Commit


class NashMTL(Aggregator):
    """Multi-task learning as a bargaining game (Nash-MTL).

    Args:
        num_tasks: T >= 2.
        max_norm: the norm ||d|| is clipped to (1.0: the official code's default; 0 turns
            it off).
        optim_niter: at most this many Newton steps a step (20: the official code's bound on
            its sequence of convex problems).
        **kwargs: ``task_names``, ``on_nonfinite``, ``distributed``, ``accumulation_steps``,
            ``general_path``, ``caller_divides``: see ``Aggregator``.

    The last alpha is kept (the ``previous`` warm start, in ``state_dict``); ``weights``:
    the last alpha. When G alpha = 1/alpha has no positive solution (a task's gradient is 0,
    or 0 lies in the cone of the gradients) the step uses the previous alpha (ones before
    the first), its norm clipped, as the official code does when its solver fails. The
    official code's ``update_weights_every`` (1 by default) is not an option: alpha is solved
    every step.
    """

    def __init__(self, num_tasks: int, *, max_norm: float = 1.0, optim_niter: int = 20,
                 task_names: Sequence[str] | None = None, **kwargs: Any) -> None:
        if (not isinstance(max_norm, (int, float)) or isinstance(max_norm, bool)
                or not math.isfinite(max_norm) or max_norm < 0):
            raise ValueError(f"NashMTL: max_norm must be a finite number >= 0, got {max_norm!r}")
        _checks.check_int_at_least("optim_niter", optim_niter, 1)
        super().__init__(num_tasks, task_names=task_names, **kwargs)
        self.max_norm, self.optim_niter = float(max_norm), optim_niter
        self.register_buffer("previous", torch.full((num_tasks,), float("nan")))

    def _prepare(self, gram: Tensor, values: Tensor) -> tuple[Tensor, Commit]:
        previous = self.previous if bool(torch.isfinite(self.previous).all()) else None
        try:
            alpha = nash_mtl_weights(gram, previous=previous, max_norm=self.max_norm,
                                     optim_niter=self.optim_niter)
        except NoSolution:
            # as the official code when its solver fails: the previous alpha (ones at first),
            # its combined gradient clipped to max_norm; the warm start stays
            kept = previous if previous is not None else torch.ones_like(self.previous)
            G = gram.detach().to("cpu", torch.float64).numpy()
            a = clip_norm(kept.detach().to("cpu", torch.float64).numpy(), G, self.max_norm)
            return torch.as_tensor(a).to(gram), None
        return alpha, lambda: self.previous.copy_(alpha.detach())

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, max_norm={self.max_norm}, "
                f"optim_niter={self.optim_niter}")
