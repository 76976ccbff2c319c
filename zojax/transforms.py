"""Moved: the transforms live in :mod:`zojax.methods` (one file per method), their builder in
:mod:`zojax.transform` and the aliases in :mod:`zojax.alias`. This module re-exports their
public names for this release."""

from zojax.alias import chain, zest, zo_adam, zo_sgd, zo_sign_sgd
from zojax.methods.block_two_point import block_two_point
from zojax.methods.natural import natural
from zojax.methods.tilted import tilted
from zojax.methods.two_point import forward_gradient, two_point
from zojax.transform import EstimatorState, TwoPointState, estimator_transform

__all__ = [
    "EstimatorState", "TwoPointState", "block_two_point", "chain", "estimator_transform",
    "forward_gradient", "natural", "tilted", "two_point", "zest", "zo_adam", "zo_sgd",
    "zo_sign_sgd",
]
