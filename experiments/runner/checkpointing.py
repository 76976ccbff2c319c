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
    """Saves and restores named pytrees of arrays (the names in ``items``) plus JSON progress
    under ``directory/<step>/``.

    Each item (``items[name]``, a pytree of arrays) is an orbax PyTree item; it is restored into
    the structure of a template, or without one as plain nested dicts and lists of arrays, and
    a dict item can be read in part (some of its keys). Few items are cheaper to write than many
    (each has its own files). Saves are asynchronous; orbax writes each step to a temporary
    directory and renames it when complete, so an interrupted save never replaces the last good
    checkpoint.
    """

    def __init__(self, directory: pathlib.Path, max_to_keep: int = 2,
                 items: tuple[str, ...] = ("params", "opt_state")):
        import orbax.checkpoint as ocp  # lazy: ~0.4 s

        self._ocp = ocp
        self.directory = pathlib.Path(directory)
        handlers = {name: ocp.PyTreeCheckpointHandler() for name in items}
        self._manager = ocp.CheckpointManager(
            self.directory.absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_handlers={**handlers, "progress": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, items: dict, progress: dict) -> None:
        args = self._ocp.args
        self._manager.save(step, args=args.Composite(
            progress=args.JsonSave(progress),
            **{name: args.PyTreeSave(to_savable(tree)) for name, tree in items.items()}))

    def progress(self, step: int) -> dict:
        args = self._ocp.args
        return self._manager.restore(step, args=args.Composite(
            progress=args.JsonRestore()))["progress"]

    def restore(self, step: int, templates: dict, *, partial: bool = False) -> dict:
        """``{name: tree}`` of the items named in ``templates``.

        ``templates[name]`` is a template (restored into its structure, dtypes and PRNG key
        types) or None (the item as saved: plain dicts and lists of arrays). With ``partial``,
        each template is a dict of some of the item's top-level keys (each a template or None)
        and only those are read.
        """
        args, utils = self._ocp.args, self._ocp.checkpoint_utils
        metadata = self._manager.item_metadata(step)
        items = {}
        for name, template in templates.items():
            if partial:
                item = {key: metadata[name][key] if t is None else to_savable(t)
                        for key, t in template.items()}
            else:
                item = metadata[name] if template is None else to_savable(template)
            items[name] = args.PyTreeRestore(item=item,
                                             restore_args=utils.construct_restore_args(item),
                                             partial_restore=partial)
        restored = self._manager.restore(step, args=args.Composite(**items))
        out = {}
        for name, template in templates.items():
            if partial:
                out[name] = {key: restored[name][key] if t is None
                             else from_savable(t, restored[name][key])
                             for key, t in template.items()}
            else:
                out[name] = (restored[name] if template is None
                             else from_savable(template, restored[name]))
        return out

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
