"""Moved: the pure estimators live in :mod:`zojax.methods` (one file per method), the shared loop
in :mod:`zojax.pipeline` and the objective in :mod:`zojax.objective`. This module re-exports
their public names for this release."""

from zojax._sharding import check_directions_sharding, directions_axes
from zojax.methods.tilted import TILTED_DIRECTIONS, tilted_estimate, tilted_grad, tilted_value
from zojax.methods.two_point import (
    forward_grad,
    forward_grad_estimate,
    two_point_estimate,
    zo_grad,
    zo_value_and_grad,
)
from zojax.objective import Objective, as_objective, bind
from zojax.pipeline import SCHEMES, Estimate, PartialEstimate, combine, finalize, partial_estimate
from zojax.weightings import tilted as tilted_weighting

__all__ = [
    "SCHEMES", "TILTED_DIRECTIONS", "Estimate", "Objective", "PartialEstimate", "as_objective",
    "bind", "check_directions_sharding", "combine", "directions_axes", "finalize",
    "forward_grad", "forward_grad_estimate", "partial_estimate", "tilted_estimate",
    "tilted_grad", "tilted_value", "tilted_weighting", "two_point_estimate", "zo_grad",
    "zo_value_and_grad",
]
