"""The grid runner: which cells are missing, running them once, resuming after an interruption, and the engines."""

import pytest

import unitlib.experiment as experiment_module
from unitlib import results
from unitlib.book import grid
from unitlib.config import profile


def test_select_items_by_section_table_or_all():
    refs = lambda items: [i.ref for i in items]
    assert refs(grid.select_items(tables=["8"])) == ["Table 8"]
    assert refs(grid.select_items(tables=["table 11", "Fig. 12"])) == ["Table 11", "Fig. 12"]
    assert refs(grid.select_items(tables=["fig13"])) == ["Fig. 13"]
    assert set(refs(grid.select_items(sections=["a5_ablations"]))) == {
        "Table 7", "Table 8", "Table 9", "Table 10", "Table 11", "Table 12", "Fig. 12", "Fig. 13", "Fig. 14"}
    assert "A.1" in refs(grid.select_items(everything=True))
    with pytest.raises(ValueError, match="unknown table or figure '13'; valid choices: A.1, Table 3"):
        grid.select_items(tables=["13"])
    with pytest.raises(ValueError, match="unknown section\\(s\\) a9; valid choices: a1_attacks"):
        grid.select_items(sections=["a9"])
    with pytest.raises(ValueError, match="nothing selected"):
        grid.select_items()
    with pytest.raises(ValueError, match="not both"):
        grid.select_items(tables=["8"], everything=True)


def test_plan_refuses_bad_profile_and_seeds():
    items = grid.select_items(tables=["11"])
    with pytest.raises(ValueError, match="unknown profile 'gpu'; valid choices: smoke"):
        grid.plan("gpu", items)
    with pytest.raises(ValueError, match="seeds must be one or more ints >= 0"):
        grid.plan("smoke", items, seeds=[-1])


def test_a_defense_filter_plans_only_those_defenses_cells():
    items = grid.select_items(tables=["Table 9"])
    full = grid.plan("smoke", items, results_dir="/nonexistent")
    by_defense = {}
    for job in full.jobs:
        by_defense.setdefault("none" if job.undefended else job.experiment.defense, []).append(job)
    assert {"fp", "nad", "anp", "unit"} <= set(by_defense)
    quick = grid.plan("smoke", items, results_dir="/nonexistent", defenses=["FP", "nad"])
    assert quick.jobs == [job for job in full.jobs if job in by_defense["fp"] + by_defense["nad"]]
    assert (quick.n_cells, quick.n_done) == (full.n_cells, full.n_done)  # the table's count is the table's
    # without 'none', a model whose other cells are filtered out is not trained for its No Defense cell alone
    assert not any(job.undefended for job in quick.jobs)
    with pytest.raises(ValueError, match="unknown defense\\(s\\) 'fine-tune'; valid choices: anp, clp"):
        grid.plan("smoke", items, defenses=["fine-tune"])


