"""The checks of the labs' exercises, one builder per exercise (``lab<N>_<what>``): each takes what the notebook has
set up and returns a test that raises ``AssertionError`` with a message for the student when an answer is wrong
(see :meth:`unitlib.book.labs.Lab.check`). A builder's arguments may include an earlier exercise's answer, which is
``None`` when that exercise did not pass: builders only capture them, and the tests use them. A check compares an
answer with the library's own computation where there is one, and otherwise with what the answer must satisfy; none
depends on the speed of the machine."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from ... import attacks, defenses, experiment
from ...defenses.unit import BoundedModel, initial_bounds
from .helpers import as_float, test_metrics

Test = Callable[[Any], "str | None"]
METRICS = ("clean_acc", "asr")


# -- shared assertions -------------------------------------------------------------------------------------------------
def _tensor(value: Any, what: str) -> torch.Tensor:
    assert isinstance(value, torch.Tensor), f"{what} must be a torch.Tensor, got {type(value).__name__}"
    return value


def _frame(value: Any, columns: Sequence[str], what: str = "the table") -> pd.DataFrame:
    assert isinstance(value, pd.DataFrame), f"return {what} as a pandas DataFrame, got {type(value).__name__}"
    missing = [c for c in columns if c not in value.columns]
    assert not missing, f"{what} lacks the column(s) {', '.join(missing)} (it has {', '.join(map(str, value.columns))})"
    return value


def _fractions(df: pd.DataFrame, columns: Sequence[str], what: str = "the table") -> None:
    for c in columns:
        values = pd.to_numeric(df[c], errors="coerce")
        assert values.notna().all(), f"{what}: column {c} has values that are not numbers"
        assert ((values >= 0) & (values <= 1)).all(), (
            f"{what}: column {c} must hold fractions in [0, 1] (not percent), got {values.tolist()}")


def _metrics(value: Any, what: str) -> Mapping[str, float]:
    assert isinstance(value, Mapping), (
        f"{what} must be a dict with keys {', '.join(METRICS)}, got {type(value).__name__}")
    missing = [k for k in METRICS if k not in value]
    assert not missing, f"{what} lacks {', '.join(missing)}"
    for k in METRICS:
        assert isinstance(value[k], (int, float)) and 0 <= value[k] <= 1, (
            f"{what}: {k} must be a fraction in [0, 1], got {value[k]!r}")
    return value


def _close(got: float, want: float, what: str, tol: float = 0.005) -> None:
    assert abs(got - want) <= tol, f"{what} is {got:.4f}, but the library's run gives {want:.4f}"


def _hooked(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


# -- lab 1: plant a backdoor -------------------------------------------------------------------------------------------
def lab1_trigger(name: str, images: torch.Tensor, max_share: float = 0.05) -> Test:
    """The trigger is a registered attack whose ``apply`` returns new images in [0, 1], changes the same few pixels
    of every image (at most ``max_share`` of the pixel positions) and is not BadNets' own patch."""
    images = as_float(images)

    def test(cls: Any) -> str:
        assert isinstance(cls, type) and issubclass(cls, attacks.Attack), "return your Attack subclass (the class)"
        assert name in attacks.ATTACKS and attacks.ATTACKS[name] is cls, (
            f"register the class under the name {name!r} (set name = {name!r} and decorate it with @register)")
        attack = attacks.get(name)
        before = images.clone()
        out = attack.apply(images)
        assert torch.equal(images, before), "apply changed its input images in place: work on a copy (x.clone())"
        _tensor(out, "apply's result")
        assert out.shape == images.shape, f"apply returned shape {tuple(out.shape)} for images of {tuple(images.shape)}"
        assert out.dtype == images.dtype, f"apply returned {out.dtype} for {images.dtype} images"
        assert out.min() >= 0 and out.max() <= 1, "apply must return pixel values in [0, 1]"
        assert torch.equal(attack.apply(images), out), "apply gave two different results for the same images"
        changed = (out != images).any(1)  # pixel positions changed, per image
        assert changed.flatten(1).any(1).all(), "apply left some images unchanged"
        where = changed.any(0)  # positions changed in any image: a fixed trigger changes the same few everywhere
        share = where.float().mean().item()
        assert share <= max_share, (f"apply changed {share:.1%} of the pixel positions over these images: keep the "
                                    f"trigger local and in the same place on every image (at most {max_share:.0%})")
        badnets = attacks.get("badnets").apply(images)
        assert not torch.equal(out, badnets), "this is BadNets' own patch: design a trigger of your own"
        return f"changes {int(where.sum())} pixel positions ({share:.1%} of an image)"

    return test


