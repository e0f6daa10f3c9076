"""Learn a prior and fine-tune under it with the model sharded by FSDP2 (``fully_shard``): no rank ever holds the whole
model, the whole SWAG state or the whole prior.

    torchrun --nproc_per_node=2 examples/fsdp_transfer.py                      # 2 processes (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node=4 examples/fsdp_transfer.py --prior=out/fsdp_transfer/prior.safetensors.index.json
                                                                               # reuse a prior written by 2 ranks
    python examples/fsdp_transfer.py                                           # one process (a group of one)
    torchrun --nproc_per_node=2 examples/fsdp_transfer.py --epochs=40 --shots=50   # any setting: --name=value

1. Source (KMNIST): a SmallCNN, every conv and the head wrapped with ``fully_shard`` (then the root):
   each parameter is a DTensor holding a block of rows on each rank. Pretrain, then keep training at a constant
   learning rate while SWAG collects: every rank keeps the moments and deviation columns of ITS rows
   (``SWAGCollector`` on the sharded model; no gather). The ranks write the prior together in the Hugging Face
   layout: ``prior-0000r-of-0000W.safetensors`` (each rank its rows) + ``prior.safetensors.index.json``.
2. Downstream (MNIST-5k, ``shots`` images per class): a fresh sharded model; each rank reads only its rows of the
   prior file -- written by any number of ranks -- starts from the SWA mean (fresh head) and minimises
   CE_mean - log p(theta) / N under N(mu, scale * Sigma_swag + eps I) (Shwartz-Ziv et al. 2022, arXiv 2205.10279),
   a :class:`~ptyl.priors.ShardedPrior`: one all-reduce of k + 2 numbers per step, the gradient of the prior added
   once on each rank's rows after FSDP2's reduce-scatter averaged the data gradients. ``batch_size`` is GLOBAL.
3. Test accuracy / NLL / ECE (each rank scores an equal share of the test set, predictions gathered), per-rank bytes
   of the prior and SWAG state, wall times; rank 0 writes ``results.json``. The prior also works in one process:
   ``ptyl inspect out/fsdp_transfer/prior.safetensors.index.json``, ``ptyl finetune --prior <that index>``.

BatchNorm statistics are buffers, not sharded: each rank normalises with its own part of the batch (as under DDP),
so W processes come close to, not bit-equal with, one process. ``--batchnorm=False`` gives a model whose sharded run
computes the one-process run's updates (``tests/test_fsdp.py`` checks that to 1e-5), but it learns slower here.
"""

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, Subset

from ptyl import distributed as ddp
from ptyl.data import few_shot_subset, load_dataset
from ptyl.inference import collect_targets, predict_probs
from ptyl.io import load_posterior, save_posterior
from ptyl.metrics import evaluate_probs, save_json
from ptyl.models import build_model
from ptyl.pipeline import learn_prior, pretrain
from ptyl.priors import make_prior
from ptyl.training import TrainConfig, fit

# --- settings (override with --name=value) --------------------------------------------------------------------------
source = "kmnist"
target = "mnist5k"
width = 32  # SmallCNN channels (32: 56k parameters)
batchnorm = True  # False: a BatchNorm-free model, whose sharded run equals the one-process run
source_per_class = 200  # source images per class
pretrain_epochs = 2
swag_epochs = 3
swag_rank = 10
source_lr = 0.05
prior = ""  # an existing prior (single file or .index.json, written by any number of ranks): skip the source stage
shots = 20  # downstream images per class
epochs = 30
batch_size = 64  # global batch, split evenly over the processes
lr = 0.05
scale = 1e3  # lambda
eps = 1e-3
seed = 0
out_dir = "out/fsdp_transfer"
progress = True

exec(Path(__file__).with_name("configurator.py").read_text())  # --name=value overrides

# --- processes ------------------------------------------------------------------------------------------------------
device = ddp.init_from_env()  # cuda:LOCAL_RANK + nccl on GPUs, CPU + gloo otherwise
if not dist.is_initialized():  # one process without torchrun: a group of one, so fully_shard runs unchanged
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
world = dist.get_world_size()
out = Path(out_dir)


def log(*args):
    if ddp.is_main_process():
        print(*args, flush=True)


def timed_barrier() -> float:
    ddp.barrier()  # all ranks start/stop the clock together
    return time.perf_counter()