def test_grid_runs_the_missing_cells_once_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    items = grid.select_items(tables=["11"])
    first = grid.plan("smoke", items, results_dir=tmp_path)
    # Table 11 at smoke: no defense and UNIT at each of the five budgets, on one backdoored model; the defended runs
    # record the undefended model too, so no separate no-defense job is planned
    assert len(first.jobs) == 5 and len(first.groups()) == 1
    assert not any(job.undefended for job in first.jobs)
    assert all("degradation" in job.label or "unit" in job.label for job in first.jobs)

    real_run, calls = experiment_module.run, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user stops the grid during its third cell
        return real_run(*args, **kwargs)

    monkeypatch.setattr(experiment_module, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        grid.run_grid(first, results_dir=tmp_path, progress=False, log=lambda *a: None)
    assert len(results.load_all(tmp_path)) == 2  # the two finished cells kept their records
    monkeypatch.setattr(experiment_module, "run", real_run)

    resumed = grid.plan("smoke", items, results_dir=tmp_path)
    assert len(resumed.jobs) == 3 and resumed.n_done == first.n_done + 3  # two runs, and the no-defense cell
    lines = []
    out = grid.run_grid(resumed, results_dir=tmp_path, progress=False, log=lines.append)
    assert [e["ok"] for e in out] == [True] * 3
    assert all(line.startswith("done ") and " s: acc " in line for line in lines)
    assert grid.plan("smoke", items, results_dir=tmp_path).jobs == []


def test_a_failed_cell_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    items = grid.select_items(tables=["11"])
    the_plan = grid.plan("smoke", items, results_dir=tmp_path)
    real_run = experiment_module.run

    def fails_on_budget_five(exp, **kwargs):
        if exp.defense_params.get("degradation") == 0.05:
            raise FloatingPointError("non-finite loss")
        return real_run(exp, **kwargs)

    monkeypatch.setattr(experiment_module, "run", fails_on_budget_five)
    lines = []
    out = grid.run_grid(the_plan, results_dir=tmp_path, progress=False, log=lines.append)
    assert sum(not e["ok"] for e in out) == 1 and sum(e["ok"] for e in out) == 4
    assert any(line.startswith("FAILED ") and "FloatingPointError: non-finite loss" in line for line in lines)
    assert len(grid.plan("smoke", items, results_dir=tmp_path).jobs) == 1


def test_engines_and_workers_are_checked(tmp_path):
    the_plan = grid.plan("smoke", grid.select_items(tables=["11"]), results_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown engine 'spark'; valid choices: local, ray, dask"):
        grid.run_grid(the_plan, engine="spark", progress=False)
    with pytest.raises(ValueError, match="workers must be an int >= 1, got 0"):
        grid.run_grid(the_plan, workers=0, progress=False)


@pytest.mark.parametrize("engine", ["ray", "dask"])
def test_a_missing_engine_says_how_to_get_it(engine, tmp_path, monkeypatch):
    import importlib

    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith(engine) else real_import(name, *a))
    the_plan = grid.plan("smoke", grid.select_items(tables=["11"]), results_dir=tmp_path)
    with pytest.raises(RuntimeError, match=f"engine '{engine}' needs the {engine} package"):
        grid.run_grid(the_plan, engine=engine, progress=False)


def test_a_local_dask_cluster_of_two_workers_runs_a_smoke_grid_and_the_driver_writes_the_records(tmp_path):
    import os

    distributed = pytest.importorskip("distributed")
    the_plan = grid.plan("smoke", grid.select_items(tables=["Fig. 13"]), results_dir=tmp_path)
    assert len(the_plan.groups()) >= 2  # one task per backdoored model
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        out = grid.run_grid(the_plan, engine="dask", address=cluster.scheduler_address, results_dir=tmp_path,
                            progress=False, log=lambda *a: None)
    assert all(e["ok"] for e in out), [e.get("error") for e in out]
    assert len(out) == len(the_plan.jobs)
    assert all(e["pid"] != os.getpid() for e in out)  # the cells ran in the cluster's worker processes
    written = {e["path"] for e in out}  # each record written by the driver, from what its worker sent back
    assert written == {str(p) for p in tmp_path.glob("*.json")} and len(written) == len(the_plan.jobs)
    assert {results.load(p).key for p in written} == {job.experiment.key() for job in the_plan.jobs}
    assert grid.plan("smoke", grid.select_items(tables=["Fig. 13"]), results_dir=tmp_path).jobs == []


def test_workers_run_groups_in_parallel_processes(tmp_path):
    items = grid.select_items(tables=["Fig. 13"])
    the_plan = grid.plan("smoke", items, results_dir=tmp_path)
    assert len(the_plan.groups()) >= 2  # one backdoored model per target label
    out = grid.run_grid(the_plan, workers=2, results_dir=tmp_path, progress=False, log=lambda *a: None)
    assert all(e["ok"] for e in out), [e.get("error") for e in out]
    assert grid.plan("smoke", items, results_dir=tmp_path).jobs == []


def test_the_schedule_trains_each_model_once_then_spreads_its_cells_over_the_free_workers():
    a, b, c, d, e = ({"cell": n} for n in "abcde")
    schedule = grid.Schedule([[a, b, c], [d], [e]])
    first, second = schedule.next(), schedule.next()
    assert first == ([a], [b, c]) and second == ([d], [])  # two models start, one cell each
    schedule.finished(*second[1:], [{"ok": True}])
    schedule.finished(first[1], [{"ok": True}])  # a's model is cached: b and c are independent cells now
    # they go before the next model, each on its own, so two workers run them side by side
    assert [schedule.next(), schedule.next(), schedule.next()] == [([b], []), ([c], []), ([e], [])]
    assert schedule.next() is None
    # a group whose first cell failed (no model): the rest one at a time, each waiting for the one before; after
    # the time limit nothing new starts, not even the rest of a group
    schedule = grid.Schedule([[a, b, c], [d]])
    unit = schedule.next()
    schedule.finished(unit[1], [{"ok": False}])
    assert schedule.next(may_start=False) is None
    unit = schedule.next()
    assert unit == ([b], [c])
    schedule.finished(unit[1], [{"ok": False}])
    assert schedule.next(may_start=False) is None
    assert schedule.next() == ([c], []) and schedule.next() == ([d], []) and schedule.next() is None
    # a group whose model is already cached has no first cell to wait for: each cell is a unit from the start
    schedule = grid.Schedule([[a, b, c], [d, e]], cached=[True, False])
    assert [schedule.next() for _ in range(4)] == [([a], []), ([b], []), ([c], []), ([d], [e])]
    with pytest.raises(ValueError, match="one flag per group: 1 flag"):
        grid.Schedule([[a], [b]], cached=[True])


def test_two_workers_share_one_models_cells_and_train_it_once(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path / "cache"))  # no model of this grid cached yet
    items = grid.select_items(tables=["11"])
    the_plan = grid.plan("smoke", items, results_dir=tmp_path / "records")
    assert len(the_plan.groups()) == 1 and len(the_plan.jobs) == 5
    assert grid.models_in_cache(the_plan.groups()) == [False]
    lines: list[str] = []
    out = grid.run_grid(the_plan, workers=2, results_dir=tmp_path / "records", progress=False, log=lines.append)
    assert all(e["ok"] for e in out), [e.get("error") for e in out]
    assert not any("already in the model cache" in line for line in lines)
    records = [results.load(p) for p in (tmp_path / "records").glob("*.json")]
    assert len(records) == 5
    assert sorted(r.provenance["model_from_cache"] for r in records) == [False, True, True, True, True]
    assert len({r.provenance["weights_sha256"] for r in records}) == 1
    assert grid.plan("smoke", items, results_dir=tmp_path / "records").jobs == []
    # The same grid into another folder: the model is cached now, so no cell waits for a first one to train it.
    again = grid.plan("smoke", items, results_dir=tmp_path / "again")
    assert len(again.jobs) == 5 and grid.models_in_cache(again.groups()) == [True]
    lines.clear()
    out = grid.run_grid(again, workers=2, results_dir=tmp_path / "again", progress=False, log=lines.append)
    assert all(e["ok"] for e in out), [e.get("error") for e in out]
    assert "1 of 1 backdoored model(s) already in the model cache" in lines[0]
    records = [results.load(p) for p in (tmp_path / "again").glob("*.json")]
    assert len(records) == 5 and all(r.provenance["model_from_cache"] for r in records)


