"""The pipeline every task, the command line, the demo and the benchmarks run through:
source (:func:`learn_source_prior`) -> prior -> tune -> fit -> evaluate (:func:`run_transfer`), with tasks
(:class:`ClassificationTask`, :class:`SegmentationTask`, :class:`TextTask`), methods (:func:`parse_method`) and
reporting (:func:`summarize`, :func:`plot_data_efficiency`)."""

from ptyl.pipeline.artifacts import load_pretrained, load_weights, pretrained_weights_path
from ptyl.pipeline.methods import DEFAULT_METHODS, Method, Start, parse_method, train_config
from ptyl.pipeline.reporting import (
    fmt_mean_std,
    group_results,
    markdown_table,
    mean_std,
    mean_std_fields,
    plot_data_efficiency,
    summarize,
)
from ptyl.pipeline.source import learn_prior, learn_source_prior, pretrain, pretrain_source
from ptyl.pipeline.tasks import (
    TASKS,
    ClassificationTask,
    SegmentationTask,
    Task,
    TextTask,
    build_from_metadata,
    get_task,
    pretrained_model_fn,
)
from ptyl.pipeline.transfer import SELECTED, TUNING_STRATEGIES, method_grid, run_transfer, transfer_run, transfer_select

__all__ = [
    "DEFAULT_METHODS",
    "SELECTED",
    "TASKS",
    "TUNING_STRATEGIES",
    "ClassificationTask",
    "Method",
    "SegmentationTask",
    "Start",
    "Task",
    "TextTask",
    "build_from_metadata",
    "fmt_mean_std",
    "get_task",
    "group_results",
    "learn_prior",
    "learn_source_prior",
    "load_pretrained",
    "load_weights",
    "markdown_table",
    "mean_std",
    "mean_std_fields",
    "method_grid",
    "parse_method",
    "plot_data_efficiency",
    "pretrain",
    "pretrain_source",
    "pretrained_model_fn",
    "pretrained_weights_path",
    "run_transfer",
    "summarize",
    "train_config",
    "transfer_run",
    "transfer_select",
]