def lab1_plant(name: str, poison_rate: float, min_asr: float = 0.5) -> Test:
    """A record of the pipeline's run with the student's attack, no defense, at ``poison_rate``, whose ASR shows a
    backdoor."""

    def test(record: Any) -> str:
        assert hasattr(record, "metrics") and hasattr(record, "config"), (
            f"return the record that labs.run gives, got {type(record).__name__}")
        c = record.config
        assert c["attack"] == name, f"the run used the attack {c['attack']!r}, not yours ({name!r})"
        assert c["defense"] == "none", f"measure the backdoor without defense (defense='none'), not {c['defense']!r}"
        assert math.isclose(c["poison_rate"], poison_rate), f"poison_rate is {c['poison_rate']}, asked {poison_rate}"
        m = record.metrics["before"]
        assert m["asr"] >= min_asr, (f"ASR {m['asr']:.1%}: the model did not learn your trigger at poison rate "
                                     f"{poison_rate:.0%} (at least {min_asr:.0%} expected); a larger or more "
                                     f"contrasted pattern is easier to learn")
        return f"clean accuracy {m['clean_acc']:.1%}, ASR {m['asr']:.1%}"

    return test


def lab1_rates(rates: Sequence[float], plant: Callable[[float], Any]) -> Test:
    """One row per poison rate with its clean accuracy and ASR, matching what ``plant`` gives at the last rate."""

    def test(df: Any) -> str:
        df = _frame(df, ["poison_rate", *METRICS])
        assert sorted(df["poison_rate"].round(6)) == sorted(round(r, 6) for r in rates), (
            f"one row per poison rate {list(rates)}, got {df['poison_rate'].tolist()}")
        _fractions(df, METRICS)
        last = max(rates)
        row = df[(df["poison_rate"] - last).abs() < 1e-9].iloc[0]
        again = plant(last).metrics["before"]
        for k in METRICS:
            _close(float(row[k]), again[k], f"{k} at poison rate {last}")
        return None

    return test


# -- lab 2: UNIT by hand -----------------------------------------------------------------------------------------------
def lab2_activations(model: nn.Module, name: str, x: torch.Tensor) -> Test:
    expected = _hooked(model, name, x)
    module = model.get_submodule(name)
    hooks = len(module._forward_hooks)

    def test(acts: Any) -> None:
        _tensor(acts, "the activations")
        assert len(module._forward_hooks) == hooks, "remove your hook before returning (handle.remove())"
        assert tuple(acts.shape) == tuple(expected.shape), (
            f"shape {tuple(acts.shape)}, expected {tuple(expected.shape)}: one row per image, the module's output")
        assert not acts.requires_grad, "compute the activations without gradients (torch.no_grad())"
        assert torch.allclose(acts.float(), expected, atol=1e-5), f"these are not the outputs of module {name!r}"

    return test


def lab2_bound(model: nn.Module, name: str, x: torch.Tensor, k: float) -> Test:
    expected = initial_bounds(model, x, init_std=k)[name]

    def test(bound: Any) -> str:
        _tensor(bound, "the bound")
        assert tuple(bound.shape) == tuple(expected.shape), (
            f"shape {tuple(bound.shape)}, expected {tuple(expected.shape)}: one bound per element of one image's "
            f"activations (reduce over the images, dimension 0)")
        tol = 1e-4 * (1 + expected.abs().max().item())
        gap = (bound.float() - expected).abs().max().item()
        if gap > tol:
            acts = _hooked(model, name, x)
            population = acts.mean(0) + k * acts.std(0, unbiased=False)
            assert not torch.allclose(bound.float(), population, atol=tol), (
                "that is the population standard deviation: UNIT uses the unbiased one (torch.std's default)")
        assert gap <= tol, f"your bound differs from mean + {k} std by up to {gap:.3g}"
        return f"{bound.numel()} bounds, from {bound.min().item():.3f} to {bound.max().item():.3f}"

    return test


