"""STRIDE: steering operators fitted on training subsets, then sparse recovery (methods.md §12).

Example::

    from lightning_tda import stride
    stride.fit("runs/tda.h5", model, train_data, stride.StrideConfig(num_subsets=300, degree=10))
    res = AttributionStore("runs/tda.h5").attribute(queries, model=model, method=stride.Stride())
"""

from lightning_tda.stride.design import SubsetDesign
from lightning_tda.stride.fit import (
    StrideConfig,
    StrideFitModule,
    StrideResult,
    fit,
    fitted_steps,
    load,
)
from lightning_tda.stride.method import Stride
from lightning_tda.stride.operator import SteeringOperators, steered_model
from lightning_tda.stride.recover import choose_alpha, recover

__all__ = [
    "SteeringOperators",
    "Stride",
    "StrideConfig",
    "StrideFitModule",
    "StrideResult",
    "SubsetDesign",
    "choose_alpha",
    "fit",
    "fitted_steps",
    "load",
    "recover",
    "steered_model",
]
