"""Value checks shared by priors, posteriors and prior files (defined once, in :mod:`ptyl.validation`)."""

from ptyl.validation import check_finite, check_positive

__all__ = ["check_finite", "check_positive"]
