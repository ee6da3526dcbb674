"""The package version, in a leaf module: writers stamp files without importing the package."""

__version__ = "0.1.0"
