"""The inference strategies, one file each; :mod:`ptyl.training.registry` maps names to them."""

from ptyl.training.strategies.base import Strategy, make_optimizer, param_groups

__all__ = ["Strategy", "make_optimizer", "param_groups"]
