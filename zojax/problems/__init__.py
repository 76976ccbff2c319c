"""Objectives the papers study, each with its closed-form Hessian trace.

- :mod:`zojax.problems.test_function`: h(y, z) = (yᵀz − 1)²/2 (Example 2.1, Figure 1 of
  "ZO finds flat minima").
- :mod:`zojax.problems.linear`: squared-hinge SVM and logistic regression over dense or random
  affine features (Figure 2), with ``LOSSES``, the registry of its losses by name (title, loss,
  closed-form trace). Its functions are re-exported here; ``init_params`` stays
  namespaced (``linear.init_params``, ``test_function.init_params``) since both modules define it.
- :mod:`zojax.problems.two_scales`: a valley of minimizers along which the smallest trace and
  the smallest top eigenvalue sit at different points (the ZEST sharpness analysis).
"""

from zojax.problems import linear, test_function, two_scales
from zojax.problems.linear import (
    LOG_LOSS_EPS,
    LOSSES,
    AffineFeatures,
    Loss,
    accuracy,
    clipped_logistic_loss,
    logistic_hessian_trace,
    logistic_loss,
    random_features,
    squared_row_norms,
    svm_hessian_trace,
    svm_loss,
)

__all__ = [
    "LOG_LOSS_EPS",
    "LOSSES",
    "AffineFeatures",
    "Loss",
    "accuracy",
    "clipped_logistic_loss",
    "linear",
    "logistic_hessian_trace",
    "logistic_loss",
    "random_features",
    "squared_row_norms",
    "svm_hessian_trace",
    "svm_loss",
    "test_function",
    "two_scales",
]
