"""One balancer a module; see each module's docstring for the paper and formulas."""

from .base import Balancer
from .dtp import DynamicTaskPrioritization
from .gradnorm import GradNorm
from .static import EqualWeighting, StaticWeighting
from .uncertainty import UncertaintyWeighting

__all__ = [
    "Balancer",
    "DynamicTaskPrioritization",
    "EqualWeighting",
    "GradNorm",
    "StaticWeighting",
    "UncertaintyWeighting",
]