def test_estimate_uses_the_measured_seconds_of_earlier_records_at_the_profile(tmp_path):
    import json
    from pathlib import Path

    items = grid.select_items(tables=["11"])
    the_plan = grid.plan("smoke", items, results_dir=tmp_path)
    assert grid.estimate(the_plan, results_dir=tmp_path).describe().startswith("estimate: no record")
    template = json.loads(next(Path(results.RESULTS_DIR).glob("*__unit__*.json")).read_text())
    for i, (defense, train, seconds) in enumerate([("unit", 10.0, 2.0), ("unit", 30.0, 4.0), ("fp", 20.0, 100.0)]):
        rec = json.loads(json.dumps(template))
        rec["config"].update(profile="smoke", attack="blend", defense=defense, defense_params={}, seed=i)
        rec["key"] = f"{i:064x}"
        rec["seconds"] = {"train": train, "defense": seconds, "eval_after": 1.0}
        rec["provenance"]["model_from_cache"] = False
        (tmp_path / f"r{i}.json").write_text(json.dumps(rec))
    est = grid.estimate(the_plan, results_dir=tmp_path)
    assert est.records == 3 and est.train_s == 20.0 and est.models == 1 and not est.unknown
    # each of the five UNIT cells: the median UNIT defense time (3 s) plus the median evaluation (1 s)
    assert est.cells_s == pytest.approx(5 * (3.0 + 1.0))
    assert est.total_s == pytest.approx(20.0 + 20.0)
    assert "1 model(s) x 20 s of training" in est.describe()
    # a copy of the repository's records passed as the results directory counts each experiment once
    cpu_here = len(grid.profile_records("cpu"))
    assert cpu_here and len(grid.profile_records("cpu", results.RESULTS_DIR)) == cpu_here


