"""One balancer a module; see each module's docstring for the paper and formulas."""

from .aggregator import Aggregator
from .aligned_mtl import AlignedMTL
from .base import Balancer
from .cagrad import CAGrad
from .db_mtl import DBMTL
from .dtp import DynamicTaskPrioritization
from .dwa import DWA
from .famo import FAMO
from .gls import GLS
from .gradnorm import GradNorm
from .imtl_g import IMTLG
from .imtl_l import IMTLL
from .mgda import MGDA
from .nash_mtl import NashMTL
from .pcgrad import PCGrad
from .rlw import RLW
from .static import EqualWeighting, StaticWeighting
from .uncertainty import UncertaintyWeighting
from .upgrad import UPGrad

__all__ = [
    "DBMTL",
    "DWA",
    "FAMO",
    "GLS",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "RLW",
    "Aggregator",
    "AlignedMTL",
    "Balancer",
    "CAGrad",
    "DynamicTaskPrioritization",
    "EqualWeighting",
    "GradNorm",
    "NashMTL",
    "PCGrad",
    "StaticWeighting",
    "UPGrad",
    "UncertaintyWeighting",
]
