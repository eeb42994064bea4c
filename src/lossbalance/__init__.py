"""lossbalance: adaptive loss balancing for multi-task PyTorch networks."""

from . import native
from .balancers import (
    DWA,
    FAMO,
    GLS,
    IMTLL,
    MGDA,
    RLW,
    Aggregator,
    Balancer,
    DynamicTaskPrioritization,
    EqualWeighting,
    GradNorm,
    StaticWeighting,
    UncertaintyWeighting,
    UPGrad,
)

__version__ = "0.1.0"

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
    "__version__",
    "native",
]
