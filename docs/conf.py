# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Sphinx configuration: the API reference from the docstrings and the tutorials rendered by sphinx-gallery.

Build with ``python -m sphinx -W -b html docs docs/_build/html`` (CI does, warnings as errors).
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pyro_osds import __version__  # noqa: E402

project = "pyro_osds"
author = "Contributors to the pyro_osds project"
copyright = "the pyro_osds contributors, Apache-2.0"  # noqa: A001
version = release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
# the `from __future__ import annotations` hints name classes of other packages that need not resolve here
suppress_warnings = ["autodoc.import_object"]
exclude_patterns = ["_build", "auto_tutorials/*.ipynb", "auto_tutorials/*.py", "auto_tutorials/*.zip"]

# the tutorials (percent-format scripts) rendered as pages, not executed here: they run in CI in smoke mode
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "tutorials"),
    "gallery_dirs": "auto_tutorials",
    "filename_pattern": r"^$",  # execute none
    "plot_gallery": "False",
    "download_all_examples": False,
    "within_subsection_order": "FileNameSortKey",
    "ignore_pattern": r"_outputs",
}

html_theme = "alabaster"
html_static_path = []
html_title = f"pyro_osds {release}"