def test_training_estimates_scale_with_the_models_multiply_adds_images_and_epochs():
    cpu = profile("cpu")
    assert grid.training_scale(cpu, cpu) == 1.0
    assert grid.training_scale(cpu.replace(epochs=16), cpu) == pytest.approx(2.0)
    assert grid.training_scale(cpu.replace(train_size=10_000), cpu) == pytest.approx(0.2)
    # channels x2: about 4x the multiply-adds (the stem's input and the head grow only 2x)
    assert 3.5 < grid.training_scale(cpu.replace(width=64), cpu) < 4.0
    deep = cpu.replace(model="resnet101", width=16)
    assert grid.training_scale(deep, cpu) > grid.training_scale(cpu.replace(model="resnet50", width=16), cpu) > 1
    est = grid.Estimate(train_s=100.0, models=2, cells_s=10.0, unknown=(), records=5, scales=(1.0, 3.0))
    assert est.train_total_s == 400.0 and est.total_s == 410.0
    assert "1 of them at another scale, 3x the profile's training cost" in est.describe()


def _trained_record(folder, i, train_s, **config):
    """A copy of a committed record, at smoke, of a model trained (not loaded) in ``train_s`` seconds."""
    import json
    from pathlib import Path

    rec = json.loads(next(Path(results.RESULTS_DIR).glob("*__unit__*.json")).read_text())
    rec["config"].update(profile="smoke", defense="none", defense_params={}, seed=i, **config)
    rec["key"] = f"{i:064x}"
    rec["seconds"] = {"train": train_s, "defense": 0.0, "eval_after": 1.0}
    rec["provenance"]["model_from_cache"] = False
    (folder / f"r{i}.json").write_text(json.dumps(rec))


def test_estimate_scales_training_by_each_attacks_measured_cost(tmp_path):
    the_plan = grid.plan("smoke", grid.select_items(tables=["Table 4"]), results_dir=tmp_path)
    attacks = {g[0].experiment.attack for g in the_plan.groups()}
    assert "activation-suppression" in attacks
    # three BadNets models trained in 10 s, one activation-suppression model in 30 s (per unit of training cost)
    for i, (attack, train) in enumerate([("badnets", 10.0)] * 3 + [("activation-suppression", 30.0)]):
        _trained_record(tmp_path, i, train, attack=attack)
    est = grid.estimate(the_plan, results_dir=tmp_path)
    assert est.attack_factors == (("activation-suppression", pytest.approx(3.0)),)
    base = [grid.training_scale(g[0].experiment, profile("smoke")) for g in the_plan.groups()]
    expected = [b * (3.0 if g[0].experiment.attack == "activation-suppression" else 1.0)
                for b, g in zip(base, the_plan.groups())]
    assert est.scales == pytest.approx(expected)
    assert "activation-suppression 3x" in est.describe()


