"""Source side: fit a posterior on the source task (SWAG) to serve as a downstream prior."""

from ptyl.posterior.gaussian import SourcePosterior
from ptyl.posterior.sharded import ShardedPosterior
from ptyl.posterior.swag import SWAGCollector

__all__ = ["SWAGCollector", "ShardedPosterior", "SourcePosterior"]
