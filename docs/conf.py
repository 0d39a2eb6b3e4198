"""Sphinx configuration: the API reference, generated from gmem's docstrings (sphinx-build -W)."""
import gmem

project = "gmem (kvm-gmem)"
author = "the gmem developers"
release = version = gmem.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
# the Cython core embeds its signatures in the docstrings (embedsignature)
autodoc_docstring_signature = True
html_theme = "alabaster"
exclude_patterns = ["_build"]
source_suffix = {".rst": "restructuredtext"}
suppress_warnings = ["myst.header"]
