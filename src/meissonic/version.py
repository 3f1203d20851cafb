"""The package version, in a module of its own so that the package's modules read it without importing the package
(pyproject.toml reads it from here too)."""

__version__ = "0.1.0"
