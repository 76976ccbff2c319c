"""zojax: zeroth-order optimization in JAX, and the flatness of the minima it finds."""

from zojax import (
    blocks,
    datasets,
    directions,
    estimators,
    problems,
    transforms,
    variants,
    weightings,
)
from zojax.blocks import partition_blocks
from zojax.curvature import (
    hessian_diagonal,
    hessian_spectrum,
    hessian_square_trace,
    hessian_top_eigenvalue,
    hessian_trace,
    hutchinson_diagonal,
    hutchinson_trace,
    spectral_density,
    zo_trace,
)
from zojax.estimators import (
    forward_grad,
    tilted_grad,
    tilted_value,
    zo_grad,
    zo_value_and_grad,
)
from zojax.transforms import (
    TwoPointState,
    block_two_point,
    estimator_transform,
    forward_gradient,
    natural,
    tilted,
    two_point,
    zest,
    zo_adam,
    zo_sgd,
    zo_sign_sgd,
)
from zojax.variants import fzoo, hizoo, lozo, sparse_two_point, zo_svrg

__version__ = "0.1.0"

__all__ = [
    "TwoPointState",
    "block_two_point",
    "blocks",
    "datasets",
    "directions",
    "estimator_transform",
    "estimators",
    "forward_grad",
    "forward_gradient",
    "fzoo",
    "hessian_diagonal",
    "hessian_spectrum",
    "hessian_square_trace",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "hizoo",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "lozo",
    "natural",
    "partition_blocks",
    "problems",
    "sparse_two_point",
    "spectral_density",
    "transforms",
    "tilted",
    "tilted_grad",
    "tilted_value",
    "two_point",
    "variants",
    "weightings",
    "zest",
    "zo_adam",
    "zo_grad",
    "zo_sgd",
    "zo_sign_sgd",
    "zo_trace",
    "zo_svrg",
    "zo_value_and_grad",
]
