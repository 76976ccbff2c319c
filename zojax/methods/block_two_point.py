r"""ZO-I and ZO-coordinate on the blocks of :func:`zojax.partition_blocks`: the baselines of
ZO-NP (:mod:`zojax.methods.natural`), one sampled block per step."""

import jax
import optax
from jax.sharding import NamedSharding

from zojax import _checks, directions, pipeline
from zojax.blocks import block_index, block_normal, coordinate_block, embed, layout, to_tree
from zojax.directions import Perturbation
from zojax.methods.two_point import two_point_estimate
from zojax.transform import estimator_transform

BLOCK_DIRECTIONS = ("gaussian", "coordinate")


def block_perturbation(max_block_size: int, direction: str = "gaussian", *,
                       block_coordinate: bool = True) -> Perturbation:
    r"""ZO-I (``"gaussian"``, :math:`r \sim N(0, I)`) or ZO-co (``"coordinate"``,
    :math:`\sqrt{N_b}\,e_j`, :math:`j` uniform in the block) on the blocks of
    :func:`partition_blocks`.

    With ``block_coordinate`` one block per step (drawn in ``prepare``) is perturbed, so
    :math:`\mathbb{E}[u u^\top \mid b] = I_b` and :math:`\mathbb{E}[u u^\top] = I / B`; without,
    every block at once: :math:`N(0, I_d)`, or :math:`\sqrt{d}\,e_i` with :math:`i` uniform over
    all coordinates (:func:`zojax.directions.coordinate`).
    """
    _checks.check_positive_int("max_block_size", max_block_size)
    _checks.check_choice("direction", direction, BLOCK_DIRECTIONS)
    _checks.check_bool("block_coordinate", block_coordinate)

    def init(params):
        del params
        return ()

    def prepare(key, params, state):
        del state
        return block_index(key, layout(params, max_block_size)) if block_coordinate else ()

    def sample(key, params, state, context):
        del state
        lay = layout(params, max_block_size)
        if block_coordinate:
            if direction == "gaussian":
                block = block_normal(key, params, (lay.size,))
            else:
                block = coordinate_block(key, context, params, lay)
            return embed(block, context, params, lay)
        if direction == "coordinate":
            return directions.coordinate(key, params)
        flat = block_normal(key, params, (lay.num_blocks * lay.size,))
        return to_tree(flat[:lay.dim], params)

    def update(state, key, params, values, **extra_args):
        del key, params, values, extra_args
        return state

    def cov_matvec(state, v):
        del state
        if not block_coordinate:
            return v
        num_blocks = layout(v, max_block_size).num_blocks
        return jax.tree.map(lambda x: x / num_blocks, v)

    return Perturbation(init, prepare, sample, update, cov_matvec)


def block_two_point(smoothing, num_directions: int = 1, *, max_block_size: int,
                    direction: str = "gaussian", block_coordinate: bool = True,
                    seed=0, directions_sharding: NamedSharding | None = None
                    ) -> optax.GradientTransformationExtraArgs:
    r"""ZO-I (``"gaussian"``) and ZO-coordinate (``"coordinate"``) on the blocks of
    :func:`zojax.partition_blocks`: the baselines of :func:`natural`, with the same blocks,
    block sampling and one-sided differences from one shared :math:`f(x)` per step.

    .. math:: \hat g = \frac1q\sum_i \frac{f(x + \lambda u_i) - f(x)}{\lambda}\,u_i

    with :math:`u_i \sim N(0, I)` on the step's block (:math:`\sqrt{N_b}\,e_j` for
    ``"coordinate"``), zero elsewhere (:func:`zojax.blocks.block_perturbation`). Same
    :class:`TwoPointState`, ``value_fn`` contract and non-finite policy as :func:`two_point`;
    ``q + 1`` queries per step.

    Args:
        smoothing: :math:`\lambda > 0`; numeric, may be injected/vmapped.
        num_directions: ``q`` (static).
        max_block_size: :math:`N` (static).
        direction: ``"gaussian"`` or ``"coordinate"`` (static).
        block_coordinate: perturb one uniformly sampled block per step (else all at once).
        seed: int seed or typed PRNG key.
        directions_sharding: split the directions over a mesh axis, as in :func:`two_point`.

    Example:
        >>> import jax.numpy as jnp
        >>> opt = block_two_point(0.01, 4, max_block_size=2)
        >>> g, state = opt.update(None, opt.init(jnp.ones(5)), jnp.ones(5),
        ...                       value_fn=lambda p: jnp.sum(p ** 2))
        >>> int(state.num_queries), int(jnp.sum(g != 0)) <= 2
        (5, True)
    """
    pipeline.validate(smoothing, num_directions, directions_sharding=directions_sharding)
    perturbation = block_perturbation(max_block_size, direction,
                                      block_coordinate=block_coordinate)

    def estimate(key, value_fn, params, perturbation_state, **extra_args):
        return two_point_estimate(
            value_fn, key, params, smoothing=smoothing, num_directions=num_directions,
            direction=perturbation, scheme="forward", perturbation_state=perturbation_state,
            directions_sharding=directions_sharding, **extra_args)

    return estimator_transform(estimate, seed, init_perturbation=perturbation.init,
                               name="block_two_point")
