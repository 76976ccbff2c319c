"""One file per method: its formula, its stage(s), its pure estimator and its optax transform.

A new method is one new file here (a perturbation or a weighting passed to
:func:`zojax.pipeline.partial_estimate`, and a transform built by
:func:`zojax.transform.estimator_transform`) plus one line in the test registry.
"""

from zojax.methods.block_two_point import block_perturbation, block_two_point
from zojax.methods.fzoo import fzoo
from zojax.methods.hizoo import hizoo
from zojax.methods.lozo import lozo
from zojax.methods.natural import natural, natural_perturbation
from zojax.methods.sparse_mezo import sparse_two_point
from zojax.methods.tilted import tilted, tilted_grad, tilted_value
from zojax.methods.two_point import (
    forward_grad,
    forward_gradient,
    two_point,
    zo_grad,
    zo_value_and_grad,
)
from zojax.methods.zo_svrg import zo_svrg

__all__ = [
    "block_perturbation", "block_two_point", "forward_grad", "forward_gradient", "fzoo", "hizoo",
    "lozo", "natural", "natural_perturbation", "sparse_two_point", "tilted", "tilted_grad",
    "tilted_value", "two_point", "zo_grad", "zo_svrg", "zo_value_and_grad",
]
