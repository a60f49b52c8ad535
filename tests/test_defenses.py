"""The seven baseline defenses (FT, FP, NAD, ANP, NC, I-BAU, SEAM) on a planted `smoke` backdoor: each returns a
working model of the same interface, leaves the input model untouched, lowers the attack success rate, and never
touches test data. Budgets are cut to seconds through each defense's own parameters."""

import copy
import json
import time

import pytest
import torch
from torch import nn

from unitlib import config, data, metrics
from unitlib.cli import main
from unitlib.data import splits, synthetic
from unitlib.defenses import ANP, FP, FT, IBAU, NAD, NC, SEAM, SMOKE_PARAMS, CleanSplit, get
from unitlib.defenses.common import Augmentation, ChannelMask, feature_sites, rotate
from unitlib.defenses.nad import attention_map
from unitlib.defenses.nc import anomaly_index
from unitlib.experiment import build_model
from unitlib.train import fit

BASELINES = ["anp", "fp", "ft", "i-bau", "nad", "nc", "seam"]


class DataTouched(AssertionError):
    pass


def _tripwire(*args, **kwargs):
    raise DataTouched("a defense reached for the data set (and with it the test split)")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, so the planted model and the defenses' smoke runs are the same on every machine: their
    smoke budgets are small, and with two threads' float rounding FT, NAD and SEAM were seen to leave ASR at 0.6-0.98
    on this planted model (a thin margin, stated here rather than hidden)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted():
    """A smoke-profile model with a BadNets backdoor, the defender's clean split (uint8, as experiments pass it) and
    the test set."""
    exp = config.profile("smoke", defense="none")
    ds = data.load(exp.dataset, size=exp.train_size)
    attack = exp.make_attack()
    poisoned = attack.poison(data.to_float(ds.x_train), ds.y_train)
    torch.manual_seed(exp.seed)
    model = fit(build_model(exp, ds), poisoned.x, poisoned.y, exp.recipe(), device="cpu", seed=exp.seed,
                progress=False)
    opt, val = data.defense_split(ds.y_train, exp.clean_fraction, exclude=poisoned.index, seed=exp.seed)
    clean = CleanSplit(ds.x_train[opt], ds.y_train[opt], ds.x_train[val], ds.y_train[val])
    before = metrics.evaluate(model, ds.x_test, ds.y_test, attack)
    assert before["asr"] >= 0.9 and before["clean_acc"] >= 0.8, before
    return {"model": model.eval(), "clean": clean, "x_test": ds.x_test, "y_test": ds.y_test, "attack": attack,
            "before": before}


