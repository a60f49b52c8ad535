import copy

import pytest
import torch

import unitlib.defenses.unit as unit_module

from unitlib import models, results
from unitlib.defenses import UNIT, BoundedModel, CleanSplit
from unitlib.defenses.unit import Bound, _float, activation_sites, initial_bounds, select_layers


def _clean(n=120, nval=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CleanSplit(torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % 10,
                      torch.rand(nval, 3, 32, 32, generator=g), torch.arange(nval) % 10)


def _model(name="small-cnn", act="relu"):
    torch.manual_seed(0)
    return models.build(name, width=4, activation=act).eval()


def test_initial_bounds_are_mean_plus_four_std():
    model, clean = _model(), _clean()
    bounds = initial_bounds(model, clean.x_opt)
    acts = {}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o)) for n in bounds]
    with torch.no_grad():
        model(clean.x_opt)
    for h in hooks:
        h.remove()
    assert len(bounds) == 7
    for name, bound in bounds.items():
        a = acts[name]
        expected = a.mean(0) + 4 * a.std(0)
        assert bound.shape == expected.shape
        assert torch.allclose(bound, expected, atol=1e-4, rtol=1e-4), name
    # UNIT starts from them: with a step too small to move anything, the kept bounds are the initial ones
    defended = UNIT(steps=1, lr=1e-12, augment=False)(model, clean, progress=False)
    for name, bound in defended.bound_values().items():
        assert torch.allclose(bound, bounds[name].clamp(min=0), atol=1e-4, rtol=1e-4), name


def test_channel_granularity_shapes():
    defended = UNIT(steps=2, granularity="channel")(_model(), _clean(), progress=False)
    for name, b in defended.bound_values().items():
        assert b.ndim == 3 and b.shape[1:] == (1, 1), name


def test_does_not_change_the_original_model():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    UNIT(steps=3, freeze_weights=False)(model, _clean(), progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    assert not any(isinstance(m, Bound) for m in model.modules())


def test_clipping_and_rejection_semantics():
    toy = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.ReLU())
    x = torch.tensor([[-1.0, 0.2, 0.5, 0.9, 3.0]])
    bound = {"1": torch.full((5,), 0.5)}
    clip = BoundedModel(toy, bound, "clip")(x)
    assert torch.equal(clip, torch.tensor([[0.0, 0.2, 0.5, 0.5, 0.5]]))
    toy2 = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.ReLU())
    reject = BoundedModel(toy2, bound, "reject")(x)
    assert torch.equal(reject, torch.tensor([[0.0, 0.2, 0.5, 0.0, 0.0]]))


def test_layer_selection():
    sites = [f"s{i}" for i in range(6)]
    assert select_layers(sites, "all") == sites
    assert select_layers(sites, "first:2") == ["s0", "s1"]
    assert select_layers(sites, "last:3") == ["s3", "s4", "s5"]
    with pytest.raises(ValueError, match="layers must be 'all', 'blocks', 'first:k' or 'last:k'"):
        select_layers(sites, "middle:2")
    defended = UNIT(steps=1, layers="last:2")(_model(), _clean(), progress=False)
    assert len(defended.layers) == 2
    # the appendix's key layers (Fig. 14): the stem's and each residual block's output, not the activations inside
    for name, blocks, per_block in (("resnet18", 8, 2), ("resnet50", 16, 3)):
        sites = activation_sites(models.build(name, width=4).eval(), torch.rand(1, 3, 32, 32))
        keys = select_layers(sites, "blocks")
        assert len(sites) == 1 + blocks * per_block and len(keys) == 1 + blocks
        assert keys[0] == "net.act1" and all(k.endswith(f".act{per_block}") for k in keys[1:])


@pytest.mark.parametrize("name,act", [("preact-resnet18", "relu"), ("resnet18", "tanh"), ("small-cnn", "elu"),
                                      ("resnet-mini", "relu")])
