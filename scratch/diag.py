import sys, time, math, json
sys.path.insert(0, "benchmarks/accuracy"); sys.path.insert(0, "benchmarks")
import torch
from torch.utils.data import DataLoader
import pairs
from ptyl.pipeline import parse_method, pretrained_model_fn, train_config
from ptyl.tuning import PriorSpec
from ptyl.tuning.trials import TrialRunner, make_validation
from ptyl.autotune.curvature import compute_curvature
from ptyl.autotune.likelihoods import Categorical
torch.set_num_threads(1)
cfg = pairs.settings(pairs.parse_args([])); cfg["stem"] = "pairs"
pair = sys.argv[1]; n = int(sys.argv[2])
prior = str(pairs.prepare_sources({**cfg, "pairs": {pair: cfg["pairs"][pair]}}, print)[pair])
ctx = pairs.pair_context(cfg, pair, prior)
task = ctx["task"]
train = task.train_set(n, 0)
model_fn = pretrained_model_fn(ctx["meta"], ctx["state"], task, module=ctx["module"])
val = make_validation(train, val_set=task.validation_set(), test_set=task.test_set(0))
steps = {10: 500, 100: 1000}.get(n, 1500)
def runner(kind):
    plan = parse_method(kind)
    config = train_config(plan.inference, len(train), steps=steps, batch_size=32, num_samples=10, temperature=0.01, lr=0.1, grad_clip=5.0)
    spec = PriorSpec(kind=plan.prior, posterior=ctx["posterior"] if plan.needs_posterior else None, head=task.head)
    return spec, TrialRunner(model_fn, spec, config, val, objective=task.objective, collate_fn=task.collate_fn, evaluate=task.evaluate)

def blocks_of(names):
    out = {}
    for nme in names:
        out.setdefault(nme.rsplit(".", 1)[0], []).append(nme)
    return out

def ggn_diag(model, names):
    curv = compute_curvature(model, DataLoader(train, batch_size=64), Categorical(), names, method="diag", fisher="exact")
    h = {}
    for b in curv.blocks:
        off = 0
        for nm, s in zip(b.names, b.shapes):
            k = math.prod(s); h[nm] = b.h[off:off+k]; off += k
    return h

def shares(prior_model_prior, G, names):
    bb = prior_model_prior.parts["backbone"] if "backbone" in prior_model_prior.parts else None
    res = {}
    if bb is None:
        return {"all": 0.0}
    a = bb.precision_diagonal().double()
    off = 0; A = {}
    for nm, s in zip(bb.names, bb.shapes):
        k = math.prod(s); A[nm] = a[off:off+k]; off += k
    tot_a = tot_g = 0.0; means = []
    for blk, nms in blocks_of(bb.names).items():
        sa = sum(float(A[x].sum()) for x in nms); sg = sum(float(G[x].double().sum()) for x in nms)
        res[blk] = sa / (sa + sg)
        tot_a += sa; tot_g += sg
        ga = torch.cat([G[x].double() for x in nms]); aa = torch.cat([A[x] for x in nms])
        means.append(float((aa/(aa+ga)).mean()))
    res["ALL"] = tot_a / (tot_a + tot_g)
    res["max"] = max(v for k, v in res.items() if k not in ("ALL",))
    res["meanshare_max"] = max(means)
    return res

jobs = json.loads(sys.argv[3])
G_off = None
for kind, values in jobs:
    spec, run = runner(kind)
    t = time.perf_counter()
    row, res = run(values)
    names = [x for x in ctx["posterior"].mean] if True else None
    torch.manual_seed(0); m0 = model_fn(); pr = spec.build_prior(m0, **{k: v for k, v in values.items() if k != "lr"})
    bbnames = list(pr.parts["backbone"].names) if "backbone" in pr.parts else None
    if bbnames is None:
        bbnames = [nm for nm, _ in res.model.named_parameters() if not nm.startswith(task.head)]
    G = ggn_diag(res.model, bbnames)
    if kind == "none":
        G_off = G
    s_self = shares(pr, G, bbnames)
    s_off = shares(pr, G_off, bbnames) if G_off is not None else None
    print(kind, values, {k: round(row[k], 4) for k in ("val_nll", "test_nll", "test_accuracy", "final_loss", "std_ratio")},
          "self:", {k: f"{v:.2e}" for k, v in s_self.items() if k in ("ALL", "max", "meanshare_max")},
          "off:", {k: f"{v:.2e}" for k, v in (s_off or {}).items() if k in ("ALL", "max", "meanshare_max")},
          "trG", f"{sum(float(g.sum()) for g in G.values()):.3g}", f"{time.perf_counter()-t:.1f}s", flush=True)
