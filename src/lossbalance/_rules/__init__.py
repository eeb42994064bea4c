"""The update stage's rules of the gradient-aggregation methods: Gram matrix -> coefficients.

Each function maps the tasks' Gram matrix G_ij = <g_i, g_j> ([T, T]) to coefficients c ([T])
such that the method's update direction is d = sum_i c_i g_i (issue 15). They are pure: no
state, no autograd; the balancers in ``lossbalance.balancers`` measure G and apply c.
MGDA, UPGrad and CAGrad need the ``solvers`` extra (``pip install "lossbalance[solvers]"``).
"""

from .aligned_mtl import aligned_mtl_weights
from .cagrad import cagrad_weights
from .imtl_g import imtl_g_weights
from .mgda import mgda_weights
from .nash_mtl import nash_mtl_weights
from .pcgrad import pcgrad_weights
from .upgrad import upgrad_weights

__all__ = [
    "aligned_mtl_weights",
    "cagrad_weights",
    "imtl_g_weights",
    "mgda_weights",
    "nash_mtl_weights",
    "pcgrad_weights",
    "upgrad_weights",
]
