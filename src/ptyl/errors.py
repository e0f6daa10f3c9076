"""Exception hierarchy. Every error ptyl raises on bad input subclasses :class:`PtylError`.

Only :class:`DivergenceError` reports a numerical failure (the training or the predictions became NaN/Inf); every
other class is a user error (a wrong value, file or name) that no retry can fix. Code that searches
hyper-parameters (:func:`ptyl.tuning.tune`) swallows ``DivergenceError`` alone.
"""

from __future__ import annotations


class PtylError(Exception):
    """Base class of all ptyl errors."""


class PriorFileError(PtylError, ValueError):
    """A prior file is unreadable, truncated, not safetensors, or of an unknown format version."""


class ParameterMismatchError(PtylError, KeyError):
    """Parameter names or shapes of a prior do not match the model."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class InvalidValueError(PtylError, ValueError):
    """A tensor holds NaN/Inf, a variance is not positive, or a hyper-parameter is out of range."""


class DataError(PtylError, ValueError):
    """A dataset is empty, malformed, or lacks what was asked of it."""


class ConfigError(PtylError, ValueError):
    """A configuration value or command-line option is invalid."""


class DivergenceError(PtylError, FloatingPointError):
    """Training diverged: a non-finite loss, parameters or predictions; the message names the step."""


class CheckpointError(PtylError, ValueError):
    """A training checkpoint is missing, truncated, corrupt, unsafe to unpickle, or from other settings."""
