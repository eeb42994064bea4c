"""One balancer a module; see each module's docstring for the paper and formulas."""

from .aggregator import Aggregator
from .base import Balancer
from .dtp import DynamicTaskPrioritization
from .dwa import DWA
from .famo import FAMO
from .gls import GLS
from .gradnorm import GradNorm
from .imtl_l import IMTLL
from .mgda import MGDA
from .rlw import RLW
from .static import EqualWeighting, StaticWeighting
from .uncertainty import UncertaintyWeighting
from .upgrad import UPGrad

__all__ = [
    "DWA",
    "FAMO",
    "GLS",
    "IMTLL",
    "MGDA",
    "RLW",
    "Aggregator",
    "Balancer",
    "DynamicTaskPrioritization",
    "EqualWeighting",
    "GradNorm",
    "StaticWeighting",
    "UPGrad",
    "UncertaintyWeighting",
]
