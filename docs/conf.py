"""Sphinx configuration of the bsam_optax documentation.

Build (from the repository root): ``sphinx-build -W --keep-going -b html docs docs/_build/html``.

The pages that repeat the README (introduction, getting started, benchmarks, scaling) include its sections
between ``<!-- docs: NAME -->`` and ``<!-- /docs: NAME -->`` markers, so the README stays the one source.
At every build this file copies the notebooks and the benchmark results into ``docs/_generated/`` (ignored
by git; the notebooks are rendered with their stored outputs, not executed) and writes the API pages from the
``__all__`` lists of the public modules, so a renamed or added public name needs no change here.
"""

import importlib
import os
import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
GENERATED = DOCS / "_generated"
sys.path.insert(0, str(ROOT))

import bsam_optax  # noqa: E402

project = "bsam_optax"
author = "bsam_optax authors"
copyright = "bsam_optax authors"
release = bsam_optax.__version__
version = release

extensions = [
  "myst_nb",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "jupyter_execute"]
templates_path = ["_templates"]  # autosummary/class.rst: a class, its fields and methods, no summary tables
html_theme = "furo"
html_title = f"bsam_optax {release}"

# Markdown (MyST): $...$ math, ``:::`` fences, anchors for headings (links like README.md#quickstart).
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# Notebooks: stored outputs only. BSAM_DOCS_EXECUTE=force runs them (in their small CI setting).
nb_execution_mode = os.environ.get("BSAM_DOCS_EXECUTE", "off")
nb_execution_timeout = 600
nb_execution_raise_on_error = True

# API: Google-style docstrings, whose Args and Returns say what the types are; the annotations are not
# repeated (JAX's array and schedule aliases expand to long unions).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autosummary_generate = True
autosummary_imported_members = True
autosummary_ignore_module_all = False
add_module_names = False

# The public modules of the API reference: each page lists the module's ``__all__``.
API_MODULES = [
  ("bsam_optax", "The optimizer, its stages and the steps"),
  ("bsam_optax.metrics", "Metrics"),
  ("bsam_optax.flax", "Flax"),
  ("bsam_optax.distributed", "Devices, processes and hosts"),
  ("bsam_optax.app", "The main job, an application on the library"),
]


def _copy_sources():
  """Copies the notebooks and the benchmark write-ups into ``_generated/`` (the source tree of Sphinx)."""
  shutil.rmtree(GENERATED, ignore_errors=True)
  (GENERATED / "notebooks").mkdir(parents=True)
  for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copy2(notebook, GENERATED / "notebooks" / notebook.name)
  bench = GENERATED / "benchmarks"
  (bench / "results").mkdir(parents=True)
  shutil.copy2(ROOT / "benchmarks" / "README.md", bench / "README.md")
  for result in sorted((ROOT / "benchmarks" / "results").iterdir()):
    if result.suffix == ".md":  # reached by links from benchmarks/README.md, not from a table of contents
      (bench / "results" / result.name).write_text("---\norphan: true\n---\n\n" + result.read_text(encoding="utf-8"))
    elif result.suffix in (".png", ".svg", ".json"):
      shutil.copy2(result, bench / "results" / result.name)


def _public_names(module_name):
  module = importlib.import_module(module_name)
  names = getattr(module, "__all__", None)
  if names is None:
    raise RuntimeError(f"{module_name} has no __all__: the API reference lists the names in it")
  return [name for name in names if not name.startswith("_")]


def _write_api_pages():
  """One page per public module: its docstring and a summary table (with a page per name) of its ``__all__``."""
  api = GENERATED / "api"
  api.mkdir(parents=True)
  for module_name, title in API_MODULES:
    lines = [
      f"``{module_name}``: {title}",
      "=" * (len(module_name) + len(title) + 6),
      "",
      f".. automodule:: {module_name}",
      "   :no-members:",
      "",
      f".. currentmodule:: {module_name}",
      "",
      ".. autosummary::",
      "   :toctree: .",
      "   :nosignatures:",
      "",
    ]
    lines += [f"   {name}" for name in _public_names(module_name)]
    (api / f"{module_name}.rst").write_text("\n".join(lines) + "\n")


_copy_sources()
_write_api_pages()
