"""Share a learned prior like pretrained weights: one directory (a local folder or a Hugging Face Hub repository).

    my-prior/
      prior.safetensors              the prior (ptyl prior file: SWAG mean, variance, deviations)
      prior.pretrained.safetensors   the pretrained (SWA-mean) weights downstream training starts from (optional)
      ptyl_card.json                 the model card, machine-readable (:class:`PriorCard`)
      README.md                      the same card for people and the Hub (YAML front matter + tables)

The card says where the prior comes from (source data, architecture, objective, rank), how to use it (recommended
prior kind, lambda, eps, learning rate) and how it did (benchmark rows). The directory is written all-or-nothing
(:func:`ptyl.io.atomic_files`).

>>> import torch
>>> from ptyl.posterior import SourcePosterior
>>> posterior = SourcePosterior({"w": torch.zeros(3)}, {"w": torch.ones(3)}, {"w": torch.ones(2, 3)},
...                             {"source": "kmnist", "architecture": "smallcnn"})
>>> path = save_pretrained("shared-prior", posterior, card={"recommended": {"scale": 1e4, "eps": 1e-4}})
>>> loaded = from_pretrained("shared-prior")
>>> loaded.card.source, loaded.card.rank, loaded.card.recommended["scale"]
('kmnist', 2, 10000.0)

``from_pretrained("owner/name")`` downloads the four files from the Hub when ``huggingface_hub`` is installed and a
network is there; :func:`push_to_hub` uploads a directory.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptyl.errors import ConfigError, PriorFileError
from ptyl.io.atomic import atomic_files, atomic_write_text
from ptyl.io.prior_file import load_posterior, save_posterior
from ptyl.io.weights import load_state_checked, read_weights, save_weights
from ptyl.posterior.gaussian import SourcePosterior
from ptyl.priors.registry import PriorKind
from ptyl.version import __version__

__all__ = ["CARD_FILE", "PRIOR_FILE", "README_FILE", "WEIGHTS_FILE", "PretrainedPrior", "PriorCard",
           "from_pretrained", "prior_file_path", "push_to_hub", "save_pretrained"]

PRIOR_FILE = "prior.safetensors"
WEIGHTS_FILE = "prior.pretrained.safetensors"  # = ptyl.pipeline.pretrained_weights_path(PRIOR_FILE)
CARD_FILE = "ptyl_card.json"
README_FILE = "README.md"
_FILES = (PRIOR_FILE, WEIGHTS_FILE, CARD_FILE, README_FILE)


@dataclass
class PriorCard:
    """What a shared prior is and how to use it.

    Attributes:
        source: the source data it was learned on.
        architecture: the model (a ptyl name or ``module:factory``).
        objective: ``supervised`` / ``simclr`` / ...
        rank: SWAG rank K of the file.
        num_parameters: parameters the prior covers.
        head: the head module left out of the prior (the downstream model's new head goes there).
        recommended: how to use it: ``kind``, ``scale`` (lambda), ``eps``, ``lr``, ... (keyword arguments of
            :func:`ptyl.priors.make_prior` and :class:`ptyl.training.TrainConfig`).
        benchmarks: measured results, one dict per row (e.g. ``target``, ``n_per_class``, ``method``, ``accuracy``,
            ``nll``, ``seeds``).
        description, license: free text.
        extra: anything else from the prior's metadata (learning rates, epochs, snapshots).
        ptyl_version, created: filled when saved.
    """

    source: str | None = None
    architecture: str | None = None
    objective: str | None = None
    rank: int | None = None
    num_parameters: int | None = None
    head: str | None = None
    recommended: dict[str, Any] = field(default_factory=dict)
    benchmarks: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""
    license: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    ptyl_version: str | None = None
    created: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "card") -> PriorCard:
        """A card from JSON (unknown keys are an error naming them).

        Args:
            data: the mapping.
            where: how an error names its origin.

        Returns:
            The card.
        """
        if not isinstance(data, dict):
            raise PriorFileError(f"{where}: a card is a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PriorFileError(f"{where}: unknown card field(s) {unknown}; known: {sorted(known)}")
        for key, kind in (("recommended", dict), ("benchmarks", list), ("extra", dict)):
            if key in data and not isinstance(data[key], kind):
                raise PriorFileError(f"{where}: {key!r} must be a JSON {'object' if kind is dict else 'list'}")
        return cls(**data)

    def to_markdown(self) -> str:
        """The card as a Hub ``README.md``: YAML front matter, the facts, how to use it, the benchmark table.

        Returns:
            The markdown text.
        """
        title = f"Learned prior: {self.architecture or 'a model'} on {self.source or 'its source data'}"
        front = ["---", "library_name: ptyl", "tags:", "- ptyl", "- bayesian-transfer-learning", "- prior", "- swag"]
        if self.license:
            front.append(f"license: {self.license}")
        lines = [*front, "---", "", f"# {title}", ""]
        if self.description:
            lines += [self.description, ""]
        facts = [("source data", self.source), ("architecture", self.architecture), ("objective", self.objective),
                 ("SWAG rank K", self.rank), ("parameters covered", self.num_parameters),
                 ("head (left out)", self.head),
                 ("ptyl version", self.ptyl_version), ("created", self.created)]
        lines += ["| | |", "|---|---|", *[f"| {k} | {_cell(v)} |" for k, v in facts if v is not None], ""]
        if self.recommended:
            lines += ["## Recommended use", "", "| setting | value |", "|---|---|",
                      *[f"| {k} | {_cell(v)} |" for k, v in self.recommended.items()], ""]
        lines += ["```python", "from ptyl.io import from_pretrained", "from ptyl.priors import make_prior", "",
                  'shared = from_pretrained("<this folder or repo>")',
                  "shared.load_weights_into(model)  # the pretrained weights, if the folder has them",
                  "prior = make_prior(model, shared.card.recommended.get(\"kind\", \"lowrank\"), "
                  "posterior=shared.posterior, **shared.prior_kwargs())", "```", ""]
        if self.benchmarks:
            keys = list(dict.fromkeys(k for row in self.benchmarks for k in row))
            lines += ["## Benchmarks", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                      *["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in self.benchmarks], ""]
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


@dataclass
class PretrainedPrior:
    """A shared prior read back by :func:`from_pretrained`.

    Attributes:
        posterior: the :class:`~ptyl.posterior.SourcePosterior` (``make_prior(model, kind, posterior=...)``).
        card: its :class:`PriorCard`.
        directory: the local folder (a Hub download lands in the Hub cache).
    """

    posterior: SourcePosterior
    card: PriorCard
    directory: Path

    @property
    def prior_path(self) -> Path:
        """The prior file (``ptyl finetune --prior`` takes it, or the directory)."""
        return self.directory / PRIOR_FILE

    @property
    def weights_path(self) -> Path | None:
        """The pretrained weights next to the prior (``None`` when the directory has none)."""
        path = self.directory / WEIGHTS_FILE
        return path if path.is_file() else None

    def load_weights_into(self, model: nn.Module) -> nn.Module:
        """Load the pretrained weights next to the prior into ``model``, every key and shape checked first.

        Args:
            model: the architecture the prior was learned on (``card.architecture``).

        Returns:
            ``model``.

        Raises:
            PriorFileError: the directory has no weights file.
            ParameterMismatchError: the weights belong to another model (names the file, the tensors and their
                shapes, expected vs found).
        """
        path = self.weights_path
        if path is None:
            raise PriorFileError(f"{self.directory}: no {WEIGHTS_FILE} (this prior was shared without weights)")
        state, _ = read_weights(path)
        return load_state_checked(model, state, path)

    def prior_kwargs(self) -> dict[str, Any]:
        """The card's recommended ``scale`` / ``eps`` / ``rank`` / ``head`` for :func:`ptyl.priors.make_prior`.

        Returns:
            Keyword arguments (those the card recommends).
        """
        keys = ("scale", "eps", "rank", "variance", "head_variance")
        out = {k: self.card.recommended[k] for k in keys if k in self.card.recommended}
        if self.card.head:
            out["head"] = self.card.head
        return out


def _card_from_metadata(posterior: SourcePosterior, card: PriorCard | dict[str, Any] | None) -> PriorCard:
    card = card if isinstance(card, PriorCard) else PriorCard.from_dict(dict(card or {}), "card")
    if not card.recommended:
        kind = PriorKind.LOWRANK
        defaults = kind.recipe.defaults
        card.recommended = {"kind": str(kind), kind.recipe.axis: defaults[kind.recipe.axis], "eps": defaults["eps"],
                            "note": "ptyl's defaults, not tuned for this prior"}
    meta = posterior.metadata
    excluded = meta.get("excluded") or []
    defaults = {"source": meta.get("source"), "architecture": meta.get("model") or meta.get("architecture"),
                "objective": meta.get("objective"), "rank": posterior.rank, "num_parameters": posterior.num_parameters,
                "head": meta.get("head") or (excluded[0] if len(excluded) == 1 else None)}
    for key, value in defaults.items():
        if getattr(card, key) is None:
            setattr(card, key, value)
    keep = ("num_snapshots", "swag_epochs", "swag_lr", "pretrain_epochs", "source_lr", "source_schedule",
            "num_source_examples", "image_size", "num_classes", "model_kwargs")
    card.extra = {**{k: meta[k] for k in keep if k in meta}, **card.extra}
    card.ptyl_version = __version__
    card.created = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    return card


def save_pretrained(directory: str | os.PathLike, posterior: SourcePosterior, *,
                    weights: nn.Module | dict[str, torch.Tensor] | None = None,
                    weights_metadata: dict[str, Any] | None = None, card: PriorCard | dict[str, Any] | None = None,
                    dtype: torch.dtype | str | None = None) -> Path:
    """Write a shareable prior directory (see the module docstring), all files or none.

    Args:
        directory: created if needed; existing files of the layout are replaced.
        posterior: the learned prior.
        weights: the pretrained weights downstream models start from (a module or a state dict), e.g. the SWA mean;
            ``weights_metadata`` says how to rebuild the model (``model``, ``model_kwargs``, ``num_classes``...).
        weights_metadata: metadata of the weights file (default: the posterior's).
        card: a :class:`PriorCard` or a dict of its fields; source, architecture, objective, rank, head and the
            parameter count default to the posterior's metadata.
        dtype: storage dtype of the prior file (``"bfloat16"`` halves it).

    Returns:
        The directory.
    """
    directory = Path(directory)
    card = _card_from_metadata(posterior, card)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_files():
        save_posterior(posterior, directory / PRIOR_FILE, dtype=dtype)
        if weights is not None:
            save_weights(weights, directory / WEIGHTS_FILE, {**posterior.metadata, **(weights_metadata or {})})
        atomic_write_text(directory / CARD_FILE, json.dumps(asdict(card), indent=2, sort_keys=False) + "\n")
        atomic_write_text(directory / README_FILE, card.to_markdown())
    stale = directory / WEIGHTS_FILE
    if weights is None and stale.is_file():
        stale.unlink()  # weights of an earlier prior would not belong to this one
    return directory


def _hub(what: str) -> Any:
    try:
        # optional dependency (the [hf] extra)
        import huggingface_hub
    except ImportError:
        raise ConfigError(f"{what} needs huggingface_hub: pip install huggingface_hub (or 'ptyl[hf]')") from None
    return huggingface_hub


def _download(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None) -> Path:
    hub = _hub(f"downloading the prior {repo_id!r} from the Hub")
    try:
        folder = hub.snapshot_download(repo_id=repo_id, revision=revision, cache_dir=cache_dir,
                                       allow_patterns=list(_FILES))
    except Exception as err:  # network, authentication, a missing repository: one error naming the repository
        raise PriorFileError(f"cannot download the prior {repo_id!r} from the Hugging Face Hub: "
                             f"{type(err).__name__}: {err}") from err
    return Path(folder)


def prior_file_path(path: str | os.PathLike) -> Path:
    """The prior file of ``path``: itself, or ``path/prior.safetensors`` for a prior directory.

    Args:
        path: a prior file or a directory written by :func:`save_pretrained`.

    Returns:
        The file's path (not checked).
    """
    path = Path(path)
    return path / PRIOR_FILE if path.is_dir() else path


def prior_file(path: str | os.PathLike) -> Path:
    """Deprecated name of :func:`prior_file_path` (it clashed with the module :mod:`ptyl.io.prior_file`).

    Args:
        path: a prior file or a prior directory.

    Returns:
        :func:`prior_file_path` of it.
    """
    warnings.warn("ptyl.io.pretrained.prior_file is deprecated: use ptyl.io.prior_file_path", DeprecationWarning,
                  stacklevel=2)
    return prior_file_path(path)


def from_pretrained(name_or_path: str | os.PathLike, *, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, verify: bool = True) -> PretrainedPrior:
    """Read a shared prior: a local directory (or its prior file), else a Hub repository ``owner/name``.

    Args:
        name_or_path: a directory written by :func:`save_pretrained`, or a Hub repository id.
        revision: Hub branch, tag or commit.
        cache_dir: Hub cache directory.
        verify: check the prior file's checksums.

    Returns:
        A :class:`PretrainedPrior` (posterior, card, directory).

    Raises:
        PriorFileError: a missing or damaged file (named), or a failed download.
    """
    path = Path(name_or_path)
    if path.is_file() and path.name == PRIOR_FILE:
        path = path.parent
    if not path.is_dir():
        if path.exists() or str(name_or_path).count("/") != 1 or str(name_or_path).startswith((".", "/")):
            raise PriorFileError(f"{name_or_path}: not a prior directory (expected {PRIOR_FILE} and {CARD_FILE})")
        path = _download(str(name_or_path), revision, cache_dir)
    if not (path / PRIOR_FILE).is_file():
        raise PriorFileError(f"{path}: no {PRIOR_FILE} (not a prior directory written by save_pretrained)")
    card_path = path / CARD_FILE
    if card_path.is_file():
        try:
            card = PriorCard.from_dict(json.loads(card_path.read_text(encoding="utf-8")), str(card_path))
        except json.JSONDecodeError as err:
            raise PriorFileError(f"{card_path}: not valid JSON ({err.msg})") from err
    else:
        card = PriorCard()
    posterior = load_posterior(path / PRIOR_FILE, verify=verify)
    return PretrainedPrior(posterior, card, path)


def push_to_hub(directory: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Upload a ptyl prior") -> str:
    """Upload a directory written by :func:`save_pretrained` to the Hugging Face Hub (creating the repository).

    Args:
        directory: the prior directory.
        repo_id: ``owner/name``.
        private: create a private repository.
        token: a Hub token (default: the logged-in user's).
        commit_message: the commit message.

    Returns:
        The URL of the commit.
    """
    directory = Path(directory)
    missing = [f for f in (PRIOR_FILE, CARD_FILE, README_FILE) if not (directory / f).is_file()]
    if missing:
        raise PriorFileError(f"{directory} lacks {missing}: write it with save_pretrained first")
    hub = _hub("pushing a prior to the Hub")
    api = hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message=commit_message,
                             allow_patterns=list(_FILES))
    return str(getattr(info, "commit_url", info))
