"""A bank of posterior samples (full state dicts: parameters AND buffers), in memory or on disk.

Sampling strategies (SGLD, cyclical SGLD, downstream SWAG) fill one; :func:`ptyl.inference.bma_predict` averages
over it. On disk every sample is one file in the layout of :mod:`ptyl.io.samples`.

>>> import torch
>>> bank = SampleBank(max_samples=2)
>>> for value in range(3):
...     bank.add({"w": torch.full((2,), float(value))})
>>> [sample["w"][0].item() for sample in bank]   # the oldest was evicted
[1.0, 2.0]
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptyl.errors import DataError, InvalidValueError
from ptyl.io.samples import load_samples, save_samples

__all__ = ["SampleBank", "cpu_copy"]

StateDict = dict[str, torch.Tensor]
_SAMPLE_FILE = re.compile(r"^sample_(\d+)\.safetensors$")


def cpu_copy(state: Mapping[str, Any]) -> StateDict:
    """Detached, contiguous CPU copies (clones break any storage sharing, e.g. tied weights)."""
    copied: StateDict = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise InvalidValueError(f"sample entry {name!r} is a {type(value).__name__}, not a tensor")
        copied[name] = value.detach().to("cpu", copy=True).contiguous()
    return copied


class SampleBank:
    """Stores posterior samples in memory or on disk, oldest first.

    Args:
        max_samples: keep at most this many samples; the oldest is evicted first (FIFO). ``None`` = unlimited.
        directory: when given, each sample is written atomically to ``directory/sample_XXXXXX.safetensors``
            (:func:`ptyl.io.save_samples` layout) and only the file list is kept in memory; iteration loads one
            sample at a time. A new bank does not adopt files already in the directory (restore a previous bank
            with :meth:`load_state_dict`).
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
        """Whether samples live in files."""
        return self.directory is not None

    def add(self, model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Store a copy of ``model_or_state_dict`` (a module's ``state_dict()``, or a state dict) on CPU / disk."""
        if isinstance(model_or_state_dict, nn.Module):
            state = model_or_state_dict.state_dict()
        elif isinstance(model_or_state_dict, Mapping):
            state = model_or_state_dict
        else:
            raise InvalidValueError(
                f"SampleBank.add expects an nn.Module or a state dict, got {type(model_or_state_dict).__name__}"
            )
        sample = cpu_copy(state)
        if self.directory is None:
            self._samples.append(sample)
        else:
            name = f"sample_{self._next_index:06d}.safetensors"
            save_samples([sample], self.directory / name, first_index=self._next_index)
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
        return load_samples(path)[0]

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
        """Restore ``state_dict``, a bank saved by :meth:`state_dict` (disk banks: the listed files must exist)."""
        on_disk = "files" in state_dict
        if on_disk != (self.directory is not None):
            mode = "disk" if on_disk else "in-memory"
            raise InvalidValueError(
                f"cannot load a {mode} SampleBank state into a bank with directory={self.directory}"
            )
        self.max_samples = state_dict.get("max_samples", self.max_samples)
        self._next_index = int(state_dict["next_index"])
        if self.directory is None:
            self._samples = deque(cpu_copy(sample) for sample in state_dict["samples"])
        else:
            files = [str(name) for name in state_dict["files"]]
            for name in files:
                if not _SAMPLE_FILE.match(name):
                    raise DataError(f"unexpected sample file name {name!r} in SampleBank state")
                if not (self.directory / name).is_file():
                    raise DataError(f"sample file {self.directory / name} listed in the SampleBank state is missing")
            self._files = deque(files)
        self._evict()
