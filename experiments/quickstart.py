"""Quickstart: zeroth-order vs gradient descent on h(y, z) = (yᵀz − 1)²/2, with zojax + optax.

    python -m experiments.quickstart

Both reach a minimizer (yᵀz = 1), but ZO-SGD also minimizes (λ²/2) tr ∇²h and keeps moving
toward flatter ones: its Hessian trace falls while GD's stays where it landed.
"""

import jax
import optax

import zojax
from zojax.problems import test_function


def make_train(optimizer, num_steps: int, *, use_gradient: bool):
    """A jitted ``train(params, state) -> (params, state)`` running ``num_steps`` steps."""

    def step(carry, _):
        params, state = carry
        # First-order methods get the gradient; ZO transforms only evaluate value_fn.
        grads = jax.grad(test_function.loss)(params) if use_gradient else None
        updates, state = optimizer.update(grads, state, params, value_fn=test_function.loss)
        return (optax.apply_updates(params, updates), state), None

    @jax.jit
    def train(params, state):
        return jax.lax.scan(step, (params, state), length=num_steps)[0]

    return train


def main(num_steps: int = 100_000, print_every: int = 10_000) -> dict:
    """Trains GD and ZO side by side, printing loss and trace; returns the final params."""
    params = test_function.init_params(jax.random.key(11), dim=100, scale=0.88)
    # philox4x32 draws small per-step directions several times faster than the default PRNG.
    directions_key = jax.random.key(0, impl="philox4x32")
    optimizers = {
        "GD": (optax.sgd(learning_rate=0.01), True),
        "ZO": (zojax.zo_sgd(learning_rate=0.001, smoothing=0.1, seed=directions_key), False),
    }
    runs = {name: (make_train(opt, print_every, use_gradient=grad), (params, opt.init(params)))
            for name, (opt, grad) in optimizers.items()}

    print(f"{'step':>7} " + " ".join(f"{name + ' loss':>10} {name + ' trace':>9}" for name in runs))
    for step in range(0, num_steps + 1, print_every):
        if step:
            runs = {name: (train, train(*carry)) for name, (train, carry) in runs.items()}
        cells = [f"{test_function.loss(p):10.2e} {test_function.hessian_trace(p):9.1f}"
                 for _, (p, _) in runs.values()]
        print(f"{step:>7} " + " ".join(cells))
    return {name: carry[0] for name, (_, carry) in runs.items()}


if __name__ == "__main__":
    main()
