r"""The per-layer form of a Flax (Linen) objective for the low-memory mode:
:func:`layerwise`.

A low-memory step (:mod:`zojax.low_memory`) evaluates :math:`f(x + t u)`. Given a plain
``value_fn`` it builds the whole perturbed copy of the parameters first. Given
``layerwise(loss)``, each Linen module that owns parameters (``Dense``, ``Embed``, a norm...)
is run with its own parameters perturbed just before it runs, from a direction keyed to wait
for the module's input (XLA can then neither hoist nor merge the draws), so one layer's
perturbed parameters are alive at a time; an ``nn.Embed`` looked up with token ids perturbs
only the rows it returns (the word embeddings are a fifth to a half of a small transformer:
the batch reads a few hundred rows), which also covers a tied head read through the table's
rows (``label_logits`` of :mod:`experiments.models.llama`). Any other parameter, one the loss
reads itself (a head ``params["head"]["w"]``) or one no module owns, is perturbed as the loss is
entered. The values are those of ``loss`` at the perturbed parameters, as a plain step computes
them.

The rule it relies on: every parameter leaf a module reads must be a leaf of the ``params`` the
loss was given, passed to ``apply`` as it is (not cast or sliced first: that raises an
error), and must not also be read outside a module (that use would see the unperturbed value).
"""

import contextlib
import threading
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from zojax import pipeline
from zojax.objective import Objective

_STATE = threading.local()


def layerwise(loss: Callable) -> Objective:
    """``loss(params, *args, **kwargs)`` (a Flax model's loss) as an :class:`Objective` with a
    per-layer form, for ``two_point(..., low_memory=True)`` and the aliases.

    Use it where a ``value_fn`` goes: ``value_fn=zojax.layerwise(loss)`` with
    ``opt.update(..., value_fn=zojax.objective.bind(zojax.layerwise(loss), batch))``, or wrap
    a closure, ``zojax.layerwise(lambda p: loss(p, batch))``. Outside a low-memory step it is
    ``loss`` itself.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp, zojax
        >>> model = nn.Dense(2)
        >>> x = jnp.ones((4, 3))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
        >>> opt = zojax.zo_sgd(0.1, 1e-3, low_memory=True)
        >>> updates, state = opt.update(None, opt.init(params), params,
        ...                             value_fn=zojax.layerwise(loss))
    """

    def perturbed(params, direction, step, *args, **kwargs):
        leaves, treedef = jax.tree.flatten(params)
        read = _read_by_modules(loss, params, args, kwargs)
        entered = treedef.unflatten([
            x if j in read else pipeline._perturb(x, step, direction.leaf(j))
            for j, x in enumerate(leaves)])
        index = {id(x): j for j, x in enumerate(leaves) if j in read}
        with _intercepting(_perturbing(index, direction, step)):
            return loss(entered, *args, **kwargs)

    return Objective(loss, None, perturbed)


@contextlib.contextmanager
def _intercepting(interceptor):
    previous = getattr(_STATE, "inside", False), getattr(_STATE, "last", None)
    _STATE.inside, _STATE.last = False, None
    try:
        with nn.intercept_methods(interceptor):
            yield
    finally:
        _STATE.inside, _STATE.last = previous


def _own_params(module) -> dict:
    """The parameter arrays ``module`` owns (not those of its submodules); raises when it owns
    some and has submodules with parameters too."""
    params = module.variables.get("params", {}) if module.scope is not None else {}
    own = {name: v for name, v in params.items() if not isinstance(v, Mapping)}
    if own and len(own) < len(params):
        raise ValueError(
            f"zojax.layerwise: the module {module.__class__.__name__} at "
            f"{'/'.join(module.path) or 'the root'} owns parameters ({sorted(own)}) and has "
            "submodules with parameters: it perturbs a module's parameters by running the "
            "module on its own. Move its parameters into a submodule, or use a plain value_fn.")
    return own


def _read_by_modules(loss, params, args, kwargs) -> set:
    """The indices of the leaves of ``params`` that Linen modules read (one abstract trace)."""
    read = set()

    def record(next_fun, call_args, call_kwargs, context):
        if context.method_name != "setup":
            for value in _own_params(context.module).values():
                if id(value) in index:
                    read.add(index[id(value)])
        return next_fun(*call_args, **call_kwargs)

    def traced(leaves):
        index.update({id(x): j for j, x in enumerate(leaves)})
        with nn.intercept_methods(record):
            return loss(jax.tree.unflatten(jax.tree.structure(params), leaves), *args, **kwargs)

    index = {}
    jax.eval_shape(traced, jax.tree.leaves(params))
    return read


def _first_array(args):
    for x in jax.tree.leaves(args):
        if isinstance(x, jax.Array | jax.core.Tracer) or hasattr(x, "dtype"):
            return x
    return None


def _perturbing(index, direction, step):
    """The interceptor: runs each module that owns parameters with them perturbed."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if getattr(_STATE, "inside", False) or context.method_name == "setup":
            return next_fun(*args, **kwargs)
        own = _own_params(module)
        if not own:
            return next_fun(*args, **kwargs)
        missing = [name for name, v in own.items() if id(v) not in index]
        if missing:
            raise ValueError(
                f"zojax.layerwise: the module {module.__class__.__name__} at "
                f"{'/'.join(module.path) or 'the root'} reads parameters {missing} that are "
                "not leaves of the params given to the loss (cast, sliced or built inside "
                "it?). Pass the params to apply as they are, or use a plain value_fn. For "
                "LoRA adapters or a frozen subset, use zojax.lora.objective(loss, params) or "
                "zojax.lora.freeze (the low-memory mode then perturbs a copy of the trained "
                "part's size alone).")
        # Keyed to wait for the last module's output (materialized anyway: a matmul's result),
        # else this module's input: a slice of an activation function's output would be a
        # second consumer that keeps XLA from fusing the activation into the next matmul.
        last = getattr(_STATE, "last", None)
        first = last if last is not None else _first_array((args, kwargs))
        here = direction if first is None else direction.after(first)
        out = _run(module, context, own, index, here, step, args, kwargs)
        _STATE.last = _first_array(out)
        return out

    return interceptor


def _run(module, context, own, index, here, step, args, kwargs):
    """``module``'s method with its own parameters perturbed along ``here``."""
    if (isinstance(module, nn.Embed) and context.method_name == "__call__"
            and set(own) == {"embedding"}):
        (ids,), table = args, own["embedding"]
        rows = pipeline._perturb(jnp.take(table, ids, axis=0), step,
                                 here.rows(index[id(table)], ids))
        return rows if module.dtype is None else rows.astype(module.dtype)
    variables = {**module.variables,
                 "params": {name: pipeline._perturb(v, step, here.leaf(index[id(v)]))
                            for name, v in own.items()}}
    alone = module.clone(parent=None)
    _STATE.inside = True
    try:
        return alone.apply(variables, *args, method=context.method_name, **kwargs)
    finally:
        _STATE.inside = False
