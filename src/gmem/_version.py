"""The one home of gmem's version (pyproject.toml reads it; gmem.__version__ re-exports it)."""
__version__ = "0.2.0.dev0"