def test_estimate_scales_training_by_each_architectures_measured_cost(tmp_path):
    the_plan = grid.plan("smoke", grid.select_items(tables=["Fig. 14"]), results_dir=tmp_path)
    planned = [grid.architecture(g[0].experiment) for g in the_plan.groups()]
    assert planned == ["resnet18 (width 8)", "resnet34 (width 8)", "resnet50 (width 8)", "resnet101 (width 8)"]
    smoke = profile("smoke")
    # three models of the profile's own architecture trained at 10 s per unit of training cost, one ResNet-18 at 40
    deep = smoke.replace(model="resnet18", width=8)
    rows = [(smoke, 10.0)] * 3 + [(deep, 40.0 * grid.training_scale(deep, smoke))]
    for i, (exp, train) in enumerate(rows):
        _trained_record(tmp_path, i, train, attack="badnets", model=exp.model, width=exp.width,
                        train_size=exp.train_size, epochs=exp.epochs, dataset=exp.dataset, activation=exp.activation)
    est = grid.estimate(the_plan, results_dir=tmp_path)
    assert est.model_factors == (("resnet18 (width 8)", pytest.approx(4.0)),)
    assert est.unmeasured_models == ("resnet34 (width 8)", "resnet50 (width 8)", "resnet101 (width 8)")
    base = [grid.training_scale(g[0].experiment, smoke) for g in the_plan.groups()]
    assert est.scales == pytest.approx([base[0] * 4.0, *base[1:]])
    assert not est.attack_factors  # the architecture's cost is not taken for the attack's
    text = est.describe()
    assert "resnet18 (width 8) 4x" in text and "no record yet of resnet34 (width 8)" in text


@pytest.mark.parametrize("workers", [1, 2])
def test_a_time_limit_starts_no_new_model_after_it_and_the_same_grid_resumes(tmp_path, workers):
    items = grid.select_items(tables=["Fig. 13"])
    the_plan = grid.plan("smoke", items, results_dir=tmp_path)
    groups = len(the_plan.groups())
    assert groups >= 3
    lines: list[str] = []
    # half a second: the first group(s) start at once, and a smoke model trains for longer than that
    out = grid.run_grid(the_plan, workers=workers, results_dir=tmp_path, progress=False, log=lines.append,
                        hours=0.5 / 3600)
    assert 1 <= len(out) < len(the_plan.jobs) and all(e["ok"] for e in out)
    assert len({e["key"] for e in out}) == len(out)
    assert any(line.startswith("stopped at the time limit") for line in lines), lines
    rest = grid.plan("smoke", items, results_dir=tmp_path)
    assert len(rest.jobs) == len(the_plan.jobs) - len(out)
    assert len(grid.run_grid(rest, workers=workers, results_dir=tmp_path, progress=False, log=lambda *a: None))


def test_a_time_limit_leaves_the_cells_of_a_model_already_trained_for_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path / "cache"))
    items = grid.select_items(tables=["11"])
    the_plan = grid.plan("smoke", items, results_dir=tmp_path)
    assert len(the_plan.groups()) == 1 and len(the_plan.jobs) == 5
    lines: list[str] = []
    # the limit passes while the first cell trains the model: its cell finishes, the other four wait for the next run
    out = grid.run_grid(the_plan, workers=1, results_dir=tmp_path, progress=False, log=lines.append,
                        hours=0.5 / 3600)
    assert len(out) == 1 and out[0]["ok"], out
    assert any(line.startswith("stopped at the time limit (") and "4 of 5 cell(s) left" in line for line in lines)
    rest = grid.plan("smoke", items, results_dir=tmp_path)
    assert len(rest.jobs) == 4
    out = grid.run_grid(rest, workers=1, results_dir=tmp_path, progress=False, log=lambda *a: None)
    assert len(out) == 4 and all(e["ok"] for e in out)
    records = [results.load(p) for p in tmp_path.glob("*.json")]
    assert sorted(r.provenance["model_from_cache"] for r in records) == [False, True, True, True, True]
    assert len({r.provenance["weights_sha256"] for r in records}) == 1  # trained once, in the first run


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "2"])
def test_a_bad_time_limit_is_refused(bad):
    the_plan = grid.plan("smoke", grid.select_items(tables=["Fig. 13"]))
    with pytest.raises(ValueError, match="hours must be a number > 0"):
        grid.run_grid(the_plan, hours=bad, progress=False, log=lambda *a: None)