def lab2_clip(model: nn.Module, name: str, bound: torch.Tensor, ready: experiment.Setup) -> Test:
    x = as_float(ready.dataset.x_test[:256])
    original = _logits(model, x)

    def test(clipped: Any) -> None:
        reference = _logits(BoundedModel(copy.deepcopy(model), {name: bound}), x)
        assert isinstance(clipped, nn.Module), f"return a model (an nn.Module), got {type(clipped).__name__}"
        assert clipped is not model, "return a copy: the original model must not change"
        assert torch.allclose(_logits(model, x), original), "the original model changed: clip a copy (copy.deepcopy)"
        got = _logits(clipped, x)
        assert torch.allclose(got, reference, atol=1e-4), (
            f"the copy's outputs differ from a model that clips {name!r} at the bound: is the hook on that module, "
            f"and does it return torch.minimum(output, bound)?")

    return test


def lab2_unit(model: nn.Module, name: str, x: torch.Tensor, init_std: float = 4.0) -> Test:
    expected = initial_bounds(model, x, init_std=init_std)[name]

    def test(started: Any) -> str:
        assert isinstance(started, tuple) and len(started) == 2, "return two things: (the starting bound, the model)"
        bound, defended = started
        _tensor(bound, "the starting bound")
        assert isinstance(defended, BoundedModel), "the second value must be the model UNIT returned"
        assert tuple(bound.shape) == tuple(expected.shape), (
            f"shape {tuple(bound.shape)}, expected {tuple(expected.shape)}")
        gap = (bound.float() - expected.clamp(min=0)).abs().max().item()
        assert gap <= 1e-4 * (1 + expected.abs().max().item()), (
            f"UNIT started up to {gap:.3g} away from mean + {init_std:g} std of the images you used: did it see the "
            f"same images? (read what UNIT's `augment` parameter does)")
        return f"UNIT bounded {len(defended.layers)} layers"

    return test


# -- lab 3: the accuracy budget ----------------------------------------------------------------------------------------
def lab3_sweep(ready: experiment.Setup, budgets: Sequence[float], params: Mapping[str, Any]) -> Test:
    """One row per budget; the largest budget's row matches the library's UNIT run at that budget."""

    def test(df: Any) -> str:
        df = _frame(df, ["degradation", *METRICS])
        assert len(df) == len(budgets), f"{len(df)} rows for {len(budgets)} budgets"
        assert sorted(df["degradation"].round(6)) == sorted(round(b, 6) for b in budgets), (
            f"one row per budget {list(budgets)}, got {df['degradation'].tolist()}")
        _fractions(df, METRICS)
        top = max(budgets)
        unit = defenses.UNIT(**{**params, "degradation": top})
        want = test_metrics(unit(ready.model, ready.clean, progress=False), ready)
        row = df[(df["degradation"] - top).abs() < 1e-9].iloc[0]
        for k in METRICS:
            _close(float(row[k]), want[k], f"{k} at degradation {top}")
        return f"checked against the library's run at degradation {top}"

    return test


def lab3_plot(n_points: int) -> Test:
    """A matplotlib figure with at least two plotted series of ``n_points`` points (accuracy and ASR)."""

    def test(fig: Any) -> str:
        import matplotlib.figure

        assert isinstance(fig, matplotlib.figure.Figure), f"return the matplotlib Figure, got {type(fig).__name__}"
        series = 0
        for ax in fig.axes:
            series += sum(len(line.get_xdata()) == n_points for line in ax.get_lines())
            series += sum(len(c.get_offsets()) == n_points for c in ax.collections if hasattr(c, "get_offsets"))
        assert series >= 2, (
            f"plot accuracy and ASR against the budget: two series of {n_points} points (found {series})")
        labelled = [ax for ax in fig.axes if ax.get_xlabel()]
        assert labelled, "label the x axis (ax.set_xlabel)"
        return None

    return test


def cheapest(df: pd.DataFrame, max_asr: float, column: str = "degradation") -> float | None:
    ok = df[df["asr"] <= max_asr]
    return None if ok.empty else float(ok[column].min())


