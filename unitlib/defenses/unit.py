"""UNIT: Cheng, Shen, Zhang, Tao, An, Guo, Ma and Zhang, "UNIT: Backdoor Mitigation via Automated Neural
Distribution Tightening", ECCV 2024.

Every activation gets an upper bound learned from the defender's clean data; at inference activations are clipped
to their bounds, so a trigger's abnormally large activations cannot carry the backdoor. Three stages:

1. initialise (:func:`initial_bounds`): each bound starts at mean + ``init_std`` std of its clean activations;
2. tighten: minimise cross-entropy + alpha * sum_l mean(bound_l) over the bounds alone, with alpha adapted (Neural
   Cleanse's schedule, :class:`~unitlib.defenses.schedule.AdaptiveCost`) so that validation accuracy stays within
   ``degradation`` of the original model's;
3. choose: keep the bounds with the smallest regulariser among those that met the accuracy budget.

The bounds live in the forward path: each bounded activation module is replaced by a :class:`Bound` (the activation
followed by its bound), so a defended model is an ordinary module that can be copied, saved and moved.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..metrics import accuracy
from ..models.activations import ACTIVATION_TYPES
from ..train import augment, autocast, resolve_device
from .base import CleanSplit, Defense, register
from .schedule import AdaptiveCost

GRANULARITIES = ("element", "channel")
MODES = ("clip", "reject")
SURROGATES = ("clip", "sigmoid")
STEP_UNITS = ("std", "raw")
# The official code's schedule (github.com/Megum1/UNIT): all of 300 full-batch Adam steps at lr 1e-3 in activation
# units, validated every step, alpha patience 5.
OFFICIAL_SCHEDULE: dict[str, Any] = dict(steps=300, lr=1e-3, step_units="raw", batch_size=None, early_stop=False,
                                         patience=5, val_every=1)


# ------------------------------------------------------------------------------------------------ where bounds go


def activation_sites(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """Names of the activation modules of ``model`` in the order a forward pass calls them.

    A module called more than once per forward pass would need one bound per call; such models are refused."""
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, ACTIVATION_TYPES):
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: order.append(name)))
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    repeated = sorted({n for n in order if order.count(n) > 1})
    if repeated:
        raise ValueError(f"activation modules called more than once per forward pass: {', '.join(repeated)}")
    if not order:
        raise ValueError("the model has no activation modules (nn.ReLU, nn.Tanh, ...) to bound")
    return order


def select_layers(sites: list[str], layers: str) -> list[str]:
    """``all``, ``blocks``, ``first:k`` or ``last:k`` of the activation sites (forward order). ``blocks`` keeps the
    appendix's *key layers* (Fig. 14: "each residual block in ResNets"): the last site of each module that holds
    sites, i.e. each residual block's output and the stem's, leaving out the activations inside a block."""
    if layers == "all":
        return list(sites)
    if layers == "blocks":
        last: dict[str, str] = {}
        for site in sites:
            last[site.rpartition(".")[0]] = site
        kept = set(last.values())
        return [s for s in sites if s in kept]
    kind, _, k = layers.partition(":")
    if kind in ("first", "last") and k.isdigit() and int(k) >= 1:
        n = int(k)
        return sites[:n] if kind == "first" else sites[-n:]
    raise ValueError(f"layers must be 'all', 'blocks', 'first:k' or 'last:k' (k >= 1), got {layers!r}")


# ------------------------------------------------------------------------------------------------ bounded models


class Bound(nn.Module):
    """An activation followed by its upper bound: ``min(a, bound)`` (``clip``) or ``a`` zeroed above the bound
    (``reject``). Bounds below 0 act as 0.

    While bounds are learned (``surrogate`` true), rejection, which has no gradient, is replaced by clipping, or,
    where a ``temperature`` is set, by the smooth gate ``a * sigmoid((bound - a) / temperature)``."""

    def __init__(self, activation: nn.Module, bound: torch.Tensor, mode: str = "clip") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid choices: {', '.join(MODES)}")
        self.activation = activation
        self.bound = nn.Parameter(bound.detach().clone().float(), requires_grad=False)
        self.mode = mode
        self.surrogate = False
        self.temperature: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(x)
        bound = self.bound.clamp(min=0).to(out.dtype)
        if self.mode == "reject" and not self.surrogate:
            return torch.where(out > bound, torch.zeros_like(out), out)
        if self.mode == "reject" and self.temperature is not None:
            return out * torch.sigmoid((bound - out) / self.temperature.to(out))
        return torch.minimum(out, bound)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, bound={tuple(self.bound.shape)}"


class BoundedModel(nn.Module):
    """``model`` with each activation module named in ``bounds`` replaced by a :class:`Bound` holding that bound.

    ``model`` itself is changed (pass a copy to keep the original). The bounds are ordinary parameters in the
    forward path: ``copy.deepcopy`` gives a model that clips at its own bounds, and the state dict holds the model
    and the bounds (``model.<site>.bound``)."""

    def __init__(self, model: nn.Module, bounds: dict[str, torch.Tensor], mode: str = "clip") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid choices: {', '.join(MODES)}")
        modules = dict(model.named_modules())
        missing = [n for n in bounds if n not in modules]
        if missing:
            raise ValueError(f"no module named {', '.join(missing)} in the model")
        self.model = model
        self.layers = list(bounds)
        for name, bound in bounds.items():
            parent, _, attr = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            owner._modules[attr] = Bound(modules[name], bound, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def sites(self) -> dict[str, Bound]:
        """The :class:`Bound` modules by site name."""
        return {n: self.model.get_submodule(n) for n in self.layers}  # type: ignore[misc]

    @property
    def mode(self) -> str:
        modes = {b.mode for b in self.sites().values()}
        return modes.pop() if len(modes) == 1 else "mixed"

    def surrogate(self, on: bool, temperatures: dict[str, torch.Tensor] | None = None) -> None:
        """Switch every bound to its learning surrogate (``on``) or to the bound as applied."""
        for name, b in self.sites().items():
            b.surrogate = on
            b.temperature = temperatures.get(name) if (on and temperatures) else None

    def bound_values(self) -> dict[str, torch.Tensor]:
        return {n: b.bound.detach().clamp(min=0) for n, b in self.sites().items()}

    @classmethod
    def from_state_dict(cls, model: nn.Module, state: dict[str, torch.Tensor], mode: str = "clip") -> BoundedModel:
        """Rebuild a saved defended model around a fresh ``model`` of the same architecture."""
        bounds = {k[len("model."):-len(".bound")]: v for k, v in state.items()
                  if k.startswith("model.") and k.endswith(".bound")}
        bounded = cls(model, bounds, mode)
        bounded.load_state_dict(state)
        return bounded


# ------------------------------------------------------------------------------------------------ initialise


@dataclass
class CleanStatistics:
    """Per-site mean and (unbiased) std of clean activations, element-wise or per channel (shaped to broadcast)."""

    sites: list[str]
    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]

    def bounds(self, k: float) -> dict[str, torch.Tensor]:
        """Bounds at mean + ``k`` std for every site."""
        return {s: self.mean[s] + k * self.std[s] for s in self.sites}


@torch.no_grad()
def clean_statistics(
    model: nn.Module, x: torch.Tensor, *, layers: str = "all", granularity: str = "element", chunk: int = 500,
) -> CleanStatistics:
    """Mean and std of each activation site's output over the clean images ``x`` (float in [0, 1]), one pass in
    chunks of ``chunk`` images. ``granularity`` ``channel`` pools samples and spatial positions per channel."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; valid choices: {', '.join(GRANULARITIES)}")
    sites = select_layers(activation_sites(model, x[:2]), layers)
    modules = dict(model.named_modules())
    sums: dict[str, list[torch.Tensor]] = {}

    def hook(name: str):
        def fn(m, i, out):
            o = out.float()
            s = sums.setdefault(name, [torch.zeros_like(o[0]), torch.zeros_like(o[0])])
            s[0] += o.sum(0)
            s[1] += (o * o).sum(0)
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in sites]
    try:
        for i in range(0, len(x), chunk):
            model(x[i : i + chunk])
    finally:
        for h in handles:
            h.remove()
    mean, std = {}, {}
    for name in sites:
        s, sq = sums[name]
        count = len(x)
        channel = granularity == "channel" and s.ndim == 3
        if channel:
            count *= s[0].numel()
            s, sq = s.sum((1, 2)), sq.sum((1, 2))
        m, sd = moments(s, sq, count)
        mean[name], std[name] = (m[:, None, None], sd[:, None, None]) if channel else (m, sd)
    return CleanStatistics(sites, mean, std)