def test_any_architecture_and_activation(name, act):
    defended = UNIT(steps=2)(_model(name, act), _clean(60, 20), progress=False)
    assert defended(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert UNIT(steps=2).report == {}  # a fresh instance has no report


def test_report_and_budget():
    unit = UNIT(steps=8, degradation=0.05, early_stop=False)
    unit(_model(), _clean(), progress=False)
    r = unit.report
    assert r["threshold"] == pytest.approx(r["base_val_acc"] - 0.05)
    assert r["threshold_met"] and r["final_val_acc"] >= r["threshold"]
    assert [h["step"] for h in r["history"]] == list(range(9))  # step 0 (the initial bounds), then every step
    assert r["budget_bound"] == any(h["val_acc"] < r["threshold"] for h in r["history"])
    assert r["stop_reason"] == "step_cap" and r["steps_run"] == 8
    assert r["budget_gap"] == pytest.approx(r["final_val_acc"] - r["threshold"])


def _two_class_model():
    from unitlib.train import Recipe, fit

    # A model that has learned something (two classes told apart by the left half's brightness), so that
    # tightening can cost accuracy.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(240, 3, 16, 16, generator=g) * 0.5
    y = torch.arange(240) % 2
    x[y == 1, :, :, :8] += 0.5
    torch.manual_seed(0)
    model = fit(models.build("small-cnn", width=4, num_classes=2), x[:160], y[:160],
                Recipe(epochs=4, batch_size=32, lr=0.05, schedule="onecycle", crop=0), progress=False)
    return model, CleanSplit(x[160:220], y[160:220], x[220:], y[220:])


def test_budget_bound_says_whether_the_budget_stopped_the_tightening():
    model, clean = _two_class_model()
    # A huge lr drives the bounds to zero at the first step: validation accuracy falls to chance, below the threshold.
    unit = UNIT(steps=3, lr=10.0, step_units="raw", degradation=0.01, augment=False, early_stop=False)
    unit(model, clean, progress=False)
    assert unit.report["base_val_acc"] >= 0.9 and unit.report["budget_bound"] is True
    # With a budget of nearly all the accuracy, it never binds.
    unit = UNIT(steps=3, lr=10.0, step_units="raw", degradation=0.99, augment=False, early_stop=False)
    unit(model, clean, progress=False)
    assert unit.report["budget_bound"] is False


def test_steps_are_in_units_of_each_elements_clean_std():
    model, clean = _model(), _clean()
    stats = unit_module.clean_statistics(model, _float(clean.x_opt))
    # alpha large enough that Adam's eps is negligible; one step on the initial bounds
    defended = UNIT(steps=1, lr=0.5, alpha=10.0, augment=False, degradation=0.99, early_stop=False,
                    batch_size=None)(model, clean, progress=False)
    for name, bound in defended.bound_values().items():
        start = (stats.mean[name] + 4 * stats.std[name]).clamp(min=0)
        moving = (stats.std[name] > 1e-4) & (start > 0.5 * stats.std[name])
        assert moving.sum() > 0, name
        moved = (start - bound)[moving] / stats.std[name][moving]
        # Adam's first step moves each element by lr in its own units (the cross-entropy can only hold it back)
        assert moved.max().item() == pytest.approx(0.5, rel=0.02), name
        assert moved.median().item() == pytest.approx(0.5, rel=0.02), name


def test_save_and_load_roundtrip(tmp_path):
    model = _model()
    defended = UNIT(steps=3)(model, _clean(), progress=False)
    path = results.save_model(defended, tmp_path / "d.safetensors")
    fresh = models.build("small-cnn", width=4)
    from safetensors.torch import load_file

    loaded = BoundedModel.from_state_dict(fresh, load_file(str(path))).eval()
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), defended(x))
        assert not torch.equal(loaded(x), model(x))


def test_bad_parameters():
    with pytest.raises(ValueError, match="degradation must be in \\[0, 1\\), got 2"):
        UNIT(degradation=2)
    with pytest.raises(ValueError, match="unknown mode 'zero'; valid choices: clip, reject"):
        UNIT(mode="zero")
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        UNIT(steps=0)


def test_augment_val_judges_the_budget_on_augmented_validation_images(monkeypatch):
    # the validation images every accuracy is measured on: as given by default, cropped and flipped with
    # augment_val, the original model's accuracy (the threshold's reference) included
    seen = []
    real = unit_module.accuracy

    def spy(model, x, *args, **kw):
        seen.append(x.clone())
        return real(model, x, *args, **kw)

    monkeypatch.setattr(unit_module, "accuracy", spy)
    clean = _clean()
    UNIT(steps=1, early_stop=False)(_model(), clean, progress=False)
    assert all(torch.equal(x, clean.x_val) for x in seen)
    seen.clear()
    UNIT(steps=1, early_stop=False, augment_val=True)(_model(), clean, progress=False)
    assert len(seen) == 4 and all(torch.equal(x, seen[0]) for x in seen)
    assert not torch.equal(seen[0], clean.x_val)
    # a crop of 4 px and a flip: the shifted images keep most of their pixels
    assert torch.isclose(seen[0], clean.x_val).float().mean() < 0.9
    with pytest.raises(ValueError, match="augment_val must be true or false, got 'yes'"):
        UNIT(augment_val="yes")
    # records made before the parameter existed read as made without it
    assert UNIT.added_params["augment_val"] is False


def test_official_schedule():
    u = UNIT.official_schedule(degradation=0.03)
    assert (u.steps, u.lr, u.step_units, u.batch_size, u.early_stop, u.patience, u.val_every, u.degradation) == (
        300, 1e-3, "raw", None, False, 5, 1, 0.03)
    d = UNIT()
    assert (d.steps, d.lr, d.step_units, d.batch_size, d.early_stop, d.patience) == (300, 0.1, "std", 256, True, 5)


