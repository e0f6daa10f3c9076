"""Learn a self-supervised prior with SimCLR + SWAG on unlabelled KMNIST, then fine-tune on a few MNIST digits.

    python examples/simclr_prior.py                 # ~5 min on 2 CPU cores
    python examples/simclr_prior.py --quick         # a few seconds (smoke test: tiny data, numbers meaningless)

Steps (Shwartz-Ziv et al. 2022, https://arxiv.org/abs/2205.10279, with SimCLR, https://arxiv.org/abs/2002.05709):

1. source: the 8,000 KMNIST train images, labels ignored. A SmallCNN trunk inside ``SimCLRModel`` (trunk + MLP
   projection) is trained with the NT-Xent loss on two augmented views of every image;
2. prior: training goes on at a constant learning rate while SWAG collects over ``features.*`` (the projection head
   is excluded: it does not exist downstream). The posterior is saved with ``ptyl.io.save_posterior``; its metadata
   records ``objective: "simclr"``;
3. target: MNIST with ``--n`` images per class. A fresh SmallCNN loads the prior file, starts at the SWAG mean with a
   new head, and is fine-tuned under N(mu, lam Sigma) on the trunk + N(0, 1) on the head; for comparison, the same
   start under a plain N(0, v I) prior (standard fine-tuning). Test accuracy / NLL / ECE on the MNIST test split.
"""

import argparse
import math
from pathlib import Path

import torch

from ptyl.data import SimCLRAugment, few_shot_subset, load_dataset
from ptyl.io import load_posterior, read_metadata, save_posterior
from ptyl.metrics import evaluate_probs
from ptyl.models import SmallCNN
from ptyl.pipeline import learn_prior, pretrain
from ptyl.posterior.simclr import SimCLRModel, SimCLRObjective
from ptyl.priors import make_prior
from ptyl.training import TrainConfig, fit

parser = argparse.ArgumentParser(description="SimCLR source prior -> few-shot MNIST")
parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
parser.add_argument("--n", type=int, default=10, help="MNIST training images per class")
parser.add_argument("--out", default="runs/simclr_prior", help="folder for the prior file")
parser.add_argument("--scale", type=float, default=1e6, help="lambda: the learned prior's covariance multiplier")
parser.add_argument("--variance", type=float, default=1.0, help="v of the standard N(0, v I) baseline")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--progress", action="store_true")
args = parser.parse_args()
torch.manual_seed(args.seed)
torch.set_num_threads(min(2, torch.get_num_threads()))

# sizes: the full run vs the smoke test
width = 16
source_epochs, swag_epochs, rank, snapshots, batch = (5, 2, 10, 12, 256) if not args.quick else (1, 1, 2, 3, 64)
n_source = None if not args.quick else 256
finetune_steps = 150 if not args.quick else 5
n_test = None if not args.quick else 100

# ---------------------------------------------------------------------------------------------------- 1. source
source = load_dataset("kmnist", "train")  # labels are never used below
if n_source is not None:
    source = few_shot_subset(source, n_source // source.num_classes, seed=0)
classifier = SmallCNN(width=width)  # the trunk we want a prior for
simclr = SimCLRModel(classifier)  # shares classifier.features, adds the projection head
objective = SimCLRObjective(SimCLRAugment(image_size=28), temperature=0.5, seed=args.seed)
pretrain(simclr, source, epochs=source_epochs, lr=0.1, batch_size=batch, objective=objective,
         progress=args.progress)

# ---------------------------------------------------------------------------------------------------- 2. prior
collect_every = max(1, swag_epochs * math.ceil(len(source) / batch) // snapshots)
posterior = learn_prior(
    simclr, source, epochs=swag_epochs, lr=0.1, rank=rank, collect_every=collect_every, batch_size=batch,
    objective=objective, head=None, exclude=simclr.excluded_parameter_names(),  # projection.* stays behind
    metadata={"objective": "simclr", "source": "kmnist-train (labels unused)", "architecture": "SmallCNN"},
    progress=args.progress,
)
path = save_posterior(posterior, Path(args.out) / "kmnist_simclr.safetensors")
meta = read_metadata(path)
modules = ", ".join(sorted({n.split(".")[0] for n in posterior.names}))
print(f"prior: {path}, {posterior.num_parameters} parameters ({modules}.*), "
      f"rank {posterior.rank}, objective {meta['objective']!r}")
source_trunk = {k: v.clone() for k, v in classifier.state_dict().items() if not k.startswith("head.")}  # BN stats too

# ---------------------------------------------------------------------------------------------------- 3. target
target = few_shot_subset(load_dataset("mnist", "train"), args.n, seed=args.seed)
test = load_dataset("mnist", "test")
if n_test is not None:
    test = few_shot_subset(test, n_test // test.num_classes, seed=0)
prior_file = load_posterior(path)
config = TrainConfig(epochs=max(1, math.ceil(finetune_steps / math.ceil(len(target) / 32))), batch_size=32, lr=0.2,
                     seed=args.seed, progress=args.progress)


def start_model() -> SmallCNN:
    """SmallCNN at the SWAG mean of the SimCLR trunk, with a new random head (same head for both runs)."""
    torch.manual_seed(args.seed)
    model = SmallCNN(width=width)
    model.load_state_dict(source_trunk, strict=False)
    prior_file.load_mean_into(model)
    return model


results = {}
for name, method, kwargs in [
    ("SimCLR learned prior", "lowrank", {"posterior": prior_file, "scale": args.scale}),
    ("standard fine-tuning", "standard", {"variance": args.variance}),
]:
    model = start_model()
    prior = make_prior(model, method, head="head", head_variance=1.0, **kwargs)
    fitted = fit(model, target, prior, config)
    results[name] = evaluate_probs(fitted.predict(test), test.targets)

print(f"MNIST, {args.n} images per class, {len(test)} test images:")
for name, m in results.items():
    print(f"  {name:22s} accuracy {m['accuracy']:.3f}  NLL {m['nll']:.3f}  ECE {m['ece']:.3f}")
