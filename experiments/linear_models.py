r"""Figure 2: GD vs ZO on squared-hinge SVMs and logistic regression over random features.

The paper's random features (D = 10,001) as :class:`zojax.problems.AffineFeatures`; one seed fixes
the projection, w0 ~ N(0, 0.1² I) and the ZO directions. Every ``eval_every`` steps: train and
test loss, accuracy and closed-form trace (the train trace cross-checked against
``zojax.hessian_trace`` at the first and last evaluation). The default config uses a7a for a5a.
``python -m experiments.linear_models --config configs/linear_models.py --workdir /tmp/fig2``.
The experiment is defined in :mod:`experiments.linear_tasks`.
"""

from experiments.linear_tasks import (  # noqa: F401 (the experiment's names, re-exported)
    LOGISTIC_LOSSES,
    LOSS_NAMES,
    LOSSES,
    METHOD_NAMES,
    METRICS,
    NAME,
    OBJECTIVES,
    ROWS,
    SYNTHETIC,
    DataNotFoundError,
    Loss,
    get_experiment,
    label,
    linear,
    load_dataset,
    plot,
    problem_data,
    registry_name,
    summary,
    train_and_evaluate,
)

if __name__ == "__main__":
    from experiments.runner import cli

    cli.main(train_and_evaluate)