@pytest.mark.parametrize("mode", ["clip", "reject"])
def test_budget_is_checked_in_the_mode_that_is_applied(mode, monkeypatch):
    seen = []
    real = unit_module.accuracy

    def spy(model, *args, **kw):
        if isinstance(model, BoundedModel):
            seen.append(any(b.surrogate for b in model.sites().values()))
        return real(model, *args, **kw)

    monkeypatch.setattr(unit_module, "accuracy", spy)
    unit = UNIT(steps=3, mode=mode, early_stop=False)
    defended = unit(_model(), _clean(), progress=False)
    # every validation (initial, each step, final) ran the bounds as they will be applied: rejection in reject mode
    assert len(seen) == 5 and not any(seen)
    assert defended.mode == mode and not any(b.surrogate for b in defended.sites().values())


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 10)).eval()


def test_budget_is_measured_from_the_original_model():
    # Labels are the model's own predictions, so the original model is 100% accurate on the validation split;
    # bounds at the clean mean change some predictions, and must not leak into the reference accuracy.
    model, clean = _mlp(), _clean()
    with torch.no_grad():
        y_val = model(clean.x_val).argmax(1)
    assert len(y_val.unique()) > 2
    clean = CleanSplit(clean.x_opt, clean.y_opt, clean.x_val, y_val)
    for mode, surrogate in [("clip", "clip"), ("reject", "sigmoid")]:
        unit = UNIT(steps=1, init_std=0.0, mode=mode, surrogate=surrogate)
        unit(model, clean, progress=False)
        assert unit.report["base_val_acc"] == 1.0, (mode, surrogate)
        assert unit.report["final_val_acc"] < 1.0


def test_sigmoid_surrogate_gives_rejection_a_gradient():
    toy = torch.nn.Sequential(torch.nn.ReLU())
    bounded = BoundedModel(toy, {"0": torch.tensor([0.5, 0.5, 0.5])}, "reject")
    site = bounded.sites()["0"]
    bounded.surrogate(True, {"0": torch.tensor([0.1, 0.1, 0.1])})
    site.bound.requires_grad_(True)
    x = torch.tensor([[0.2, 0.5, 0.9]])
    out = bounded(x)
    assert torch.allclose(out, x * torch.sigmoid((0.5 - x) / 0.1))
    out.sum().backward()
    grad = site.bound.grad
    assert grad is not None and (grad > 0).all()  # raising a bound lets more of every value through
    bounded.surrogate(False)  # applied: hard rejection, whatever the gate
    assert torch.equal(bounded(x), torch.tensor([[0.2, 0.5, 0.0]]))


def test_sigmoid_surrogate_is_what_unit_optimises():
    model, clean = _mlp(), _clean()
    runs = {s: UNIT(steps=1, init_std=1.0, mode="reject", surrogate=s) for s in ("clip", "sigmoid")}
    for surrogate, unit in runs.items():
        defended = unit(model, clean, progress=False)
        assert defended.mode == "reject"
        assert all(not b.surrogate and b.temperature is None for b in defended.sites().values())
    ce = {s: u.report["history"][1]["ce"] for s, u in runs.items()}
    assert abs(ce["clip"] - ce["sigmoid"]) > 1e-3  # identical if the gate were not what is optimised
    with pytest.raises(ValueError, match="unknown surrogate 'tanh'; valid choices: clip, sigmoid"):
        UNIT(surrogate="tanh")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        UNIT(temperature=0)


@pytest.mark.parametrize("project", [False, True])
def test_project_keeps_bounds_non_negative_between_steps(project, monkeypatch):
    seen: list[float] = []

    def spy_forward(self, x):
        seen.append(min(b.bound.detach().min().item() for b in self.sites().values()))
        return self.model(x)

    monkeypatch.setattr(unit_module.BoundedModel, "forward", spy_forward)
    UNIT(steps=4, lr=10.0, step_units="raw", augment=False, project=project, early_stop=False,
         batch_size=None)(_model(), _clean(), progress=False)
    # lr 10 drives every unused bound far below 0 at the first step; only projection brings them back to 0
    assert (min(seen[2:]) >= 0) is project


def test_deep_copy_of_a_defended_model_clips_at_its_own_bounds():
    toy = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.ReLU())
    defended = BoundedModel(toy, {"1": torch.full((4,), 0.5)}, "clip")
    twin = copy.deepcopy(defended)
    twin.sites()["1"].bound.data.fill_(2.0)
    x = torch.tensor([[3.0, 1.0, 0.2, -1.0]])
    assert torch.equal(defended(x), torch.tensor([[0.5, 0.5, 0.2, 0.0]]))
    assert torch.equal(twin(x), torch.tensor([[2.0, 1.0, 0.2, 0.0]]))
    # and a copy of a model UNIT defended
    model = _model()
    unit_defended = UNIT(steps=2)(model, _clean(), progress=False)
    twin = copy.deepcopy(unit_defended)
    for b in twin.sites().values():
        b.bound.data.zero_()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(twin(x), unit_defended(x))
        assert torch.equal(twin(x), copy.deepcopy(twin)(x))


