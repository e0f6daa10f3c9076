"""A classification prior for a segmentation task: KMNIST classifier -> per-pixel segmentation of MNIST canvases.

    python examples/segmentation.py                 # ~1 min on 1 CPU core
    python examples/segmentation.py --tune          # choose lambda / v by validation NLL first (~2 min)
    python examples/segmentation.py --quick         # a few seconds (smoke test: tiny data, numbers meaningless)

Steps (Shwartz-Ziv et al. 2022, https://arxiv.org/abs/2205.10279):

1. source: a SmallCNN classifier trained with cross-entropy on the 8,000 KMNIST train images, then SWAG while
   training goes on at a constant learning rate: a low-rank Gaussian over the trunk ``features.*`` (head excluded);
2. target: digit canvases built from MNIST images (the *other* data set): each pixel is labelled background or
   1 + the class of the digit covering it (``DigitCanvasSegmentation``, 11 classes);
3. ``SegmentationNet`` keeps the classifier's trunk under the same name ``features``, so the prior applies by name;
   its new ``decoder`` gets an isotropic N(0, 1) prior. We fine-tune under the learned prior N(mu, lam Sigma) and, for
   comparison, under standard N(0, v I), both from the same start (the SWAG mean), and report mIoU, pixel
   accuracy, per-pixel NLL and per-pixel ECE on test canvases made from the disjoint MNIST test split.

We fine-tune with Adam (``TrainConfig(optimizer="adam")``): with plain SGD at this budget the network learns
foreground vs background but not the digit classes. With ``--tune``, lambda and v are picked by
``ptyl.tuning.tune`` (3 trials each, per-pixel validation NLL on a random 80/20 split of the canvases,
then a refit on all of them); see ``benchmarks/accuracy/segmentation.py`` for the full comparison.
"""

import argparse
import math
from pathlib import Path

import torch

from ptyl.data import DigitCanvasSegmentation, few_shot_subset, load_dataset
from ptyl.io import load_posterior, save_posterior
from ptyl.metrics.segmentation import evaluate_segmentation
from ptyl.models import SmallCNN
from ptyl.models.segmentation import SegmentationNet
from ptyl.pipeline import learn_prior, pretrain
from ptyl.priors import make_prior
from ptyl.training import TrainConfig, fit
from ptyl.tuning import PriorSpec, default_grid, tune

parser = argparse.ArgumentParser(description="KMNIST classification prior -> MNIST canvas segmentation")
parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
parser.add_argument("--canvases", type=int, default=100, help="training canvases")
parser.add_argument("--out", default="runs/segmentation", help="folder for the prior file")
parser.add_argument("--scale", type=float, default=1e6, help="lambda: the learned prior's covariance multiplier")
parser.add_argument("--variance", type=float, default=1.0, help="v of the standard N(0, v I) baseline")
parser.add_argument("--tune", action="store_true", help="choose --scale / --variance by validation NLL")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--progress", action="store_true")
args = parser.parse_args()
torch.manual_seed(args.seed)
torch.set_num_threads(1)  # on a shared 2-core machine a second thread mostly waits at OpenMP barriers

# sizes: the full run vs the smoke test
width = 16
source_epochs, swag_epochs, rank, snapshots, batch = (3, 2, 10, 12, 256) if not args.quick else (1, 1, 2, 3, 64)
n_source = None if not args.quick else 256
n_train, n_test, steps = (args.canvases, 300, 800) if not args.quick else (8, 8, 4)
canvas = {"canvas_size": 28, "digits_per_canvas": (1, 1), "threshold": 0.3, "num_digit_classes": 10}

# ---------------------------------------------------------------------------------------------------- 1. source
source = load_dataset("kmnist", "train")
if n_source is not None:
    source = few_shot_subset(source, n_source // source.num_classes, seed=0)
classifier = SmallCNN(width=width)
pretrain(classifier, source, epochs=source_epochs, lr=0.1, batch_size=batch, progress=args.progress)
posterior = learn_prior(
    classifier, source, epochs=swag_epochs, lr=0.1, rank=rank, head="head", batch_size=batch,
    collect_every=max(1, swag_epochs * math.ceil(len(source) / batch) // snapshots),
    metadata={"source": "kmnist-train", "architecture": "SmallCNN"}, progress=args.progress,
)
path = save_posterior(posterior, Path(args.out) / "kmnist_classifier.safetensors")
print(f"prior: {path}, {posterior.num_parameters} trunk parameters, rank {posterior.rank}")
source_trunk = {k: v.clone() for k, v in classifier.state_dict().items() if not k.startswith("head.")}  # BN stats too

# ---------------------------------------------------------------------------------------------------- 2. target
mnist_train, mnist_test = load_dataset("mnist", "train"), load_dataset("mnist", "test")  # disjoint digit pools
train = DigitCanvasSegmentation(mnist_train.images, mnist_train.targets, n_train, seed=args.seed, **canvas)
test = DigitCanvasSegmentation(mnist_test.images, mnist_test.targets, n_test, seed=10_000, **canvas)
print(f"canvases: {len(train)} train, {len(test)} test, {train.num_classes} pixel classes, "
      f"{(train.masks > 0).float().mean():.1%} foreground pixels")

# ---------------------------------------------------------------------------------------------------- 3. fine-tune
prior_file = load_posterior(path)
lr = 5e-3
config = TrainConfig(epochs=max(1, math.ceil(steps / math.ceil(n_train / 10))), batch_size=10, lr=lr,
                     optimizer="adam", seed=args.seed, progress=args.progress)


def start_model() -> SegmentationNet:
    """Encoder = KMNIST trunk at the SWAG mean (names features.* match the prior); new decoder, same for both runs."""
    trunk = SmallCNN(width=width)
    trunk.load_state_dict(source_trunk, strict=False)
    prior_file.load_mean_into(trunk)
    torch.manual_seed(args.seed)
    return SegmentationNet(trunk, num_classes=train.num_classes, decoder_channels=16)


results = {}
for name, method, kwargs in [
    ("learned prior", "lowrank", {"posterior": prior_file, "scale": args.scale}),
    ("standard fine-tuning", "standard", {"variance": args.variance}),
]:
    if args.tune:  # canvases have masks, not labels: tune splits them at random and scores per-pixel NLL
        spec = PriorSpec(method, posterior=kwargs.get("posterior"), head="decoder", head_variance=1.0)
        tuned = tune(start_model, train, spec, default_grid(method, budget=3, lrs=(lr,)), config=config,
                     seed=args.seed, progress=args.progress)
        print(f"chosen for {name}: {tuned.best}")
        fitted = tuned.final  # refit on all training canvases with the chosen value
    else:
        model = start_model()
        prior = make_prior(model, method, head="decoder", head_variance=1.0, **kwargs)
        fitted = fit(model, train, prior, config, head="decoder")  # default objective: per-pixel cross-entropy
    results[name] = evaluate_segmentation(fitted.predict(test), test.masks)  # probs [N, 11, 28, 28]

print(f"MNIST canvases, {n_train} training canvases, {n_test} test canvases:")
for name, m in results.items():
    print(f"  {name:22s} mIoU {m['miou']:.3f}  pixel acc {m['pixel_accuracy']:.3f}  NLL {m['nll']:.3f}  "
          f"ECE {m['ece']:.3f}")
