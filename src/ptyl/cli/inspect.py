"""``ptyl inspect``: what is in a prior file, or how much memory a prior for a model would take.

Every malformed file (unreadable, foreign, badly formed header, wrong dtype, failed checksum) is a ptyl error: one
``ptyl: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import os

import torch

from ptyl.cli._common import UsageError, add_common, dtype_name, model_kwargs, nonnegative_int, positive_int
from ptyl.io import load_prior_file
from ptyl.memory import estimate_report
from ptyl.models import available_models, build_model
from ptyl.pipeline import pretrained_weights_path


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show a prior file's contents, or estimate a prior's memory",
                              description="ptyl inspect PRIOR: metadata, rank, shapes and variance statistics of a "
                                          "prior file.  ptyl inspect --estimate MODEL --rank K: memory of SWAG "
                                          "collection and of the prior for that model.")
    p.add_argument("prior", nargs="?", help="prior file (.safetensors), or a sharded prior's .index.json")
    p.add_argument("--top", type=positive_int, default=20, help="show the first N parameter tensors [20]")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the SHA-256 checksums of a version-2 file (very large files; the environment variable "
                        "PTYL_VERIFY_CHECKSUMS=0 does the same)")
    p.add_argument("--estimate", metavar="MODEL",
                   help=f"estimate memory for this architecture instead ({', '.join(available_models())}, or "
                        "module:factory)")
    p.add_argument("--head", default="head", help="--estimate: the head module, left out of the prior [head]")
    p.add_argument("--rank", type=nonnegative_int, default=20, help="SWAG rank K for --estimate [20]")
    p.add_argument("--dtype", type=dtype_name, default="float32",
                   help="storage dtype (SWAG deviations, prior file, prior) for --estimate [float32]")
    p.add_argument("--width", type=positive_int, help="model width for --estimate")
    p.add_argument("--num-classes", type=positive_int, default=10, help="classes of the model for --estimate [10]")
    p.add_argument("--world-size", type=positive_int, default=1,
                   help="--estimate per rank for W ranks sharding the model with FSDP2 (fully_shard) [1]")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.estimate:
        return _estimate(args)
    if not args.prior:
        raise UsageError("'ptyl inspect' needs a PRIOR file or --estimate MODEL")
    return _inspect(args)


def _estimate(args: argparse.Namespace) -> int:
    kwargs = model_kwargs(args)
    with torch.device("meta"):  # shapes only: no memory is allocated, however wide the model
        model = build_model(args.estimate, num_classes=args.num_classes, **kwargs)
    dtype = getattr(torch, args.dtype)
    print(f"model: {args.estimate} {kwargs or ''}".rstrip())
    print(estimate_report(model, args.rank, dtype, head=args.head, posterior_dtype=dtype, world_size=args.world_size))
    return 0


def _stats(t) -> str:
    """``min median max`` of a tensor's values, blank for an empty tensor."""
    flat = t.detach().float().reshape(-1)
    if flat.numel() == 0:
        return f"{'-':>10} {'-':>10} {'-':>10}"
    return f"{float(flat.min()):>10.3e} {float(flat.median()):>10.3e} {float(flat.max()):>10.3e}"


def _checksums(loaded) -> str:
    if loaded.format_version < 2:
        return "none (format version 1)"
    if loaded.checksums_verified:
        return f"verified (SHA-256 of {len(loaded.metadata['tensors'])} tensors)"
    return "not verified (--no-verify or PTYL_VERIFY_CHECKSUMS=0)"


def _inspect(args: argparse.Namespace) -> int:
    path = args.prior
    loaded = load_prior_file(path, verify=False if args.no_verify else None)
    meta, post = loaded.metadata, loaded.posterior
    shown = {"source", "architecture", "model", "model_kwargs", "objective", "num_classes", "image_size",
             "num_snapshots", "rank", "dtype", "created", "swag_epochs", "swag_lr", "pretrain_epochs"}
    size = sum(os.path.getsize(f) for f in {os.path.abspath(f) for f in (*loaded.files, path)}) / 1024
    print(f"prior file: {path} ({size:.1f} KiB, format version {loaded.format_version})")
    if meta.get("num_shards"):
        print(f"sharded: {len(loaded.files)} shard files written by {meta['num_shards']} ranks "
              f"({', '.join(f.name for f in loaded.files[:3])}{', ...' if len(loaded.files) > 3 else ''})")
    print(f"checksums: {_checksums(loaded)}")
    for key in ("source", "architecture", "model_kwargs", "objective", "num_classes", "image_size", "dtype",
                "num_snapshots", "pretrain_epochs", "swag_epochs", "swag_lr", "created"):
        if key in meta:
            print(f"{key}: {meta[key]}")
    print(f"rank: {post.rank}")
    print(f"parameters: {post.num_parameters:,} in {len(post.names)} tensors")
    weights = pretrained_weights_path(path)
    print(f"pretrained weights: {weights.name} ({'found' if weights.is_file() else 'missing'})")
    internal = ("format", "format_version", "parameters", "tensors", "num_shards")
    others = {k: v for k, v in meta.items() if k not in shown and k not in internal}
    if others:
        print("other metadata: " + ", ".join(f"{k}={v}" for k, v in others.items()))
    header = (f"{'name':<32} {'shape':<18} {'numel':>8} {'var min':>10} {'var median':>10} {'var max':>10} "
              f"{'dev norm':>9}")
    print()
    print(header)
    print("-" * len(header))
    for name in post.names[: args.top]:
        dev = float(post.deviations[name].float().norm()) if post.rank else 0.0
        shape = "x".join(map(str, post.shapes[name])) or "scalar"
        print(f"{name:<32} {shape:<18} {post.mean[name].numel():>8,} {_stats(post.variance[name])} {dev:>9.3f}")
    if len(post.names) > args.top:
        print(f"... {len(post.names) - args.top} more tensors (--top N shows more)")
    allvar = torch.cat([v.float().reshape(-1) for v in post.variance.values()])
    print(f"{'all':<32} {'':<18} {allvar.numel():>8,} {_stats(allvar)}")
    return 0
