"""The public API documents its arguments and return values (``Args:`` / ``Returns:`` sections, Google style).

Checked for everything the redesigned packages export from their ``__init__``: functions, classes (``Args:`` or
``Attributes:``) and their public methods (hooks that only override a documented base method are exempt).
"""

from __future__ import annotations

import importlib
import inspect

PACKAGES = ("ptyl.training", "ptyl.tuning", "ptyl.pipeline", "ptyl.inference", "ptyl.priors", "ptyl.io",
            "ptyl.posterior", "ptyl.sharding", "ptyl.io.sharded_prior", "ptyl.io.sharded_read")
MODULE_PREFIXES = ("ptyl.training", "ptyl.tuning", "ptyl.pipeline", "ptyl.inference", "ptyl.priors.registry",
                   "ptyl.priors.factory", "ptyl.priors.learned", "ptyl.priors.block", "ptyl.io.weights",
                   "ptyl.io.samples", "ptyl.io.checkpoint", "ptyl.validation", "ptyl.priors.sharded",
                   "ptyl.io.sharded_prior", "ptyl.io.sharded_read", "ptyl.sharding", "ptyl.posterior.sharded")
HOOKS = {"setup", "data_loss", "add_prior_grad", "on_step", "on_epoch", "finalize", "callbacks", "validate",
         "adapt_to_budget", "on_fit_start",
         "on_step_end", "on_epoch_end", "on_fit_end", "state_dict", "load_state_dict", "extra_repr", "forward",
         "train_set", "test_set", "targets", "evaluate", "adapt", "scratch", "metadata", "wrap", "from_metadata",
         "add_arguments", "from_args", "source_setup", "model_kwargs",
         "step", "get_lr"}


def _gaps(qualname: str, fn, doc: str, inherited_hook: bool) -> list[str]:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    params = [p for p in signature.parameters if p not in ("self", "cls")]
    returns = signature.return_annotation not in (inspect.Signature.empty, None, "None")
    out = []
    if not doc:
        out.append(f"{qualname}: no docstring")
    elif not inherited_hook:
        if len(params) > 1 and "Args:" not in doc:
            out.append(f"{qualname}: no Args section")
        if len(params) == 1 and "Args:" not in doc and f"``{params[0]}``" not in doc:
            out.append(f"{qualname}: its argument {params[0]!r} is not described")
        if returns and "Returns:" not in doc and not doc.split("\n")[0].rstrip(".").endswith(
                tuple(["``", ")", "'"])) and "Returns" not in doc:
            out.append(f"{qualname}: no Returns section")
    return out


def test_public_api_documents_arguments_and_returns():
    problems, seen = [], set()
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if id(obj) in seen or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            seen.add(id(obj))
            if not obj.__module__.startswith(MODULE_PREFIXES):
                continue
            if inspect.isfunction(obj):
                problems += _gaps(obj.__qualname__, obj, inspect.getdoc(obj) or "", False)
                continue
            init = [p for p in inspect.signature(obj).parameters if p not in ("self", "args", "kwargs")]
            doc = inspect.getdoc(obj) or ""
            if not doc:
                problems.append(f"{obj.__qualname__}: no docstring")
            elif init and "Args:" not in doc and "Attributes:" not in doc and not issubclass(obj, str):
                problems.append(f"{obj.__qualname__}: constructor arguments not described")
            for attr, member in vars(obj).items():
                fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                if attr.startswith("_") or not inspect.isfunction(fn):
                    continue
                hook = attr in HOOKS and any(attr in vars(base) for base in obj.__mro__[1:])
                problems += _gaps(f"{obj.__qualname__}.{attr}", fn, inspect.getdoc(fn) or "", hook)
    assert problems == [], "\n".join(problems)