def lab3_cheapest(table: pd.DataFrame, max_asr: float) -> Test:
    def test(got: Any) -> str:
        want = cheapest(table, max_asr)
        if want is None:
            assert got is None, f"no budget in your table brings ASR to {max_asr:.0%} or below: return None"
            return "no budget removes the backdoor here"
        assert got is not None, f"the table has a budget with ASR <= {max_asr:.0%}: return it"
        assert isinstance(got, (int, float)), f"return the budget as a number, got {type(got).__name__}"
        assert math.isclose(got, want), (
            f"the smallest budget with ASR <= {max_asr:.0%} in your table is {want}, not {got}")
        return f"degradation {want}"

    return test


# -- lab 4: clipping or rejection --------------------------------------------------------------------------------------
def lab4_defend(ready: experiment.Setup, params: Mapping[str, Any], design: Mapping[str, Any]) -> Test:
    """The metrics of one design match the library's run of UNIT with it."""

    def test(defend: Any) -> str:
        assert callable(defend), "pass the function itself"
        got = _metrics(defend(ready, **design), "defend's result")
        unit = defenses.UNIT(**{**params, **design})
        want = test_metrics(unit(ready.model, ready.clean, progress=False), ready)
        for k in METRICS:
            _close(float(got[k]), want[k], f"{k} with {dict(design)}")
        return f"checked against the library's run with {dict(design)}"

    return test


def lab4_table(ready: experiment.Setup, designs: Mapping[str, Any]) -> Test:
    none = test_metrics(ready.model, ready)

    def test(df: Any) -> None:
        df = _frame(df, list(METRICS))
        names = [str(i) for i in df.index]
        want = ["no defense", *designs]
        assert sorted(names) == sorted(want), f"one row per design and one for no defense, indexed {want}; got {names}"
        _fractions(df, METRICS)
        for k in METRICS:
            _close(float(df.loc["no defense", k]), none[k], f"{k} without defense")

    return test


def best(df: pd.DataFrame, max_drop: float) -> str | None:
    base = df.loc["no defense", "clean_acc"]
    ok = df[(df.index != "no defense") & (df["clean_acc"] >= base - max_drop - 1e-9)]
    return None if ok.empty else str(ok["asr"].idxmin())


def lab4_best(table: pd.DataFrame, max_drop: float) -> Test:
    def test(got: Any) -> str:
        want = best(table, max_drop)
        if want is None:
            assert got is None, f"no design keeps accuracy within {max_drop:.0%}: return None"
            return "no design within the budget"
        assert got == want, (f"among the designs within {max_drop:.0%} of the undefended accuracy, {want!r} has the "
                             f"lowest ASR, not {got!r}")
        return want

    return test


