"""The package version, in one place below every other module (``ptyl.__version__`` re-exports it; the prior-file
writers record it)."""

__version__ = "0.1.0"