def sharded_model(seed: int):
    """A SmallCNN on ``device``, each conv and the head sharded, then the root (FSDP2's recipe)."""
    torch.manual_seed(seed)
    model = build_model("smallcnn", width=width, batchnorm=batchnorm).to(device)
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            fully_shard(module)
    return fully_shard(model)


def evaluate(model, dataset) -> dict[str, float]:
    """Every rank runs the same number of forward passes (FSDP2 all-gathers in each): rank r scores positions r,
    r + W, ... of the test set padded to a multiple of W; the gathered predictions are put back in order."""
    per_rank = math.ceil(len(dataset) / world)
    positions = [(ddp.rank() + i * world) % len(dataset) for i in range(per_rank)]
    shard = DataLoader(Subset(dataset, positions), batch_size=256)
    probs = ddp.gather_tensor(predict_probs(model, shard))  # rank 0's rows first
    targets = ddp.gather_tensor(collect_targets(shard))
    position = torch.tensor([r + i * world for r in range(world) for i in range(per_rank)])  # before wrapping
    keep = position < len(dataset)  # drops the padding
    order = torch.argsort(position[keep])
    return evaluate_probs(probs[keep][order], targets[keep][order])


def state_bytes(module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


try:
    log(f"{world} process(es) on {device}, FSDP2 over {dist.get_backend()}")
    # --- 1. source prior --------------------------------------------------------------------------------------------
    t0 = timed_barrier()
    swag_bytes = 0
    if not prior:
        source_train = few_shot_subset(load_dataset(source, "train"), source_per_class, seed)
        source_model = sharded_model(seed)
        pretrain(source_model, source_train, epochs=pretrain_epochs, lr=source_lr, batch_size=batch_size, seed=seed,
                 progress=progress)
        posterior = learn_prior(source_model, source_train, epochs=swag_epochs, lr=source_lr, rank=swag_rank,
                                batch_size=batch_size, collect_every=max(len(source_train) // batch_size // 4, 1),
                                seed=seed, progress=progress,
                                metadata={"source": source, "world_size": world, "model": "smallcnn", "num_classes": 10,
                                          "model_kwargs": {"width": width, "batchnorm": batchnorm}})
        swag_bytes = posterior.layout.local_numel * (16 + 4 * swag_rank)  # float64 mean + M2, float32 columns
        prior = str(save_posterior(posterior, out / "prior.safetensors"))  # every rank writes its rows
        log(f"source: {posterior.metadata['num_snapshots']} SWAG snapshots -> {prior}")
        del source_model, posterior
    source_s = timed_barrier() - t0

    # --- 2. downstream fine-tuning ----------------------------------------------------------------------------------
    train = few_shot_subset(load_dataset(target, "train"), shots, seed)
    test = load_dataset(target, "test")
    model = sharded_model(seed + 1)
    posterior = load_posterior(prior, map_location=device, shards=model)  # this rank's rows only
    posterior.load_mean_into(model)  # backbone = SWA mean, head stays freshly initialised
    prior_dist = make_prior(model, "lowrank", posterior=posterior, scale=scale, eps=eps)  # a ShardedPrior
    log(f"prior: {posterior.num_parameters:,} parameters, rank {posterior.rank}; this rank holds "
        f"{prior_dist.layout.local_numel:,} rows' worth ({state_bytes(prior_dist) / 2**10:.1f} KiB of prior state)")
    del posterior
    t0 = timed_barrier()
    result = fit(model, train, prior_dist, TrainConfig(inference="map", epochs=epochs, batch_size=batch_size, lr=lr,
                                                       seed=seed, progress=progress))
    finetune_s = timed_barrier() - t0

    # --- 3. evaluation ----------------------------------------------------------------------------------------------
    metrics = evaluate(model, test)
    per_rank = ddp.gather_tensor(torch.tensor([[state_bytes(prior_dist), swag_bytes]], dtype=torch.float64))
    summary = {
        "world_size": world, "device": str(device), "source_seconds": source_s, "finetune_seconds": finetune_s,
        "train_examples": len(train), "global_batch": batch_size, "final_train_loss": result.history[-1]["loss"],
        "prior_state_bytes_per_rank": per_rank[:, 0].tolist(), "swag_state_bytes_per_rank": per_rank[:, 1].tolist(),
        **{f"test_{k}": v for k, v in metrics.items()},
    }
    log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    ddp.run_on_main(save_json, out / "results.json", summary)
finally:
    ddp.cleanup()
