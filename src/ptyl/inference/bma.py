"""Posterior sample bank and Bayesian model averaging (BMA) of softmax predictions.

BMA approximates the posterior predictive with S samples theta_s ~ p(theta | D):

    p(y | x, D) ≈ (1/S) sum_s softmax(f(x; theta_s))

(e.g. Wilson & Izmailov, 2020, https://arxiv.org/abs/2002.08791). For models with BatchNorm, running statistics are
recomputed for each sample with :func:`torch.optim.swa_utils.update_bn` (Izmailov et al., 2018, SWA), because the
stored statistics belong to the weights they were accumulated with.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import RandomSampler

from ptyl.errors import DataError, InvalidValueError, PtylError
from ptyl.io.atomic import atomic_write

__all__ = ["SampleBank", "bma_predict", "predict_probs", "collect_targets"]

StateDict = dict[str, torch.Tensor]
_SAMPLE_FILE = re.compile(r"^sample_(\d+)\.safetensors$")


def _cpu_copy(state: Mapping[str, Any]) -> StateDict:
    """Detached, contiguous CPU copies (clones break any storage sharing, e.g. tied weights)."""
    copied: StateDict = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise InvalidValueError(f"sample entry {name!r} is a {type(value).__name__}, not a tensor")
        copied[name] = value.detach().to("cpu", copy=True).contiguous()
    return copied


class SampleBank:
    """Stores posterior samples (full ``state_dict``: parameters AND buffers) in memory or on disk.

    Args:
        max_samples: keep at most this many samples; the oldest is evicted first (FIFO). ``None`` = unlimited.
        directory: when given, each sample is written atomically to ``directory/sample_XXXXXX.safetensors`` and only
            the file list is kept in memory; iteration loads one sample at a time. A new bank does not adopt files
            already in the directory (restore a previous bank with :meth:`load_state_dict`).
    """

    def __init__(self, max_samples: int | None = None, directory: str | Path | None = None) -> None:
        bad_type = isinstance(max_samples, bool) or not isinstance(max_samples, int)
        if max_samples is not None and (bad_type or max_samples < 1):
            raise InvalidValueError(f"max_samples must be None or an integer >= 1, got {max_samples!r}")
        self.max_samples = max_samples
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._samples: deque[StateDict] = deque()  # in-memory mode
        self._files: deque[str] = deque()  # disk mode: file names relative to directory
        self._next_index = 0

    @property
    def on_disk(self) -> bool:
        return self.directory is not None

    def add(self, model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Store a copy of ``model.state_dict()`` (or of the given state dict) on CPU / disk."""
        if isinstance(model_or_state_dict, nn.Module):
            state = model_or_state_dict.state_dict()
        elif isinstance(model_or_state_dict, Mapping):
            state = model_or_state_dict
        else:
            raise InvalidValueError(
                f"SampleBank.add expects an nn.Module or a state dict, got {type(model_or_state_dict).__name__}"
            )
        sample = _cpu_copy(state)
        if self.directory is None:
            self._samples.append(sample)
        else:
            name = f"sample_{self._next_index:06d}.safetensors"
            _atomic_save_safetensors(sample, self.directory / name)
            self._files.append(name)
        self._next_index += 1
        self._evict()

    def _evict(self) -> None:
        if self.max_samples is None:
            return
        while len(self) > self.max_samples:
            if self.directory is None:
                self._samples.popleft()
            else:
                (self.directory / self._files.popleft()).unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._files) if self.directory is not None else len(self._samples)

    def __getitem__(self, index: int) -> StateDict:
        if self.directory is None:
            return self._samples[index]
        return self._load(self._files[index])

    def __iter__(self) -> Iterator[StateDict]:
        if self.directory is None:
            yield from list(self._samples)
        else:
            for name in list(self._files):
                yield self._load(name)

    def _load(self, name: str) -> StateDict:
        assert self.directory is not None
        path = self.directory / name
        if not path.is_file():
            raise DataError(f"sample file {path} is missing")
        return load_file(str(path), device="cpu")

    def clear(self) -> None:
        """Remove all samples (and their files)."""
        if self.directory is not None:
            for name in self._files:
                (self.directory / name).unlink(missing_ok=True)
        self._files.clear()
        self._samples.clear()

    def state_dict(self) -> dict[str, Any]:
        """In memory: the samples themselves; on disk: the file list (the files are the storage)."""
        state: dict[str, Any] = {"max_samples": self.max_samples, "next_index": self._next_index}
        if self.directory is None:
            state["samples"] = [dict(sample) for sample in self._samples]
        else:
            state["directory"] = str(self.directory)
            state["files"] = list(self._files)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        on_disk = "files" in state_dict
        if on_disk != (self.directory is not None):
            mode = "disk" if on_disk else "in-memory"
            raise InvalidValueError(
                f"cannot load a {mode} SampleBank state into a bank with directory={self.directory}"
            )
        self.max_samples = state_dict.get("max_samples", self.max_samples)
        self._next_index = int(state_dict["next_index"])
        if self.directory is None:
            self._samples = deque(_cpu_copy(sample) for sample in state_dict["samples"])
        else:
            files = [str(name) for name in state_dict["files"]]
            for name in files:
                if not _SAMPLE_FILE.match(name):
                    raise DataError(f"unexpected sample file name {name!r} in SampleBank state")
                if not (self.directory / name).is_file():
                    raise DataError(f"sample file {self.directory / name} listed in the SampleBank state is missing")
            self._files = deque(files)
        self._evict()