def initial_bounds(
    model: nn.Module, x: torch.Tensor, *, init_std: float = 4.0, layers: str = "all", granularity: str = "element",
    chunk: int = 500,
) -> dict[str, torch.Tensor]:
    """UNIT's starting bounds: mean + ``init_std`` std of each site's clean activations (the official code: 4)."""
    return clean_statistics(model, x, layers=layers, granularity=granularity, chunk=chunk).bounds(init_std)


@torch.no_grad()
def exceedance(
    model: nn.Module, bounds: dict[str, torch.Tensor], x: torch.Tensor, *, chunk: int = 500,
) -> dict[str, float]:
    """Per site, the fraction of the activations of ``model`` (without bounds) on images ``x`` (float in [0, 1])
    that lie above ``bounds`` (by site name, e.g. :meth:`BoundedModel.bound_values`).

    Clipping can only act on a trigger whose activations exceed the bounds more often than clean images' do:
    compare the fraction on triggered inputs with that on clean ones to see where, if anywhere, a trigger is
    abnormal."""
    modules = dict(model.named_modules())
    missing = [n for n in bounds if n not in modules]
    if missing:
        raise ValueError(f"no module named {', '.join(missing)} in the model")
    above = {n: 0 for n in bounds}
    total = {n: 0 for n in bounds}

    def hook(name: str):
        def fn(m, i, out):
            b = bounds[name].to(out.device, out.dtype).clamp(min=0)
            above[name] += int((out > b).sum())
            total[name] += out.numel()
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in bounds]
    try:
        for i in range(0, len(x), chunk):
            model(x[i : i + chunk])
    finally:
        for h in handles:
            h.remove()
    return {n: above[n] / max(total[n], 1) for n in bounds}