def test_stops_when_the_budget_binds_on_a_planted_smoke_backdoor(tmp_path, monkeypatch):
    from unitlib.config import profile
    from unitlib.experiment import run

    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path))
    record = run(profile("smoke", attack="badnets", defense="unit", defense_params={}), save=False,
                 progress=False, log=lambda *a: None)
    r = record.report
    assert record.metrics["before"]["asr"] > 0.9
    assert r["stop_reason"] == "budget", (r["steps_run"], r["budget_gap"])
    assert r["steps_run"] < UNIT().steps
    assert 0 <= r["budget_gap"] <= UNIT().settle
    assert r["budget_bound"] is True
    assert record.metrics["after"]["asr"] < 0.2


def test_exceedance_counts_activations_above_their_bounds():
    from unitlib.defenses.unit import exceedance
    model, clean = _model(), _clean()
    stats = unit_module.clean_statistics(model, clean.x_opt)
    site = stats.sites[0]
    acts = {}
    h = dict(model.named_modules())[site].register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    with torch.no_grad():
        model(clean.x_val)
    h.remove()
    bound = stats.mean[site]
    got = exceedance(model, {site: bound}, clean.x_val, chunk=16)
    assert got[site] == pytest.approx((acts["a"] > bound.clamp(min=0)).float().mean().item())
    assert 0 < got[site] < 1
    assert exceedance(model, {site: torch.full_like(bound, 1e9)}, clean.x_val)[site] == 0
    with pytest.raises(ValueError, match="no module named nowhere"):
        exceedance(model, {"nowhere": bound}, clean.x_val)


def test_slow_early_tightening_is_not_a_stall():
    """The stopping rule looks at what the last ``stop_patience`` validations achieved together: while alpha is small
    the regulariser falls by ~1% a step here, under a 2% tolerance, yet by ~4% over four steps, so bounds that start
    within ``settle`` of the threshold keep tightening; with a 20% tolerance the same run stops after four."""
    model, clean = _two_class_model()
    params = dict(steps=15, lr=0.05, degradation=0.3, settle=0.5, stop_patience=4, augment=False, batch_size=None)
    unit = UNIT(stop_tolerance=0.02, **params)
    unit(model, clean, progress=False)
    r = unit.report
    regs = [h["reg"] for h in r["history"]]
    assert all(0 < 1 - b / a < 0.02 for a, b in zip(regs, regs[1:4]))  # every early step is under the tolerance
    assert r["stop_reason"] == "step_cap" and r["steps_run"] == 15
    unit = UNIT(stop_tolerance=0.2, **params)
    unit(model, clean, progress=False)
    assert unit.report["stop_reason"] == "budget" and unit.report["steps_run"] == 4


def test_wait_for_relax_keeps_the_step_that_all_steps_would_keep(monkeypatch):
    """The budget binds at step 41 after 40 steps within it (alpha grown 2^8-fold); the bounds come back within it
    at step 64 alone, tighter than at step 40 (alpha still above its start, so the regulariser kept falling). The
    window rule stops at 60 and keeps step 40; waiting until alpha is back at its start value keeps step 64, as a run
    of all the steps does, and stops 20 validations later."""
    model, clean = _two_class_model()
    calls = []

    def scripted(*args, **kwargs):
        calls.append(1)
        n = len(calls) - 2  # call 0: the original model; call 1: the initial bounds; then one per step
        return 0.5 if n >= 41 and n != 64 else 1.0

    monkeypatch.setattr(unit_module, "accuracy", scripted)
    outcomes = {}
    for name, kwargs in [("window", {}), ("relax", {"wait_for_relax": True}), ("all", {"early_stop": False})]:
        calls.clear()
        unit = UNIT(steps=120, lr=0.05, degradation=0.005, augment=False, batch_size=None, **kwargs)
        unit(model, clean, progress=False)
        r = unit.report
        regs = {h["step"]: h["reg"] for h in r["history"]}
        outcomes[name] = (r["steps_run"], r["best_step"], r["stop_reason"])
    assert regs[64] < regs[40]
    assert outcomes == {"window": (60, 40, "budget"), "relax": (84, 64, "budget"), "all": (120, 64, "step_cap")}
    with pytest.raises(ValueError, match="wait_for_relax must be true or false, got 1"):
        UNIT(wait_for_relax=1)