def _atomic_save_safetensors(tensors: StateDict, path: Path) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


# --------------------------------------------------------------------------------------------- prediction helpers


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _default_input(batch: Any) -> Any:
    """``(x, y)`` -> ``x``; a bare tensor is taken as the input."""
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise DataError("loader yielded an empty batch")
        return batch[0]
    return batch


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {key: _to_device(value, device) for key, value in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(value, device) for value in x)
    return x


def _call(model: nn.Module, x: Any) -> Any:
    return model(**x) if isinstance(x, Mapping) else model(x)


def _logits(output: Any) -> torch.Tensor:
    """Accept raw logits, HF-style outputs (``.logits``) and torchvision-style dicts (``["out"]``)."""
    if isinstance(output, torch.Tensor):
        logits = output
    elif hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        logits = output.logits
    elif isinstance(output, Mapping) and isinstance(output.get("out"), torch.Tensor):
        logits = output["out"]
    else:
        raise DataError(f"model output of type {type(output).__name__} is not a logits tensor")
    if logits.dim() < 2:
        raise DataError(f"expected logits of shape [B, C, ...], got shape {tuple(logits.shape)}")
    return logits


def _check_ordered(loader: Iterable[Any]) -> None:
    if isinstance(getattr(loader, "sampler", None), RandomSampler):
        raise InvalidValueError("prediction loaders must not shuffle (shuffle=False): passes must see the same order")


