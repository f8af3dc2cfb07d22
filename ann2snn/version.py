"""The version of ann2snn: the package's (pyproject.toml reads it here) and every artifact's."""
__version__ = "0.1.0"
