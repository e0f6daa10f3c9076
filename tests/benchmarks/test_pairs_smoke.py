"""benchmarks/accuracy/pairs.py runs end to end in --quick mode, appends every trial atomically, resumes job by job
and trial by trial, and rejects bad input before it learns or writes anything."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ptyl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "accuracy" / "pairs.py"


def _module():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("pairs_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_run_writes_tables_stores_and_paired_intervals(quick_run):
    out, stdout = quick_run
    md = (out / "pairs_quick.md").read_text()
    data = json.loads((out / "pairs_quick.json").read_text())
    assert md.strip() in stdout and "## mnist5k->mnist" in md and "Δ test NLL, mean [95% CI]" in md
    assert data["complete"] and data["quick"] and data["command"].startswith("python benchmarks/accuracy/pairs.py")
    records = [json.loads(line) for line in (out / "pairs_quick_runs.jsonl").read_text().splitlines()]
    kinds = ("standard", "l2sp", "lowrank", "diag")
    assert sorted((r["method"], r["seed"]) for r in records) == sorted(
        (m, s) for m in (*kinds, "selected") for s in (0, 1))  # one kind-selection job per seed
    for r in records:
        assert r["validation_mode"] == "pool" and r["tuning"] == "grid" and r["split"]["val"] == 100
        assert {"final_loss", "fit_status", "std_ratio", "prior_share", "prior_off", "test_selected", "path"} <= set(r)
        axis = next(iter(k for k in r["selected"] if k != "lr"))
        assert r["edge_status"][axis] != "edge" and r["job_method"] == "selected"
    trials = (out / "pairs_quick_trials.jsonl").read_text().splitlines()
    assert len(trials) == sum(r["trials"] for r in records if r["method"] == "selected")  # the off limit once
    interval = data["tables"]["mnist5k->mnist n=2"][0]
    assert interval["method"] == "selected" and interval["reference"] == "standard"
    assert len(interval["nll_interval"]) == 3
    assert data["summary"][0]["pair"] == "mnist5k->mnist" and "guarantee_holds" in data["summary"][0]


def test_rerun_resumes_job_by_job_and_trial_by_trial(quick_run, capsys):
    out, _ = quick_run
    main = _module().main
    runs, trials = out / "pairs_quick_runs.jsonl", out / "pairs_quick_trials.jsonl"
    before = runs.read_text()
    assert main(["--quick", "--out", str(out)]) == 0
    assert "0 to run" in capsys.readouterr().out and runs.read_text() == before  # every job was done
    # an interrupted run: the job records are gone, a torn line ends the trials file -- every trial is replayed
    records = [json.loads(line) for line in before.splitlines()]
    runs.unlink()
    trial_count = len(trials.read_text().splitlines())
    with open(trials, "a") as fh:
        fh.write('{"pair": "mnist5k->mn')
    assert main(["--quick", "--out", str(out)]) == 0
    assert f"{len({(r['job_method'], r['seed']) for r in records})} to run" in capsys.readouterr().out
    assert len([line for line in trials.read_text().splitlines() if line.endswith("}")]) == trial_count
    again = {(r["method"], r["seed"]): r for r in map(json.loads, runs.read_text().splitlines())}
    assert len(again) == len(records)
    store = _module().JsonlStore(trials)
    store.append({"probe": 1})  # the torn line is ended first: the new row stays readable
    assert store.rows()[-1] == {"probe": 1}
    for r in records:
        assert again[(r["method"], r["seed"])]["nll"] == r["nll"]


def test_bad_input_fails_before_anything_is_written(tmp_path):
    main = _module().main
    with pytest.raises(ConfigError, match="unknown pair"):
        main(["--quick", "--out", str(tmp_path), "--pairs", "cifar->mnist"])
    with pytest.raises(ConfigError, match="unknown method"):
        main(["--quick", "--out", str(tmp_path), "--methods", "bogus"])
    with pytest.raises(ConfigError, match="tuning strategy"):
        main(["--quick", "--out", str(tmp_path), "--tuning", "oracle"])
    assert not list(tmp_path.iterdir())


def test_automatic_strategies_append_their_rows_next_to_the_grid(quick_run, capsys):
    """--tuning de-elbo / marglik: records in the same store, keyed apart from the grid's (pairs.md keeps the grid
    rows only), autotune md/json with the paired verdicts; a rerun resumes."""
    out, _ = quick_run
    main = _module().main
    runs, auto_runs = out / "pairs_quick_runs.jsonl", out / "pairs_quick_autotune_runs.jsonl"
    grid_md, grid_runs = (out / "pairs_quick.md").read_text(), runs.read_text()
    for strategy in ("de-elbo", "marglik"):
        assert main(["--quick", "--tuning", strategy, "--methods", "lowrank", "--out", str(out)]) == 0
    assert runs.read_text() == grid_runs  # the grid's store is not touched
    records = [json.loads(line) for line in runs.read_text().splitlines()]
    auto = [json.loads(line) for line in auto_runs.read_text().splitlines()]
    assert sorted((r["tuning"], r["seed"]) for r in auto) == [("de-elbo", 0), ("de-elbo", 1), ("marglik", 0),
                                                              ("marglik", 1)]
    for r in auto:
        assert r["validation_mode"] == "none" and r["trials"] == 1 and "pool_nll" in r and r["search_cost_s"] > 0
        assert {"scale", "head_variance"} <= set(r["selected"]) and r["key"] != records[0]["key"]
        assert ("bma" in r) == (r["tuning"] == "de-elbo") and r["command"].endswith(str(out))
        assert r["trial_wall_s"] > 0  # one grid trial timed in the same process, for the side-by-side ratio
    md = (out / "pairs_quick_autotune.md").read_text()
    data = json.loads((out / "pairs_quick_autotune.json").read_text())
    assert all(v["wall_ratio_same_process"] > 0 for c in data["cells"] for v in c["verdicts"])
    assert "grid (pool-selected)" in md and "| marglik |" in md
    assert set(data["summary"]) == {"de-elbo", "de-elbo (bma)", "marglik"}
    assert main(["--quick", "--out", str(out)]) == 0 and (out / "pairs_quick.md").read_text().split("\n", 5)[5] == \
        grid_md.split("\n", 5)[5]  # the grid's table ignores the automatic rows (only its header line moves)
    capsys.readouterr()
    assert main(["--quick", "--tuning", "marglik", "--methods", "lowrank", "--out", str(out)]) == 0
    assert "0 to run" in capsys.readouterr().out


def test_pool_strategies_choose_on_the_grids_pool_with_their_cost(quick_run):
    """--tuning continuation (and with --lrs, the learning rate too): the same pool as the grid, the path from the
    off limit, the N-aware diagnostic, one grid trial timed beside it; the report compares with the lambda x lr
    grid when lr was chosen."""
    out, _ = quick_run
    main = _module().main
    assert main(["--quick", "--tuning", "continuation", "--methods", "lowrank", "l2sp", "--out", str(out)]) == 0
    assert main(["--quick", "--tuning", "continuation", "--methods", "l2sp", "--lrs", "0.05", "0.1", "0.2",
                 "--out", str(out)]) == 0
    auto = [json.loads(line) for line in (out / "pairs_quick_autotune_runs.jsonl").read_text().splitlines()]
    mine = [r for r in auto if r["tuning"] == "continuation"]
    assert sorted((r["method"], len(r.get("lrs") or []), r["seed"]) for r in mine) == [
        ("l2sp", 0, 0), ("l2sp", 0, 1), ("l2sp", 3, 0), ("l2sp", 3, 1), ("lowrank", 0, 0), ("lowrank", 0, 1)]
    for r in mine:
        assert r["validation_mode"] == "pool" and r["split"]["val"] == 100 and r["val_nll"] == r["pool_nll"]
        axis = "scale" if r["method"] == "lowrank" else "variance"
        assert r["updates"][0][axis] == float("inf") and "prior_share" in r and r["trial_wall_s"] > 0
        assert (r["selected"].get("lr") in (0.05, 0.1, 0.2)) == bool(r.get("lrs"))
    data = json.loads((out / "pairs_quick_autotune.json").read_text())
    targets = {v["strategy"]: v["target_ratio"] for c in data["cells"] for v in c["verdicts"]}
    assert targets["continuation"] == 0.5 and targets["continuation (lr x3)"] == 0.25
    with pytest.raises(ConfigError, match="--lrs is for an automatic --tuning"):
        main(["--quick", "--tuning", "marglik", "--lrs", "0.1", "0.2", "--out", str(out)])


def test_bayesian_predictives_pair_with_the_map_under_the_same_prior(quick_run, capsys):
    """--methods lowrank-laplace lowrank-sgld: their own keys and knobs, the Laplace prior precision chosen on the pool,
    each paired with the selected job's lowrank record (NLL, accuracy and ECE intervals)."""
    out, _ = quick_run
    module = _module()
    assert module.main(["--quick", "--out", str(out), "--methods", "lowrank-laplace", "lowrank-sgld"]) == 0
    capsys.readouterr()
    records = {(r["method"], r["seed"]): r for r in map(json.loads, (out / "pairs_quick_runs.jsonl").read_text()
                                                       .splitlines())}
    for seed in (0, 1):
        laplace, sgld, mapped = (records[(m, seed)] for m in ("lowrank-laplace", "lowrank-sgld", "lowrank"))
        assert laplace["key"].startswith(mapped["key"] + "-") and laplace["key"] != sgld["key"]
        assert laplace["posthoc"]["laplace_prior_precision"] in module.LAPLACE_TAUS
        assert set(module.BAYES_AXES["sgld"]) <= set(sgld["selected"]) and sgld["fit_status"] == "sampled"
    data = json.loads((out / "pairs_quick.json").read_text())
    same = [row for row in data["tables"]["mnist5k->mnist n=2"] if row["reference"].startswith("MAP under the same")]
    assert {row["method"] for row in same} == {"lowrank-laplace", "lowrank-sgld"}
    assert all(len(row["ece_interval"]) == 3 and row["seeds"] == [0, 1] for row in same)


