"""lossbalance: adaptive loss balancing for multi-task PyTorch networks."""

from . import native
from .balancers import (
    DBMTL,
    DWA,
    FAMO,
    GLS,
    IMTLG,
    IMTLL,
    MGDA,
    RLW,
    Aggregator,
    AlignedMTL,
    Balancer,
    CAGrad,
    DynamicTaskPrioritization,
    EqualWeighting,
    GradNorm,
    NashMTL,
    PCGrad,
    StaticWeighting,
    UncertaintyWeighting,
    UPGrad,
)

__version__ = "0.1.0"

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
    "__version__",
    "native",
]
