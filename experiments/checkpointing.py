"""Orbax checkpoints of the runner: named array pytrees (typed PRNG keys as key data) plus JSON
progress.

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
    """Saves and restores named pytrees of arrays plus JSON progress under ``directory/<step>/``.

    Each item (``items[name]``, a pytree of arrays) is its own orbax item, so one can be read
    alone; restored into the structure of a template, or without one as plain nested dicts and
    lists of arrays. Saves are asynchronous; orbax writes each step to a temporary directory
    and renames it when complete, so an interrupted save never replaces the last good
    checkpoint.
    """

    def __init__(self, directory: pathlib.Path, max_to_keep: int = 2):
        import orbax.checkpoint as ocp  # lazy: ~0.4 s

        self._ocp = ocp
        self.directory = pathlib.Path(directory)
        self._manager = ocp.CheckpointManager(
            pathlib.Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, items: dict, progress: dict) -> None:
        args = self._ocp.args
        self._manager.save(step, args=args.Composite(
            progress=args.JsonSave(progress),
            **{name: args.StandardSave(to_savable(tree)) for name, tree in items.items()}))

    def progress(self, step: int) -> dict:
        args = self._ocp.args
        return self._manager.restore(step, args=args.Composite(
            progress=args.JsonRestore()))["progress"]

    def restore(self, step: int, templates: dict) -> dict:
        """``{name: tree}`` for the items named in ``templates`` (a template, or None)."""
        args = self._ocp.args
        restored = self._manager.restore(step, args=args.Composite(**{
            name: args.StandardRestore(None if t is None else to_savable(t))
            for name, t in templates.items()}))
        return {name: restored[name] if t is None else from_savable(t, restored[name])
                for name, t in templates.items()}

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
