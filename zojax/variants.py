"""Moved: FZOO, Sparse-MeZO, HiZOO, LOZO and ZO-SVRG live in :mod:`zojax.methods`, one file each.
This module re-exports their public names for this release."""

from zojax.methods.fzoo import FzooState, fzoo, fzoo_weighting
from zojax.methods.hizoo import HizooState, hizoo, hizoo_perturbation, hizoo_weighting
from zojax.methods.lozo import LozoState, lozo, lozo_perturbation
from zojax.methods.sparse_mezo import (
    sparse_masks,
    sparse_perturbation,
    sparse_thresholds,
    sparse_two_point,
)
from zojax.methods.zo_svrg import SvrgState, zo_svrg

__all__ = [
    "FzooState", "HizooState", "LozoState", "SvrgState", "fzoo", "fzoo_weighting", "hizoo",
    "hizoo_perturbation", "hizoo_weighting", "lozo", "lozo_perturbation", "sparse_masks",
    "sparse_perturbation", "sparse_thresholds", "sparse_two_point", "zo_svrg",
]