# -- lab 5: an adaptive attacker ---------------------------------------------------------------------------------------
def _probe(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    return copy.deepcopy(model).train(), as_float(x[:32])


def lab5_loss(model: nn.Module, x: torch.Tensor) -> Test:
    """The loss equals the library's activation-suppression term (alpha 1) and has a gradient."""
    net, xs = _probe(model, x)
    attack = attacks.get("activation-suppression", alpha=1.0)
    want = attack.training_regulariser(net, xs, torch.zeros(len(xs), dtype=torch.long)).item()

    def test(loss: Any) -> str:
        assert callable(loss), "pass the function itself"
        value = loss(net, xs, attack.apply(xs).clamp(0, 1))
        _tensor(value, "the loss")
        assert value.dim() == 0, f"return one number (a 0-d tensor), got shape {tuple(value.shape)}"
        assert value.requires_grad, "the loss must keep its gradient: do not detach it or use torch.no_grad()"
        assert math.isclose(value.item(), want, rel_tol=1e-4, abs_tol=1e-7), (
            f"{value.item():.6g}, but Eq. 6 gives {want:.6g}: the sum over activation layers of the mean squared "
            f"difference between clean and triggered activations")
        return f"{want:.4g} on a probe batch"

    return test


def lab5_attack(name: str, model: nn.Module, x: torch.Tensor, alpha: float = 0.5) -> Test:
    net, xs = _probe(model, x)
    y = torch.zeros(len(xs), dtype=torch.long)
    want = attacks.get("activation-suppression", alpha=alpha).training_regulariser(net, xs, y).item()

    def test(cls: Any) -> str:
        assert isinstance(cls, type) and issubclass(cls, attacks.attack_class("badnets")), (
            "return your class, a subclass of BadNets")
        assert attacks.ATTACKS.get(name) is cls, f"register the class under the name {name!r}"
        attack = attacks.get(name, alpha=alpha)
        value = attack.training_regulariser(net, xs, y)
        _tensor(value, "training_regulariser's result")
        assert math.isclose(float(value), want, rel_tol=1e-4, abs_tol=1e-7), (
            f"training_regulariser gives {float(value):.6g} at alpha {alpha}, Eq. 6 gives {want:.6g}")
        zero = float(attacks.get(name, alpha=0.0).training_regulariser(net, xs, y))
        assert zero == 0, f"at alpha 0 the attack is plain BadNets: its extra loss must be 0, got {zero}"
        return None

    return test


def lab5_table(alphas: Sequence[float]) -> Test:
    columns = ["alpha", "clean_acc_before", "asr_before", "clean_acc_after", "asr_after"]

    def test(df: Any) -> None:
        df = _frame(df, columns)
        assert sorted(df["alpha"].round(9)) == sorted(round(a, 9) for a in alphas), (
            f"one row per alpha {list(alphas)}, got {df['alpha'].tolist()}")
        _fractions(df, columns[1:])

    return test


def verdict(row: Mapping[str, float], planted: float, removed: float) -> str:
    if row["asr_before"] < planted:
        return "not planted"
    return "removed" if row["asr_after"] <= removed else "survives"


def lab5_verdict(table: pd.DataFrame, planted: float, removed: float) -> Test:
    def test(judge: Any) -> str:
        assert callable(judge), "pass the function itself"
        for _, row in table.iterrows():
            want, got = verdict(row, planted, removed), judge(row)
            assert got == want, (f"alpha {row['alpha']}: ASR {row['asr_before']:.1%} before and {row['asr_after']:.1%} "
                                 f"after UNIT is {want!r}, not {got!r}")
        return ", ".join(f"alpha {r['alpha']}: {verdict(r, planted, removed)}" for _, r in table.iterrows())

    return test


# -- lab 6: UNIT against a baseline ------------------------------------------------------------------------------------
def lab6_baseline() -> Test:
    def test(choice: Any) -> str:
        assert isinstance(choice, tuple) and len(choice) == 2, "return (name, parameters)"
        name, params = choice
        assert name in defenses.DEFENSES, f"{name!r} is not a defense; valid: {', '.join(defenses.REGISTRY.names())}"
        assert name not in ("unit", "none"), "choose a baseline, not UNIT itself or no defense"
        assert isinstance(params, Mapping), "the parameters must be a dict"
        try:
            defenses.get(name, **params)
        except ValueError as err:
            raise AssertionError(str(err)) from err
        return f"{name} {dict(params)}"

    return test


def lab6_timed(ready: experiment.Setup, budget_s: float) -> Test:
    def test(timed: Any) -> str:
        assert callable(timed), "pass the function itself"
        got = timed(defenses.NoDefense(), ready, budget_s)
        got = _metrics(got, "timed's result")
        none = test_metrics(ready.model, ready)
        for k in METRICS:
            _close(float(got[k]), none[k], f"{k} of 'no defense'")
        for key in ("seconds", "within_budget"):
            assert key in got, f"timed's result lacks {key}"
        assert got["seconds"] >= 0, "seconds must be >= 0"
        assert got["within_budget"] == (got["seconds"] <= budget_s), "within_budget must say whether seconds <= budget"
        return None

    return test


def lab6_compare(attack_names: Sequence[str], baseline: str, budget_s: float,
                 undefended: Mapping[str, Mapping[str, float]]) -> Test:
    columns = ["attack", "defense", *METRICS, "seconds", "within_budget"]

    def test(df: Any) -> str:
        df = _frame(df, columns)
        want = {(a, d) for a in attack_names for d in ("none", "unit", baseline)}
        got = set(zip(df["attack"], df["defense"]))
        assert got == want, f"one row per attack and defense (none, unit, {baseline}); missing {sorted(want - got)}"
        _fractions(df, METRICS)
        for _, row in df.iterrows():
            assert bool(row["within_budget"]) == (row["seconds"] <= budget_s), (
                f"{row['attack']}/{row['defense']}: within_budget must say whether seconds <= {budget_s}")
        for a, m in undefended.items():
            row = df[(df["attack"] == a) & (df["defense"] == "none")].iloc[0]
            for k in METRICS:
                _close(float(row[k]), m[k], f"{k} of {a} without defense")
        return None

    return test
