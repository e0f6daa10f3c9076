import sys, time, math, json
sys.path.insert(0, "benchmarks/accuracy"); sys.path.insert(0, "benchmarks")
import torch
import pairs
from ptyl.pipeline import parse_method, pretrained_model_fn, train_config
from ptyl.tuning import PriorSpec
from ptyl.tuning.trials import TrialRunner, make_validation
torch.set_num_threads(1)
cfg = pairs.settings(pairs.parse_args([])); cfg["stem"] = "pairs"
pair = sys.argv[1] if len(sys.argv) > 1 else "mnist5k->mnist"
prior = str(pairs.prepare_sources({**cfg, "pairs": {pair: cfg["pairs"][pair]}}, print)[pair])
ctx = pairs.pair_context(cfg, pair, prior)
task = ctx["task"]
train = task.train_set(10, 0)
model_fn = pretrained_model_fn(ctx["meta"], ctx["state"], task, module=ctx["module"])
val = make_validation(train, val_set=task.validation_set(), test_set=task.test_set(0))
def runner(kind):
    plan = parse_method(kind)
    config = train_config(plan.inference, len(train), steps=500, batch_size=32, num_samples=10, temperature=0.01, lr=0.1, grad_clip=5.0)
    spec = PriorSpec(kind=plan.prior, posterior=ctx["posterior"] if plan.needs_posterior else None, head=task.head)
    return TrialRunner(model_fn, spec, config, val, objective=task.objective, collate_fn=task.collate_fn, evaluate=task.evaluate)
jobs = json.loads(sys.argv[2]) if len(sys.argv) > 2 else [["l2sp", {"variance": 1e-5, "lr": 0.1}]]
for kind, values in jobs:
    t = time.perf_counter()
    row, res = runner(kind)(values)
    print(kind, values, {k: round(row[k], 4) for k in ("val_nll", "test_nll", "test_accuracy", "final_loss", "std_ratio")}, f"{time.perf_counter()-t:.1f}s", flush=True)
    torch.save(res.model.state_dict() if hasattr(res, "model") else None, f"scratch/model_{kind}_{list(values.values())[0]}.pt")