def test_head_variant_tunes_the_head_prior_and_pairs_with_the_map_at_head(quick_run, capsys):
    """--methods lowrank@head lowrank-sgld@head: the head prior's variance is a grid axis of both (its own job key),
    the sampler is paired with the MAP @head and the MAP @head with the same kind under the default head prior."""
    out, _ = quick_run
    module = _module()
    assert module.main(["--quick", "--out", str(out), "--methods", "lowrank@head", "lowrank-sgld@head"]) == 0
    capsys.readouterr()
    records = {(r["method"], r["seed"]): r for r in map(json.loads, (out / "pairs_quick_runs.jsonl").read_text()
                                                       .splitlines())}
    for seed in (0, 1):
        head, sgld, plain = (records[(m, seed)] for m in ("lowrank@head", "lowrank-sgld@head", "lowrank"))
        assert head["key"] != plain["key"] and "head_variance" in sgld["selected"]
        tried = {row["head_variance"] for row in head["validation"] if "head_variance" in row}
        assert tried >= set(module.HEAD_VARIANCES) and head["selected"]["head_variance"] in tried
        lo, hi = module.HEAD_BOUNDS  # the head axis is extended too: not left on an unextended edge
        assert head["edge_status"]["head_variance"] in ("interior", "lower bound", "upper bound")
        assert 10 ** lo <= min(tried) and max(tried) <= 10 ** hi
    rows = json.loads((out / "pairs_quick.json").read_text())["tables"]["mnist5k->mnist n=2"]
    refs = {row["method"]: row["reference"] for row in rows if row["method"].endswith("@head")}
    assert refs["lowrank-sgld@head"] == "MAP under the same prior (learned low-rank, head prior tuned)"
    assert refs["lowrank@head"] == "learned low-rank, head prior N(0, 1)"
    assert "head prior tuned" in (out / "pairs_quick.md").read_text()
