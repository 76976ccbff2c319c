"""Sphinx configuration of zojax's documentation site.

Build it from the repository root (offline: no intersphinx, MathJax served from the build):

    sphinx-build -W -b html docs docs/_build/html

The pages are MyST Markdown (myst-nb): ``getting_started.md`` is executed at build time; the
analysis notebooks under ``notebooks/`` (jupytext percent scripts) are copied into
``docs/notebooks/`` here and rendered without executing (they read a finished experiment's
workdir). Every Python block of the pages runs in ``tests/test_docs.py``.
"""

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "zojax"
author = "the zojax authors"
copyright = "2026, the zojax authors"
release = version = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
]

# The analysis notebooks, jupytext percent scripts, are pages too. conf.py is not a notebook.
nb_custom_formats = {".py": ["jupytext.reads", {"fmt": "py:percent"}]}
exclude_patterns = ["_build", "conf.py", "**/.ipynb_checkpoints", "README.md"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".py": "myst-nb"}

# Pages opt in to execution (``getting_started.md``: ``execution_mode: force`` in its front
# matter). The notebooks need a finished run's workdir: rendered without outputs, unless
# ZOJAX_DOCS_NOTEBOOKS=execute, which executes them on the workdirs their environment
# variables name (ZOJAX_FIG1_DIR, ZOJAX_FIG2_DIR, ZOJAX_TILTED_DIR; see notebooks_index.md).
nb_execution_mode = "force" if os.environ.get("ZOJAX_DOCS_NOTEBOOKS") == "execute" else "off"
nb_execution_timeout = 120
nb_execution_raise_on_error = True
nb_merge_streams = True

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# The API reference, from the docstrings (Google sections, Sphinx roles).
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": False}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Warnings are errors (sphinx-build -W) and every zojax reference must resolve; the external
# types below cannot (no intersphinx fetch at build time), and are ignored by name.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|jnp|np|numpy|optax|flax|nn|chex|ml_collections|orbax|absl)(\..*)?"),
    (r"py:.*", r"(collections\.abc|typing|types|pathlib|os|re|enum|dataclasses)\..*"),
    (r"py:.*", r"(Callable|Any|Sequence|Mapping|Iterable|Iterator|NamedTuple|Path|PyTree|"
               r"Array|ArrayLike|PRNGKey|KeyArray|NamedSharding|Mesh|PartitionSpec|"
               r"ConfigDict|FrozenConfigDict|GradientTransformation|"
               r"GradientTransformationExtraArgs|Params|Updates|OptState|ShapeDtypeStruct)"),
    (r"py:.*", r"(int|float|bool|str|bytes|dict|list|tuple|object|None|type|callable|"
               r"optional|array|pytree|ndarray|function)"),
]

# MathJax from the build itself, never a CDN: the files of the PyPI package
# sphinx-mathjax-offline (MathJax 3), copied next to the pages.
mathjax_path = "mathjax/tex-chtml.js"


def _mathjax_dir():
    import importlib.util

    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or spec.origin is None:
        raise RuntimeError("MathJax for the offline site comes from the docs extra: "
                           'pip install -e ".[docs]" (sphinx-mathjax-offline).')
    return Path(spec.origin).parent / "static" / "mathjax"


def _copy_mathjax(app, exception):
    if exception is None and app.builder.format == "html":
        from sphinx.util.fileutil import copy_asset

        copy_asset(str(_mathjax_dir()), str(Path(app.outdir) / "_static" / "mathjax"))


def _copy_notebooks(app):
    """notebooks/*.py (the repository's) become pages under docs/notebooks/."""
    out = DOCS / "notebooks"
    out.mkdir(exist_ok=True)
    for source in sorted((ROOT / "notebooks").glob("*.py")):
        target = out / source.name
        if not target.exists() or target.read_bytes() != source.read_bytes():
            shutil.copyfile(source, target)


def _importable(dotted):
    """Whether a dotted path names an object (a module, an attribute or a field)."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            # A field of a dataclass or NamedTuple without a default is no class attribute.
            fields = getattr(obj, "__annotations__", {}) if isinstance(obj, type) else {}
            if hasattr(obj, part):
                obj = getattr(obj, part)
            elif part in fields:
                obj = fields[part]
            else:
                return False
        return True
    return False


def _resolve_short_name(app, env, node, contnode):
    """zojax's docstrings name objects as their own module sees them (``:class:`Objective```).

    Such a name resolves to the documented object whose full name ends with it (the one
    nearest the referring module when several do); a name that exists in zojax or experiments
    but has no page of its own is shown as code, unlinked; any other name stays a warning (an
    error under -W): a broken reference.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    domain = env.get_domain("py")
    module = node.get("py:module") or ""
    cls = node.get("py:class")
    suffix = "." + target
    found = [name for name in domain.objects if name == target or name.endswith(suffix)]
    if found:
        def nearness(name):
            common = 0
            for a, b in zip(name.split("."), module.split(".")):
                if a != b:
                    break
                common += 1
            return (-common, len(name))
        found.sort(key=nearness)
        return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                   found[0], node, contnode)
    import importlib

    importlib.import_module("zojax")  # its modules are where a short name may live
    prefixes = [module + "." + cls, module] if cls else [module]
    owners = [m for m in sys.modules if m.split(".")[0] in ("zojax", "experiments")]
    for prefix in [*prefixes, *owners, ""]:
        if _importable(f"{prefix}.{target}" if prefix else target):
            return contnode
    return None


def setup(app):
    _mathjax_dir()  # fail early, with the install line
    app.connect("missing-reference", _resolve_short_name)
    app.connect("builder-inited", _copy_notebooks)
    app.connect("build-finished", _copy_mathjax)


html_theme = "sphinx_book_theme"
html_title = "zojax"
html_static_path = []
templates_path = ["_templates"]
html_theme_options = {
    "repository_url": "",
    "use_repository_button": False,
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_last_updated_fmt = None
