"""Orbax checkpoints of the runner: array state (typed PRNG keys as key data) plus JSON progress.

orbax is imported on first use, so commands that never checkpoint do not pay for it.
"""

import pathlib

import jax
import jax.numpy as jnp


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_savable(tree):
    """Replaces typed PRNG keys by their raw key data (orbax saves plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_savable(template, tree):
    """Inverse of :func:`to_savable`: wraps key data back into keys of ``template``'s impl."""
    return jax.tree.map(
        lambda t, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
        template, tree)


class Checkpointer:
    """Saves and restores ``(state, progress)`` pairs under ``directory/<step>/``.

    ``state`` is a pytree of arrays (restored into the structure of a template), ``progress`` a
    JSON-serializable dict. Saves are asynchronous; orbax writes each step to a temporary
    directory and renames it when complete, so an interrupted save never replaces the last good
    checkpoint.
    """

    def __init__(self, directory: pathlib.Path, max_to_keep: int = 2):
        import orbax.checkpoint as ocp  # lazy: ~0.4 s

        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            pathlib.Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, progress: dict) -> None:
        args = self._ocp.args
        self._manager.save(step, args=args.Composite(
            state=args.StandardSave(to_savable(state)), progress=args.JsonSave(progress)))

    def restore(self, step: int, template) -> tuple[object, dict]:
        args = self._ocp.args
        restored = self._manager.restore(step, args=args.Composite(
            state=args.StandardRestore(to_savable(template)), progress=args.JsonRestore()))
        return from_savable(template, restored["state"]), restored["progress"]

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
