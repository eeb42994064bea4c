"""One balancer a module; see each module's docstring for the paper and formulas."""

from .base import Balancer
from .dtp import DynamicTaskPrioritization
from .dwa import DWA
from .famo import FAMO
from .gls import GLS
from .gradnorm import GradNorm
from .imtl_l import IMTLL
from .rlw import RLW
from .static import EqualWeighting, StaticWeighting
from .uncertainty import UncertaintyWeighting

__all__ = [
    "DWA",
    "FAMO",
    "GLS",
    "IMTLL",
    "RLW",
    "Balancer",
    "DynamicTaskPrioritization",
    "EqualWeighting",
    "GradNorm",
    "StaticWeighting",
    "UncertaintyWeighting",
]
