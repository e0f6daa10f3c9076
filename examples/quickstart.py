"""ptyl in one screen: learn a prior on KMNIST, save it, load it for an MNIST model, fine-tune, evaluate.

    python examples/quickstart.py                      # about two minutes on 2 shared CPU cores

The same with the command line: `ptyl learn-prior --data kmnist --out prior.safetensors` then
`ptyl finetune --prior prior.safetensors --data mnist --n-per-class 10 --out run/`; `ptyl demo` compares methods.
"""

import torch

import ptyl
from ptyl.data import few_shot_subset, load_dataset
from ptyl.metrics import evaluate_probs
from ptyl.models import SmallCNN, replace_head
from ptyl.pipeline import learn_prior, pretrain
from ptyl.training import TrainConfig, fit

torch.manual_seed(0)
out = "quickstart_prior.safetensors"

# 1. Source: pretrain on KMNIST, then keep training at a high constant lr while SWAG collects (rank 20).
source = load_dataset("kmnist", "train")
model = SmallCNN(width=16, num_classes=10)
pretrain(model, source, epochs=2, lr=0.05, batch_size=64)
posterior = learn_prior(model, source, epochs=1, lr=0.05, rank=20, collect_every=3, batch_size=64,
                        metadata={"source": "kmnist", "architecture": "smallcnn"})
ptyl.save_posterior(posterior, out)  # safetensors + JSON metadata, no pickle

# 2. Target: 10 MNIST images per class; start from the SWA mean with a fresh head.
train = few_shot_subset(load_dataset("mnist", "train"), n_per_class=10, seed=0)
test = load_dataset("mnist", "test")
posterior = ptyl.load_posterior(out)
posterior.load_mean_into(model)
torch.optim.swa_utils.update_bn(((x,) for x, _ in torch.utils.data.DataLoader(source, batch_size=256)), model)
replace_head(model, num_classes=10)

# 3. The prior N(mu, scale * Sigma_swag + eps I), matched to the model by parameter name (a prior for another
#    architecture raises ParameterMismatchError). load_prior gives the backbone part; make_prior adds N(0, I) on the
#    new head. fit minimises CE_mean - log p(theta) / N.
backbone_prior = ptyl.load_prior(out, model, scale=1e4)
print(f"-log p(backbone) at the prior mean: {float(backbone_prior.penalty(model)):.1f}")
prior = ptyl.make_prior(model, "lowrank", posterior=posterior, scale=1e4)
result = fit(model, train, prior, TrainConfig(inference="map", epochs=50, lr=0.1, batch_size=32))

# 4. Evaluate: accuracy, NLL, ECE, Brier on MNIST's test split.
metrics = evaluate_probs(result.predict(test), test.targets)
print({k: round(v, 4) for k, v in metrics.items()})