def moments(total: torch.Tensor, total_sq: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std (as ``torch.std``) from sums of values and of their squares over ``count`` samples."""
    mean = total / count
    var = ((total_sq - count * mean * mean) / max(count - 1, 1)).clamp(min=0)
    return mean, var.sqrt()


# ------------------------------------------------------------------------------------------------ the defense


@register
@dataclass
class UNIT(Defense):
    """UNIT's neural distribution tightening. Parameters:

    - ``degradation``: accuracy budget on the defender's validation split (appendix: 2%; official code: 3%).
    - ``steps``: the most Adam steps on the bounds (betas 0.5, 0.9); with ``early_stop`` the run ends sooner, when
      the budget binds (below).
    - ``lr`` and ``step_units``: how far a step moves a bound. ``std`` (default): in units of each element's clean
      standard deviation, so the same ``lr`` suits every layer and architecture, whatever its activation scale.
      ``raw`` (the official code): in activation units, so ``steps * lr`` caps how far any bound can move.
    - ``batch_size``: images of the optimise split per step, in a shuffled cycle (``None``: all of them, one full
      batch per step, as the official code).
    - ``early_stop``, ``settle``, ``stop_patience``: stop when the kept bounds' validation accuracy is within
      ``settle`` above the threshold and the last ``stop_patience`` validations together have not lowered the
      regulariser of the kept bounds by more than ``stop_tolerance`` (relative). Together: while alpha is still
      small the regulariser falls by well under ``stop_tolerance`` a step, and bounds that start within ``settle``
      of the threshold would otherwise end the run before alpha grows. Otherwise the run ends at ``steps`` and the
      report says so (``stop_reason``: ``step_cap``) and how far above the threshold the kept bounds were.
    - ``wait_for_relax``: the stopping rule also waits, once the budget has bound (a validation under the
      threshold), until alpha has come back down to its start value (once). After an overshoot alpha falls by
      ``alpha_down`` every ``patience`` checks and the cross-entropy loosens the bounds that carry clean accuracy:
      the run can come back above the threshold with a lower regulariser than any step before the overshoot, which
      the window alone would stop short of (the full 300-step run keeps such a step).
    - ``init_std``: bounds start at mean + init_std * std of clean activations.
    - ``alpha``, ``patience``, ``alpha_up``, ``alpha_down``: the adaptive weight of the bound regulariser (start,
      checks before a change, factors; the official code: 1e-3, 5, 2, 2^1.5). Alpha grows by ``alpha_up`` every
      ``patience`` steps within the budget: a patience of 1 lets the regulariser outrun the cross-entropy within a
      dozen steps, and every bound then falls at the full step, past the budget, before the cross-entropy can say
      which bounds carry clean accuracy (the README's measured section compares the two).
    - ``granularity``: one bound per activation ``element`` (official code) or per ``channel``.
    - ``mode``: ``clip`` to the bound or ``reject`` (zero) values above it (Table 10). Rejection removes more than
      clipping at the same bound, so it needs a looser start (``init_std``) to meet the budget at step 0.
    - ``surrogate``: how ``reject`` bounds are learned, since rejection itself has no gradient: ``clip`` (optimise
      as clipping, apply as rejection) or ``sigmoid`` (a smooth gate ``a * sigmoid((bound - a) / t)``, ``t`` =
      ``temperature`` times the element's clean std, whose gradient says which rejections cost accuracy). The
      appendix does not say how its rejection variant was optimised.
    - ``layers``: ``all``, ``blocks`` (each residual block's output, the appendix's key layers), ``first:k`` or
      ``last:k`` activation sites (Table 10, Fig. 14).
    - ``val_every``: validate every this many steps (1 = every step, as the official code).
    - ``chunk``: images per forward pass; gradients accumulate so a step sees its whole batch.
    - ``freeze_weights``: skip weight gradients (the model is frozen either way; the official code computes them,
      which changes only the seconds).
    - ``augment``: random crop + flip of the optimise split, once, before optimisation.
    - ``augment_val``: the same, once, for the validation split that the budget and every stopping decision are
      judged on (the official code augments both splits). The defender's images are training images the model
      has fit; augmented, their accuracy reads closer to that of images it has not seen. The original model's
      accuracy, and so the threshold, is measured on the same augmented images.
    - ``project``: after each step, raise bounds below 0 to 0, so the cross-entropy can still loosen them (the
      official code only clamps them in the forward pass, where a bound below 0 gets no gradient again).
    - ``seed``: the augmentation's and the batches' random draws.
    """

    name = "unit"
    # parameters added after records were made, at the value that reproduces those records
    added_params: ClassVar[dict[str, Any]] = {"augment_val": False, "wait_for_relax": False}
    citation = "Cheng et al., UNIT: Backdoor Mitigation via Automated Neural Distribution Tightening, ECCV 2024"

    degradation: float = 0.02
    steps: int = 300
    lr: float = 0.1
    step_units: str = "std"
    batch_size: int | None = 256
    early_stop: bool = True
    settle: float = 0.01
    stop_patience: int = 20
    stop_tolerance: float = 0.005
    wait_for_relax: bool = False
    init_std: float = 4.0
    alpha: float = 1e-3
    patience: int = 5
    alpha_up: float = 2.0
    alpha_down: float = 2.0**1.5
    granularity: str = "element"
    mode: str = "clip"
    surrogate: str = "clip"
    temperature: float = 0.5
    layers: str = "all"
    val_every: int = 1
    chunk: int = 500
    freeze_weights: bool = True
    augment: bool = True
    augment_val: bool = False
    project: bool = False
    seed: int = 0
    # The bounds the last run started from (mean + init_std std of its clean activations), by site: what UNIT
    # tightened, for figures that show both.
    initial: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key, valid in (("granularity", GRANULARITIES), ("mode", MODES), ("surrogate", SURROGATES),
                           ("step_units", STEP_UNITS)):
            if getattr(self, key) not in valid:
                raise ValueError(f"unknown {key} {getattr(self, key)!r}; valid choices: {', '.join(valid)}")
        select_layers([], self.layers)  # validates the spelling
        for key in ("degradation", "settle", "stop_tolerance"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{key} must be in [0, 1), got {value!r}")
        ints = ["steps", "patience", "val_every", "chunk", "stop_patience"]
        if self.batch_size is not None:
            ints.append("batch_size")
        for key in ints:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an int >= 1, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        for key in ("lr", "alpha", "temperature"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
        for key in ("alpha_up", "alpha_down"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 1 and math.isfinite(value)):
                raise ValueError(f"{key} must be a finite number > 1, got {value!r}")
        if isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float)) or not math.isfinite(self.init_std):
            raise ValueError(f"init_std must be a finite number, got {self.init_std!r}")
        for key in ("early_stop", "freeze_weights", "augment", "augment_val", "project", "wait_for_relax"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")

    @classmethod
    def official_schedule(cls, **overrides: Any) -> UNIT:
        """The official code's schedule: all of 300 full-batch steps at lr 1e-3 in activation units, validation
        every step, alpha patience 5 (overrides e.g. ``degradation=0.03`` for the code's own budget)."""
        params = {**OFFICIAL_SCHEDULE, **overrides}
        return cls(**params)

    def __call__(
        self, model: nn.Module, clean: CleanSplit, *, device: str | torch.device | None = None, progress: bool = True
    ) -> BoundedModel:
        dev = resolve_device(device)
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed)
        x_opt, y_opt = _float(clean.x_opt).to(dev), clean.y_opt.to(dev)
        x_val, y_val = _float(clean.x_val).to(dev), clean.y_val.to(dev)
        if self.augment:
            x_opt = augment(x_opt, crop=4, flip=True, generator=gen)
        if self.augment_val:
            x_val = augment(x_val, crop=4, flip=True, generator=gen)
        model = copy.deepcopy(model).to(dev).eval()
        for p in model.parameters():
            p.requires_grad_(not self.freeze_weights)

        # The original model's accuracy, measured before any bound is placed.
        base = accuracy(model, x_val, y_val, batch_size=self.chunk, device=dev)
        stats = clean_statistics(model, x_opt, layers=self.layers, granularity=self.granularity, chunk=self.chunk)
        self.initial = {n: b.detach().clamp(min=0).cpu() for n, b in stats.bounds(self.init_std).items()}
        bounded = BoundedModel(model, stats.bounds(self.init_std), self.mode).to(dev)
        temperatures = None
        if self.mode == "reject" and self.surrogate == "sigmoid":
            # a floor keeps the gate finite where the clean std is 0 (e.g. always-off ReLU units)
            temperatures = {n: self.temperature * stats.std[n].clamp(min=1e-3) for n in stats.sites}
        threshold = base - self.degradation
        tightened = self._tighten(bounded, stats, temperatures, x_opt, y_opt, x_val, y_val, threshold, gen,
                                  started, progress)
        for p in model.parameters():
            p.requires_grad_(False)
        bounded.surrogate(False)
        self.report = {"base_val_acc": base, "threshold": threshold, "sites": stats.sites,
                       "n_bounds": sum(b.bound.numel() for b in bounded.sites().values()), **tightened}
        return bounded.eval()

    # -- tighten and choose ----------------------------------------------------------------------------------------
    def _tighten(
        self, bounded: BoundedModel, stats: CleanStatistics, temperatures: dict[str, torch.Tensor] | None,
        x_opt: torch.Tensor, y_opt: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, threshold: float,
        gen: torch.Generator, started: float, progress: bool,
    ) -> dict[str, Any]:
        dev = x_opt.device
        sites = list(bounded.sites().values())
        bounds = [b.bound for b in sites]
        # Each bound = offset + scale * z, and Adam moves z: in ``std`` units a step moves every element by about
        # lr times its own clean std; in ``raw`` units by about lr (offset 0, scale 1).
        if self.step_units == "std":
            offsets = [stats.mean[n].to(dev) for n in stats.sites]
            scales = [stats.std[n].to(dev) for n in stats.sites]
        else:
            offsets = [torch.zeros_like(b) for b in bounds]
            scales = [torch.ones_like(b) for b in bounds]
        zs = [((b.detach() - o) / s.clamp(min=1e-12)).where(s > 0, torch.zeros_like(b)).requires_grad_(True)
              for b, o, s in zip(bounds, offsets, scales)]
        for b in bounds:
            b.requires_grad_(True)
        opt = torch.optim.Adam(zs, lr=self.lr, betas=(0.5, 0.9))
        cost = AdaptiveCost(self.alpha, self.patience, self.alpha_up, self.alpha_down, restart="below_start")

        def val_acc() -> float:
            # Judged as the bounds will be applied: in reject mode a clipped model's accuracy overstates the
            # rejected one's.
            bounded.surrogate(False)
            try:
                return accuracy(bounded, x_val, y_val, batch_size=self.chunk, device=dev)
            finally:
                bounded.surrogate(True, temperatures)

        def reg_value() -> float:
            return sum(b.detach().clamp(min=0).mean().item() for b in bounds)

        def snapshot() -> list[torch.Tensor]:
            return [b.detach().clone() for b in bounds]

        bounded.surrogate(True, temperatures)
        acc0 = val_acc()
        best_reg, best, best_step, best_acc = math.inf, None, -1, float("nan")
        fallback_acc, fallback, fallback_step = acc0, snapshot(), 0
        if acc0 >= threshold:
            best_reg, best, best_step, best_acc = reg_value(), snapshot(), 0, acc0
        reg0 = reg_value()
        init_seconds = time.perf_counter() - started
        n = len(x_opt)
        batch = self.batch_size or n
        order, cursor = torch.randperm(n, generator=gen), 0
        history: list[dict[str, float]] = [{"step": 0, "ce": float("nan"), "reg": reg0, "val_acc": acc0,
                                           "alpha": cost.value}]
        # the kept bounds' regulariser after each validation: the stopping rule compares it across a window
        kept_regs: list[float] = [best_reg]
        stop_reason, step = "step_cap", 0
        # wait_for_relax: whether alpha has come back down to its start value since the budget first bound
        bound_once, relaxed = False, not self.wait_for_relax
        bar = tqdm(range(1, self.steps + 1), desc="unit", unit="step", disable=not progress)
        for step in bar:
            if batch >= n:
                idx = torch.arange(n)
            else:
                if cursor + batch > n:
                    order, cursor = torch.randperm(n, generator=gen), 0
                idx, cursor = order[cursor : cursor + batch], cursor + batch
            idx = idx.to(dev)
            for b in bounds:
                b.grad = None
            ce_total = 0.0
            for i in range(0, len(idx), self.chunk):
                part = idx[i : i + self.chunk]
                with autocast(dev):
                    ce = F.cross_entropy(bounded(x_opt[part]).float(), y_opt[part], reduction="sum") / len(idx)
                ce.backward()
                ce_total += ce.item()
            reg = sum(b.clamp(min=0).mean() for b in bounds)
            (cost.value * reg).backward()
            opt.zero_grad(set_to_none=True)
            for z, b, s in zip(zs, bounds, scales):
                z.grad = b.grad * s if b.grad is not None else torch.zeros_like(z)
            opt.step()
            with torch.no_grad():
                for z, b, o, s in zip(zs, bounds, offsets, scales):
                    if self.project:
                        floor = torch.where(s > 0, -o / s.clamp(min=1e-12), torch.full_like(z, -math.inf))
                        z.copy_(torch.maximum(z, floor))
                    b.copy_(o + s * z)
            if step % self.val_every and step != self.steps:
                continue
            acc, reg_now = val_acc(), reg_value()
            alpha = cost.value
            history.append({"step": step, "ce": ce_total, "reg": reg_now, "val_acc": acc, "alpha": alpha})
            bar.set_postfix(ce=f"{ce_total:.3f}", reg=f"{reg_now:.3f}", acc=f"{acc:.3f}", alpha=f"{alpha:.1e}")
            if acc >= threshold and reg_now < best_reg:
                best_reg, best, best_step, best_acc = reg_now, snapshot(), step, acc
            if acc > fallback_acc:
                fallback_acc, fallback, fallback_step = acc, snapshot(), step
            kept_regs.append(best_reg)
            bound_once = bound_once or acc < threshold
            cost.update(acc >= threshold)
            stalled = (len(kept_regs) > self.stop_patience
                       and not best_reg < kept_regs[-1 - self.stop_patience] * (1 - self.stop_tolerance))
            relaxed = relaxed or (bound_once and cost.value <= self.alpha)
            if (self.early_stop and best is not None and best_acc - threshold <= self.settle and stalled
                    and relaxed):
                stop_reason = "budget"
                break
        bar.close()
        loop_seconds = time.perf_counter() - started - init_seconds

        chosen = best if best is not None else fallback
        with torch.no_grad():
            for b, c in zip(bounds, chosen):
                b.copy_(c.clamp(min=0))
                b.requires_grad_(False)
        final_acc = val_acc()
        kept_acc = best_acc if best is not None else fallback_acc
        return {
            "threshold_met": best is not None,
            "best_step": best_step if best is not None else fallback_step,
            "final_val_acc": final_acc,
            "history": history,
            "steps_run": step,
            # Why tightening ended: the budget bound (the kept bounds sit within ``settle`` of the threshold and
            # the regulariser stopped falling), or the step cap came first.
            "stop_reason": stop_reason,
            "budget_gap": kept_acc - threshold,
            # Whether validation accuracy ever fell below the threshold during tightening.
            "budget_bound": any(h["val_acc"] < threshold for h in history),
            "reg_start": reg0,
            "reg_kept": reg_value(),
            "seconds_init": round(init_seconds, 3),
            "seconds_per_step": round(loop_seconds / max(step, 1), 4),
        }


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255) if x.dtype == torch.uint8 else x.float()