@pytest.fixture(scope="module")
def outcomes(planted):
    """Every baseline run once on the planted model, with every way to the data set (and so to the test split)
    replaced by a tripwire."""
    model = planted["model"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mp = pytest.MonkeyPatch()
    for module, name in [(data, "load"), (data, "defense_split"), (data, "balanced_subset"),
                         (splits, "balanced_subset"), (synthetic, "_synthetic_arrays"), (synthetic, "_synthetic_split")]:
        mp.setattr(module, name, _tripwire)
    for key in list(data._LOADERS):
        mp.setitem(data._LOADERS, key, _tripwire)
    out = {}
    try:
        for name in BASELINES:
            defense = get(name, **SMOKE_PARAMS[name])
            start = time.perf_counter()
            defended = defense(model, planted["clean"], device="cpu", progress=False)
            out[name] = {"defense": defense, "model": defended, "seconds": time.perf_counter() - start}
    finally:
        mp.undo()
    for name, o in out.items():
        o["after"] = metrics.evaluate(o["model"], planted["x_test"], planted["y_test"], planted["attack"])
    return {"runs": out, "state": state}


def test_tripwire_trips():
    mp = pytest.MonkeyPatch()
    mp.setattr(data, "load", _tripwire)
    try:
        with pytest.raises(DataTouched):
            data.load("synthetic")
    finally:
        mp.undo()


def test_every_baseline_has_a_smoke_budget():
    assert sorted(SMOKE_PARAMS) == BASELINES
    for name, params in SMOKE_PARAMS.items():
        get(name, **params)  # valid names and values


def test_all_listed_by_the_cli(capsys):
    assert main(["list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("defenses:"))
    listed = {n.strip() for n in line.split(":", 1)[1].split(",")}
    assert set(BASELINES) <= listed


@pytest.mark.parametrize("name", BASELINES)
def test_same_interface(name, outcomes, planted):
    defended = outcomes["runs"][name]["model"]
    assert isinstance(defended, nn.Module) and not defended.training
    x8 = planted["x_test"][:7]
    with torch.no_grad():
        logits = defended(x8.float() / 255)
    assert logits.shape == (7, 10) and torch.isfinite(logits).all()
    # uint8 through the metrics path and float give the same predictions
    assert torch.equal(metrics.predict(defended, x8), logits.argmax(1))


@pytest.mark.parametrize("name", BASELINES)
def test_input_model_untouched(name, outcomes, planted):
    model, state = planted["model"], outcomes["state"]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert set(state) == set(model.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert outcomes["runs"][name]["model"] is not model


@pytest.mark.parametrize("name", BASELINES)
def test_lowers_asr_and_keeps_a_working_model(name, outcomes, planted):
    before, after = planted["before"], outcomes["runs"][name]["after"]
    assert after["asr"] <= 0.4, (name, after)
    assert before["asr"] - after["asr"] >= 0.5, (name, before, after)
    assert after["clean_acc"] >= 0.5, (name, after)  # chance is 0.1


@pytest.mark.parametrize("name", BASELINES)
def test_report(name, outcomes):
    defense = outcomes["runs"][name]["defense"]
    report = defense.report
    assert report["seconds"] > 0 and 0 <= report["final_val_acc"] <= 1
    assert 0 <= report["base_val_acc"] <= 1
    # a record stores the report and the resolved parameters as JSON
    assert json.loads(json.dumps({"report": report, "params": defense.params()}))["params"] == defense.params()


def test_fp_mask_persists(outcomes, planted):
    defended, report = outcomes["runs"]["fp"]["model"], outcomes["runs"]["fp"]["defense"].report
    assert report["layer"] == feature_sites(planted["model"], planted["clean"].x_opt[:2].float() / 255)[-1]
    masks = [m for m in defended.modules() if isinstance(m, ChannelMask)]
    assert len(masks) == 1
    mask = masks[0].mask
    assert int((mask == 0).sum()) == len(report["pruned"]) == round(0.8 * report["channels"])
    feats = {}
    masks[0].register_forward_hook(lambda m, i, o: feats.__setitem__("out", o))
    copy.deepcopy(defended)(torch.rand(3, 3, 32, 32))  # a deep copy keeps the mask as a module, not a stale hook
    defended(torch.rand(3, 3, 32, 32))
    assert torch.all(feats["out"][:, mask == 0] == 0)
    assert any(k.endswith(".mask") for k in defended.state_dict())


def test_anp_zeroes_pruned_batchnorm_scales(outcomes):
    run = outcomes["runs"]["anp"]
    modules = dict(run["model"].named_modules())
    assert run["defense"].report["n_pruned"] > 0
    for layer, idx in run["defense"].report["pruned"].items():
        assert torch.all(modules[layer].weight[idx] == 0)


def test_nc_flags_the_target(outcomes, planted):
    report = outcomes["runs"]["nc"]["defense"].report
    assert planted["attack"].target in report["flagged"] and report["unlearned"]


def test_seam_forgets_then_recovers(outcomes):
    report = outcomes["runs"]["seam"]["defense"].report
    assert report["forgotten"] and report["forget_history"][-1]["val_acc"] <= 0.12
    assert report["final_val_acc"] > report["forget_history"][-1]["val_acc"]


def test_nc_unflagged_model_returned_unchanged(planted, monkeypatch):
    """No outlier among the reversed masks: the model comes back unchanged and the report says so."""
    def equal_masks(self, model, x, target, gen, bar):
        return torch.full((32, 32), 0.1), torch.rand(3, 32, 32), {"target": target, "norm": 102.4 + target % 2,
                                                                   "reached_threshold": True, "steps": 0}
    monkeypatch.setattr(NC, "reverse", equal_masks)
    nc = NC(steps=1)
    defended = nc(planted["model"], planted["clean"], device="cpu", progress=False)
    assert nc.report["flagged"] == [] and nc.report["unlearned"] is False and "unchanged" in nc.report["note"]
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(defended(x), planted["model"](x))


def test_anomaly_index():
    norms = torch.tensor([10.0, 100, 104, 96, 102, 98, 100, 103, 97, 101])
    index = anomaly_index(norms)
    assert index[0] > 2 and (index[1:] < 2).all()
    assert index[1] == 0  # the median


def test_attention_map_is_unit_norm():
    a = torch.randn(5, 8, 4, 4)
    am = attention_map(a)
    assert am.shape == (5, 1, 4, 4)
    assert torch.allclose(am.flatten(1).norm(dim=1), torch.ones(5), atol=1e-4)
    assert torch.allclose(attention_map(3 * a), am, atol=1e-5)  # scale-free


def test_uint8_and_float_splits_give_the_same_pruning(planted):
    clean = planted["clean"]
    as_float = CleanSplit(clean.x_opt.float() / 255, clean.y_opt, clean.x_val.float() / 255, clean.y_val)
    a, b = FP(ratio=0.3, epochs=0), FP(ratio=0.3, epochs=0)
    a(planted["model"], clean, device="cpu", progress=False)
    b(planted["model"], as_float, device="cpu", progress=False)
    assert a.report["pruned"] == b.report["pruned"] and len(a.report["pruned"]) > 0


def test_rotation_and_augmentation():
    x = torch.rand(6, 3, 32, 32)
    assert torch.equal(rotate(x, 0), x)
    g = torch.Generator().manual_seed(0)
    y = Augmentation(crop=4, rotation=15, flip=True)(x, g)
    assert y.shape == x.shape and not torch.equal(y, x)
    # a 180-degree range can turn an image upside down; rotating by up to 15 degrees keeps the centre pixel
    assert torch.allclose(rotate(x, 15, g)[:, :, 16, 16], x[:, :, 16, 16], atol=0.25)


def test_anp_needs_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    clean = CleanSplit(torch.rand(20, 3, 32, 32), torch.arange(20) % 10, torch.rand(10, 3, 32, 32), torch.arange(10))
    with pytest.raises(ValueError, match="no affine BatchNorm layer"):
        ANP(iterations=1)(model, clean, device="cpu", progress=False)


@pytest.mark.parametrize("cls,kwargs,message", [
    (FT, {"epochs": 0}, r"epochs must be an int >= 1, got 0"),
    (FT, {"lr": -1}, r"lr must be > 0, got -1"),
    (FT, {"rotation": 200}, r"rotation must be in \[0, 180\], got 200"),
    (FT, {"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
    (FP, {"ratio": 1.0}, r"ratio must be in \[0, 1\), got 1.0"),
    (FP, {"ratio": -0.1}, r"ratio must be in \[0, 1\), got -0.1"),
    (NAD, {"beta": -5}, r"beta must be in \[0, inf\], got -5"),
    (NAD, {"layers": "first:2"}, r"layers must be 'last:k' \(k >= 1\)"),
    (NAD, {"teacher_lr": 0}, r"teacher_lr must be > 0, got 0"),
    (NAD, {"batch_stats": "yes"}, r"batch_stats must be true or false, got 'yes'"),
    (ANP, {"eps": 1.5}, r"eps must be in \[0, 1\], got 1.5"),
    (ANP, {"alpha": 2}, r"alpha must be in \[0, 1\], got 2"),
    (ANP, {"iterations": 0}, r"iterations must be an int >= 1, got 0"),
    (NC, {"cost_multiplier": 1}, r"cost_multiplier must be in \(1, inf\], got 1"),
    (NC, {"unlearn_fraction": 0}, r"unlearn_fraction must be in \(0, 1\], got 0"),
    (NC, {"steps": 2.5}, r"steps must be an int >= 1, got 2.5"),
    (IBAU, {"K": 0}, r"K must be an int >= 1, got 0"),
    (IBAU, {"portion": 0}, r"portion must be in \(0, 1\], got 0"),
    (SEAM, {"forget_acc": 1.5}, r"forget_acc must be in \[0, 1\], got 1.5"),
    (SEAM, {"forget_size": 0}, r"forget_size must be an int >= 1, got 0"),
])
def test_bad_parameters(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_unknown_parameter_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown parameter.*steps.*valid parameters: .*epochs"):
        get("ft", steps=3)


def test_defaults_follow_the_papers():
    assert (FT().epochs, FT().lr, FT().lr_step, FT().lr_gamma) == (20, 1e-2, 4, 0.1)
    assert (ANP().eps, ANP().pgd_steps, ANP().alpha, ANP().mask_lr, ANP().threshold) == (0.4, 1, 0.2, 0.2, 0.2)
    assert (IBAU().rounds, IBAU().K, IBAU().lr, IBAU().batch_size) == (5, 5, 1e-4, 100)
    assert (NC().init_cost, NC().lr, NC().attack_threshold, NC().anomaly_threshold) == (1e-3, 0.1, 0.99, 2.0)
    assert (NAD().beta, NAD().p) == (5000.0, 2.0)
    assert FP().ratio == 0.2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", BASELINES)
def test_cuda(name, planted):
    defense = get(name, **SMOKE_PARAMS[name])
    defended = defense(planted["model"], planted["clean"], device="cuda", progress=False)
    after = metrics.evaluate(defended, planted["x_test"], planted["y_test"], planted["attack"], device="cuda")
    assert after["asr"] <= 0.5 and after["clean_acc"] >= 0.5, (name, after)
    assert next(planted["model"].parameters()).device.type == "cpu"


def test_nad_compares_attention_in_one_normalisation_mode(planted):
    """With the teacher an unchanged copy of the student (no teacher epochs) and no learning, the attention loss is
    zero when the teacher normalises by batch statistics as the training student does; in eval mode (the official
    code's) the mode mismatch alone adds to the loss. The teacher's running statistics are never changed."""
    def first_epoch_loss(**kw):
        nad = NAD(teacher_epochs=0, epochs=1, lr=1e-12, momentum=0.0, weight_decay=0.0, **kw)
        nad(planted["model"], planted["clean"], device="cpu", progress=False)
        return nad.report["history"][0]["loss"]

    ce_only = first_epoch_loss(beta=0.0)
    assert first_epoch_loss(beta=5000.0) == pytest.approx(ce_only, rel=1e-3)
    assert first_epoch_loss(beta=5000.0, batch_stats=False) > ce_only + 1e-3
