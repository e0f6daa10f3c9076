"""Evaluation metrics: accuracy, NLL, ECE, Brier score, reliability diagrams, JSON results files."""

from ptyl.metrics.classification import (
    accuracy,
    brier_score,
    calibration_bins,
    evaluate_probs,
    expected_calibration_error,
    flatten_predictions,
    nll,
)
from ptyl.metrics.plots import reliability_diagram
from ptyl.metrics.results import load_json, save_json, to_jsonable

__all__ = [
    "accuracy",
    "nll",
    "expected_calibration_error",
    "brier_score",
    "evaluate_probs",
    "calibration_bins",
    "flatten_predictions",
    "reliability_diagram",
    "save_json",
    "load_json",
    "to_jsonable",
]
