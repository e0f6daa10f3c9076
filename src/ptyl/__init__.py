"""ptyl — Pre-Train Your Loss: Bayesian transfer learning with learned, informative priors.

Shwartz-Ziv, Goldblum, Souri, Kapoor, Zhu, LeCun, Wilson. "Pre-Train Your Loss: Easy Bayesian Transfer Learning with
Informative Priors." NeurIPS 2022. arXiv:2205.10279.
"""

from ptyl.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DivergenceError,
    InvalidValueError,
    ParameterMismatchError,
    PriorFileError,
    PtylError,
)
from ptyl.io import import_reference, load_posterior, load_prior, read_metadata, save_posterior
from ptyl.posterior import ShardedPosterior, SourcePosterior, SWAGCollector
from ptyl.priors import (
    CompositePrior,
    DiagonalGaussianPrior,
    IsotropicGaussianPrior,
    LowRankGaussianPrior,
    Prior,
    PriorKind,
    ShardedPrior,
    learned_prior,
    make_prior,
    shard_prior,
)
from ptyl.version import __version__  # noqa: F401 - ptyl.__version__

__all__ = [
    "CheckpointError",
    "CompositePrior",
    "ConfigError",
    "DataError",
    "DivergenceError",
    "DiagonalGaussianPrior",
    "InvalidValueError",
    "IsotropicGaussianPrior",
    "LowRankGaussianPrior",
    "ParameterMismatchError",
    "Prior",
    "PriorFileError",
    "PriorKind",
    "PtylError",
    "SWAGCollector",
    "ShardedPosterior",
    "ShardedPrior",
    "SourcePosterior",
    "import_reference",
    "learned_prior",
    "load_posterior",
    "load_prior",
    "make_prior",
    "read_metadata",
    "save_posterior",
    "shard_prior",
]
