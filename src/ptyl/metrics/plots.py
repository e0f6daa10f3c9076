"""Reliability diagram (Guo et al., 2017, https://arxiv.org/abs/1706.04599, Fig. 1) as PNG via matplotlib Agg."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ptyl.io.atomic import atomic_write
from ptyl.metrics.classification import calibration_bins, expected_calibration_error

__all__ = ["reliability_diagram"]


def reliability_diagram(
    probs: torch.Tensor,
    targets: torch.Tensor,
    path: str | Path,
    n_bins: int = 15,
    title: str | None = None,
    ignore_index: int | None = None,
) -> Path:
    """Write a reliability diagram to ``path`` (PNG, atomically) and return the path.

    Top panel: accuracy per confidence bin (bars) against the diagonal of perfect calibration, with the gap to the
    bin's mean confidence shaded. Bottom panel: number of examples per bin. The title reports the ECE
    (:func:`ptyl.metrics.classification.expected_calibration_error`, same bins).
    """
    path = Path(path)
    bins = {k: v.cpu().numpy() for k, v in calibration_bins(probs, targets, n_bins, ignore_index).items()}
    ece = expected_calibration_error(probs, targets, n_bins=n_bins, ignore_index=ignore_index)
    width = 1.0 / n_bins
    left = bins["edges"][:-1]
    filled = bins["count"] > 0
    accuracy = bins["accuracy"]
    confidence = bins["confidence"]

    # Figure + Agg canvas directly: no pyplot global state, safe in threads and headless runs.
    figure = Figure(figsize=(5.0, 6.0), layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(left[filled], accuracy[filled], width=width, align="edge", color="tab:blue", edgecolor="black",
            label="accuracy")
    gap_low = accuracy[filled]
    top.bar(left[filled], confidence[filled] - gap_low, bottom=gap_low, width=width, align="edge",
            color="tab:red", alpha=0.3, edgecolor="tab:red", label="gap to confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize="small")
    heading = f"ECE = {ece:.4f} ({n_bins} bins)"
    top.set_title(f"{title}\n{heading}" if title else f"Reliability diagram, {heading}")
    bottom.bar(left, bins["count"], width=width, align="edge", color="gray", edgecolor="black")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("count")

    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