def predict_probs(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str | None = None,
    *,
    input_fn: Callable[[Any], Any] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Softmax probabilities of one model over ``loader``: ``[N, C]`` (``[N, C, H, W]`` for segmentation), float32 CPU.

    The model is run in eval mode under ``torch.no_grad`` and its train/eval mode is restored afterwards. ``loader``
    yields ``(x, y)`` batches or bare inputs; ``input_fn(batch)`` overrides how the model input is taken from a batch
    (a tensor, or a dict of keyword arguments). Inputs go to ``device`` (default: the model's device).
    """
    from tqdm.auto import tqdm

    _check_ordered(loader)
    device = _model_device(model) if device is None else torch.device(device)
    get_input = input_fn or _default_input
    was_training = model.training
    model.eval()
    chunks: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
                logits = _logits(_call(model, _to_device(get_input(batch), device)))
                chunks.append(torch.softmax(logits.float(), dim=1).cpu())
    finally:
        model.train(was_training)
    if not chunks:
        raise DataError("loader yielded no batches")
    trailing = {chunk.shape[1:] for chunk in chunks}
    if len(trailing) != 1:
        raise DataError(f"batches produced outputs of different shapes {sorted(map(tuple, trailing))}")
    return torch.cat(chunks)


def collect_targets(loader: Iterable[Any]) -> torch.Tensor:
    """Concatenate the ``y`` of every ``(x, y)`` batch (CPU, int64), in loader order."""
    _check_ordered(loader)
    targets = []
    for batch in loader:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise DataError("collect_targets needs a loader yielding (x, y) batches")
        targets.append(torch.as_tensor(batch[1]).long().cpu())
    if not targets:
        raise DataError("loader yielded no batches")
    return torch.cat(targets)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


def bma_predict(
    model: nn.Module,
    samples: Iterable[Mapping[str, torch.Tensor]] | SampleBank,
    loader: Iterable[Any],
    *,
    bn_loader: Iterable[Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    input_fn: Callable[[Any], Any] | None = None,
) -> torch.Tensor:
    """Bayesian model average ``(1/S) sum_s softmax(f(x; theta_s))`` over ``loader`` (float32 CPU).

    For each sample the state dict is loaded into ``model`` (strictly: names and shapes must match); if the model has
    BatchNorm layers and ``bn_loader`` is given, running statistics are recomputed with
    :func:`torch.optim.swa_utils.update_bn` on the inputs of ``bn_loader`` (otherwise the sample's stored statistics
    are used). The average is accumulated in float64. ``model``'s weights, buffers, train/eval mode and device are
    restored afterwards, also on error. ``device`` moves the model (and inputs) there for the computation.
    Output shape as :func:`predict_probs`: ``[N, C]`` or ``[N, C, H, W]``.
    """
    from tqdm.auto import tqdm

    _check_ordered(loader)
    original_device = _model_device(model)
    device = original_device if device is None else torch.device(device)
    get_input = input_fn or _default_input
    original_state = _cpu_copy(model.state_dict())  # CPU: do not double the model's footprint on the accelerator
    was_training = model.training
    use_bn_update = bn_loader is not None and _has_batchnorm(model)

    total: torch.Tensor | None = None
    count = 0
    try:
        if device != original_device:
            model.to(device)
        for sample in tqdm(samples, desc="BMA samples", disable=not progress, leave=False):
            try:
                model.load_state_dict(sample, strict=True)
            except RuntimeError as error:
                raise PtylError(f"sample {count} does not match the model: {error}") from error
            if use_bn_update:
                assert bn_loader is not None
                _recompute_batchnorm(model, bn_loader, device, get_input)
            probs = predict_probs(model, loader, device, input_fn=get_input).double()
            if total is None:
                total = probs
            elif probs.shape != total.shape:
                raise DataError(
                    f"sample {count}: predictions of shape {tuple(probs.shape)}, expected {tuple(total.shape)}"
                )
            else:
                total += probs
            count += 1
    finally:
        model.load_state_dict(original_state)
        if device != original_device:
            model.to(original_device)
        model.train(was_training)
    if total is None:
        raise InvalidValueError("bma_predict needs at least one sample")
    return (total / count).float()


def _recompute_batchnorm(
    model: nn.Module, bn_loader: Iterable[Any], device: torch.device, get_input: Callable[[Any], Any]
) -> None:
    """Recompute BatchNorm running statistics with ``update_bn`` on the inputs (never the targets) of ``bn_loader``."""
    num_batches = 0

    def boxed_inputs() -> Iterator[_Box]:
        nonlocal num_batches
        for batch in bn_loader:
            num_batches += 1
            yield _Box(_to_device(get_input(batch), device))

    # update_bn would take x[0] of a list/tuple input and call model(x); the box and adapter pass our input unchanged.
    torch.optim.swa_utils.update_bn(boxed_inputs(), _BoxedInputModel(model))
    if num_batches == 0:
        raise DataError("bn_loader yielded no batches: cannot recompute BatchNorm statistics")


class _Box:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _BoxedInputModel(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, box: _Box) -> Any:
        return _call(self.model, box.value)
