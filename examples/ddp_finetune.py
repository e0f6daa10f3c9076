"""Learn a prior on a source task, then fine-tune under it, data-parallel with DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/ddp_finetune.py                        # 2 processes (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node=2 examples/ddp_finetune.py --prior=out/ddp_finetune/prior.safetensors  # reuse a prior
    python examples/ddp_finetune.py                                             # the same run in one process
    torchrun --nproc_per_node=2 examples/ddp_finetune.py --epochs=40 --shots=50 # any setting below: --name=value

1. Source (KMNIST): pretrain a small CNN, then keep training at a constant learning rate while SWAG collects over
   the backbone (rank 0 collects, every rank gets the posterior). Rank 0 writes it to ``prior.safetensors``.
2. Downstream (MNIST-5k, ``shots`` images per class): start from the SWA mean, fresh head, and minimise
   CE_mean - log p(theta) / N under the learned low-rank prior N(mu, scale * Sigma_swag + eps I)
   (Shwartz-Ziv et al. 2022, arXiv 2205.10279). ``batch_size`` is the GLOBAL batch: each of W ranks reads
   batch_size / W examples, DDP averages the gradients, and the prior term is counted once (see ptyl.distributed).
3. Test accuracy / NLL / ECE: each rank scores every W-th test image; predictions are gathered across ranks.
   Rank 0 writes ``results.json`` with the timings.

BatchNorm statistics are per rank on the CPU (SyncBatchNorm needs GPUs; it is switched on there), so a run with W
processes is close to, not bit-equal with, a one-process run; tests/test_distributed.py checks exact equality on a
model without BatchNorm.
"""

import time
from pathlib import Path

import torch
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
width = 16  # SmallCNN channels
source_per_class = 200  # source images per class
pretrain_epochs = 2
swag_epochs = 3
swag_rank = 10
source_lr = 0.05
prior = ""  # path of an existing prior file: skip the source stage
shots = 20  # downstream images per class
epochs = 30
batch_size = 64  # global batch, split evenly over the processes
lr = 0.05
scale = 1e3  # lambda
eps = 1e-3
seed = 0
out_dir = "out/ddp_finetune"
progress = True

exec(Path(__file__).with_name("configurator.py").read_text())  # --name=value overrides

# --- processes ------------------------------------------------------------------------------------------------------
device = ddp.init_from_env()  # no-op without torchrun; cuda:LOCAL_RANK + nccl on GPUs, CPU + gloo otherwise
world = ddp.world_size()
torch.manual_seed(seed)
out = Path(out_dir)


def log(*args):
    if ddp.is_main_process():
        print(*args, flush=True)


def timed_barrier() -> float:
    ddp.barrier()  # all ranks start/stop the clock together
    return time.perf_counter()


def evaluate(model, dataset) -> dict[str, float]:
    shard = DataLoader(Subset(dataset, range(ddp.rank(), len(dataset), world)), batch_size=256)
    probs = ddp.gather_tensor(predict_probs(model, shard))  # no padding: every test image counted once
    targets = ddp.gather_tensor(collect_targets(shard))
    return evaluate_probs(probs, targets)


log(f"{world} process(es) on {device} ({'nccl' if device.type == 'cuda' else 'gloo' if world > 1 else 'no DDP'})")

# --- 1. source prior ------------------------------------------------------------------------------------------------
t0 = timed_barrier()
if prior:
    posterior = load_posterior(prior, map_location=device)
    log(f"loaded prior {prior}: {posterior.num_parameters} parameters, rank {posterior.rank}")
else:
    source_train = few_shot_subset(load_dataset(source, "train"), source_per_class, seed)
    source_model = build_model("smallcnn", width=width).to(device)
    pretrain(source_model, source_train, epochs=pretrain_epochs, lr=source_lr, batch_size=batch_size, seed=seed,
             progress=progress)
    posterior = learn_prior(source_model, source_train, epochs=swag_epochs, lr=source_lr, rank=swag_rank,
                            batch_size=batch_size, collect_every=max(len(source_train) // batch_size // 4, 1),
                            seed=seed, progress=progress, metadata={"source": source, "world_size": world})
    prior = str(out / "prior.safetensors")
    ddp.run_on_main(save_posterior, posterior, prior)  # rank 0 writes, the others wait
    log(f"source: {posterior.metadata['num_snapshots']} SWAG snapshots -> {prior}")
source_s = timed_barrier() - t0

# --- 2. downstream fine-tuning --------------------------------------------------------------------------------------
train = few_shot_subset(load_dataset(target, "train"), shots, seed)
test = load_dataset(target, "test")
torch.manual_seed(seed)  # the same head initialisation whether the prior was learned above or loaded
model = build_model("smallcnn", width=width).to(device)
posterior.load_mean_into(model)  # backbone = SWA mean, head stays freshly initialised
if device.type == "cuda":
    model = ddp.wrap_model(model, sync_batchnorm=True)  # fit() trains an already-wrapped model as it is
prior_dist = make_prior(ddp.unwrap_model(model), "lowrank", posterior=posterior, scale=scale, eps=eps).to(device)
t0 = timed_barrier()
result = fit(model, train, prior_dist, TrainConfig(inference="map", epochs=epochs, batch_size=batch_size, lr=lr,
                                                   seed=seed, progress=progress),
             checkpoint=out / "finetune.pt")
finetune_s = timed_barrier() - t0

# --- 3. evaluation --------------------------------------------------------------------------------------------------
metrics = evaluate(ddp.unwrap_model(model), test)
summary = {
    "world_size": world, "device": str(device), "source_seconds": source_s, "finetune_seconds": finetune_s,
    "train_examples": len(train), "global_batch": batch_size, "final_train_loss": result.history[-1]["loss"],
    **{f"test_{k}": v for k, v in metrics.items()},
}
log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
ddp.run_on_main(save_json, out / "results.json", summary)
ddp.cleanup()