def test_a_time_limit_is_for_the_local_engine():
    the_plan = grid.plan("smoke", grid.select_items(tables=["Fig. 13"]))
    with pytest.raises(ValueError, match="hours applies to the local engine only"):
        grid.run_grid(the_plan, engine="dask", hours=1.0, progress=False, log=lambda *a: None)


def test_calibration_compares_this_machines_speed_with_the_records_at_the_profiles_own_scale():
    from types import SimpleNamespace

    cpu = profile("cpu")
    own = {k: getattr(cpu, k) for k in ("model", "width", "activation", "train_size", "epochs", "batch_size")}
    images = 50_000 * cpu.epochs

    def rec(seconds, cached=False, **changes):
        return SimpleNamespace(seconds={"train": seconds}, provenance={"model_from_cache": cached},
                               config={"profile": "cpu", **own, **changes})

    records = [rec(images / 1000), rec(images / 1200), rec(images / 1100),
               rec(images / 10, cached=True),  # loaded from the cache: its seconds are no training
               rec(images / 10, model="resnet18"), rec(images / 10, epochs=2),  # another scale
               rec(images / 10, profile="smoke")]
    seen = []
    cal = grid.calibrate("cpu", records, speed=lambda exp, device: seen.append(exp) or 550.0)
    assert seen == [cpu]  # timed on the profile's own model
    assert cal.records == 3 and cal.records_images_per_s == pytest.approx(1100)
    assert cal.factor == pytest.approx(2.0)
    assert "550 images/s" in cal.describe() and "times 2" in cal.describe()
    with pytest.raises(ValueError, match="no record at profile 'cpu' trained its own model"):
        grid.calibrate("cpu", records[3:], speed=lambda exp, device: 1.0)


def test_throughput_times_training_steps_of_a_model():
    from unitlib import models
    from unitlib.train import Recipe, throughput

    net = models.build("small-cnn", width=4)
    assert throughput(net, Recipe(batch_size=8), steps=2, warmup=1) > 0
    assert throughput(net, Recipe(batch_size=8, momentum=0.0), steps=1, warmup=0) > 0  # plain SGD, as fit allows
    with pytest.raises(ValueError, match="steps must be >= 1"):
        throughput(net, Recipe(batch_size=8), steps=0)


def test_grid_list_calibrate_prints_the_estimate_for_this_machine(monkeypatch, capsys):
    from unitlib.book import cli

    monkeypatch.setattr(grid, "_measure_speed", lambda exp, device: 100.0)
    assert cli.main(["grid", "--profile", "cpu", "--table", "Table 9", "--seeds", "99", "--list", "--calibrate"]) == 0
    out = capsys.readouterr().out
    est_line = next(line for line in out.splitlines() if line.startswith("estimate from"))
    cal_line = next(line for line in out.splitlines() if line.startswith("this machine trains"))
    hours = float(est_line.split(": ")[1].split(" h")[0])
    factor = float(cal_line.split("times ")[1].split(":")[0])
    assert "at 100 images/s" in cal_line and factor > 1
    assert float(cal_line.split("about ")[1].split(" h")[0]) == pytest.approx(hours * factor, rel=0.1)
