"""What the attacks that train their trigger generator together with the victim classifier (IA, Dynamic) share.

Such an attack poisons the training set while the model trains: at every step of the one training loop
(:func:`unitlib.train.fit`, through its :class:`~unitlib.train.BatchHook`) the attack's generator makes the triggers
of the batch's poisoned samples, the classifier's loss on them flows back into the generator, and the generator takes
its own optimiser step. Afterwards the trained generator is the attack's state: :meth:`JointAttack.apply` stamps its
triggers at test time, and :meth:`JointAttack.poison` returns the training set as the trained generator poisons it.

Which samples the attacker touches is fixed in advance (``poison_rate`` of the set, drawn from non-target classes,
plus any cross/cover samples), as in the project's other attacks, so that no defender's clean split ever holds one;
the papers instead poison a fixed share of every batch, drawn afresh each epoch. The triggers themselves are made
afresh at every step, as in the papers.

The trained generator is cached as safetensors under ``unitlib.data.cache_dir() / "attacks"``, keyed by the attack's
parameters, what its training depended on (the experiment's model key) and a fingerprint of the data, so that a
model loaded from the cache gets its own generator back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import models
from ..train import Recipe, fit, resolve_device
from .base import Attack, Poisoned
from .surrogate import cache_path, fingerprint, load_cached, save_cached


@dataclass
class JointAttack(Attack):
    """Base class. Subclasses implement :meth:`build_generator` (the networks trained with the model), :meth:`stamp`
    (test-time triggers from the trained generator) and :meth:`train_batch` (one step's poisoning, differentiable in
    the generator); optionally :meth:`pretrain` (parts learnt before the joint training and then frozen, as IA's
    mask generator), :meth:`cover` (samples that keep their label) and :meth:`stamp_cover`."""

    needs_prepare = True
    trains_with_model: ClassVar[bool] = True
    # Adam's betas for the generator (both papers' code use Adam; IA with these betas).
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)

    generator_lr: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.generator_lr > 0:
            raise ValueError(f"generator_lr must be > 0, got {self.generator_lr!r}")

    # -- what subclasses provide ---------------------------------------------------------------------------------------
    def build_generator(self, shape: tuple[int, int, int]) -> nn.Module:
        """The networks trained with the classifier, for images of ``shape`` (C, H, W)."""
        raise NotImplementedError

    def pretrain(self, x: torch.Tensor, y: torch.Tensor, device: torch.device, progress: bool) -> nn.Module | None:
        """Networks learnt before the joint training and frozen during it (None: there are none)."""
        del x, y, device, progress
        return None

    def train_batch(
        self, x: torch.Tensor, y: torch.Tensor, role: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One training step's batch, poisoned by the current generator: ``role`` is 1 for payload samples (trigger
        and target label), 2 for cover samples, 0 for clean ones. Returns images, labels and an extra loss term."""
        raise NotImplementedError

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """The trained generator's test-time trigger on ``x`` (on ``x``'s device, no gradients)."""
        raise NotImplementedError

    def cover(self, y: torch.Tensor, payload: torch.Tensor) -> torch.Tensor:
        """Indices of samples that carry a trigger variant but keep their label (none by default)."""
        del y, payload
        return torch.empty(0, dtype=torch.long)

    def stamp_cover(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The cover samples ``x[index]`` as the trained generator poisons them."""
        raise NotImplementedError

    def lr_factor(self, progress: float) -> float:
        """The generator's learning rate at ``progress`` in [0, 1] of training, as a multiple of ``generator_lr``."""
        del progress
        return 1.0

    # -- state ---------------------------------------------------------------------------------------------------------
    @property
    def prepared(self) -> bool:
        """Whether the generator has been trained with a model (or loaded from the cache)."""
        return getattr(self, "_trained", False)

    def require_prepared(self) -> None:
        if not self.prepared:
            raise RuntimeError(
                f"attack {self.name!r} trains its trigger generator with the model: call .prepare(x_train, y_train) "
                "and train a model with it (unitlib.attacks.joint.train_with_model, or fit(..., hook=attack.hook(y))) "
                "or load a trained one (.load_trained) before .apply() or .poison()"
            )

    @property
    def networks(self) -> nn.ModuleDict:
        """The generator (``gen``) and any frozen pre-trained part (``fixed``)."""
        nets = getattr(self, "_nets", None)
        if nets is None:
            raise RuntimeError(f"attack {self.name!r}: call .prepare(x_train, y_train) first")
        return nets

    def _fresh_generator(self, shape: tuple[int, int, int]) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone
            torch.manual_seed(self.seed * 1_000_003 + 31)
            return self.build_generator(shape)

    def prepare(self, x: torch.Tensor, y: torch.Tensor, *, device=None, progress: bool = False) -> None:
        """Check the data, build the untrained generator and run (or load) any pre-training. The generator itself
        is trained by the classifier's training loop, through :meth:`hook`."""
        if self.target >= int(y.max()) + 1:
            raise ValueError(f"target {self.target} is not a class of the data (0..{int(y.max())})")
        dev = resolve_device(device)
        self._shape = tuple(x.shape[1:])
        self._data_key = fingerprint(x, y)
        fixed = self.pretrain(x, y, dev, progress)
        nets = nn.ModuleDict({"gen": self._fresh_generator(self._shape)})
        if fixed is not None:
            nets["fixed"] = fixed.cpu().eval().requires_grad_(False)
        self._nets = nets
        self._trained = False

    # -- the poisoned set ----------------------------------------------------------------------------------------------
    def roles(self, y: torch.Tensor) -> torch.Tensor:
        """Each training sample's role: 0 clean, 1 payload (``poison_rate`` of the set, non-target), 2 cover."""
        payload = self.select(y)
        role = torch.zeros(len(y), dtype=torch.long)
        role[payload] = 1
        role[self.cover(y, payload)] = 2
        return role

    def hook(self, y: torch.Tensor) -> JointHook:
        """The training loop's hook for a training set labelled ``y``: a freshly initialised generator, trained
        with the model that ``fit(..., hook=...)`` trains. After ``fit`` the attack holds the trained generator."""
        nets = self.networks
        nets["gen"] = self._fresh_generator(self._shape)
        self._trained = False
        return JointHook(self, self.roles(y))

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> Poisoned:
        """The training set as the trained generator poisons it: the payload with its trigger and the target label,
        cover samples with theirs at their own label. (Training itself re-makes the triggers at every step.)"""
        self.require_prepared()
        role = self.roles(y)
        payload = torch.nonzero(role == 1).flatten()
        cover = torch.nonzero(role == 2).flatten()
        x, y = x.clone(), y.clone()
        if len(payload):
            x[payload] = self.apply_train(x[payload]).clamp(0, 1)
            y[payload] = self.target
        if len(cover):
            x[cover] = self.stamp_cover(x, cover).clamp(0, 1)
        return Poisoned(x, y, torch.nonzero(role > 0).flatten(), cover)

    @torch.no_grad()
    def apply(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        self.require_prepared()
        if not len(x):
            return x.clone()
        self.networks.to(x.device).eval()
        return torch.cat([self.stamp(x[i : i + batch_size]).clamp(0, 1) for i in range(0, len(x), batch_size)])

    # -- the cache -----------------------------------------------------------------------------------------------------
    def trained_path(self, context: dict):
        """Where the generator trained in ``context`` (what else its training depended on: the model, the recipe)
        is cached: keyed by the attack's parameters, ``context`` and the data's fingerprint."""
        return cache_path(self.name, {"params": self.params(), "training": context,
                                      "data": getattr(self, "_data_key", None)})

    def save_trained(self, context: dict) -> None:
        self.require_prepared()
        save_cached(self.trained_path(context), self.networks.state_dict(),
                    {"attack": self.name, "params": json.dumps(self.params(), default=str),
                     "training": json.dumps(context, default=str)})

    def load_trained(self, context: dict) -> bool:
        """Load the generator trained in ``context`` from the cache; False (and nothing changed) when there is none."""
        nets = self.networks
        state = load_cached(self.trained_path(context))
        if state is None or {k: v.shape for k, v in state.items()} != {
                k: v.shape for k, v in nets.state_dict().items()}:
            return False
        nets.load_state_dict(state)
        nets.eval()
        self._trained = True
        return True


class JointHook:
    """The :class:`~unitlib.train.BatchHook` of a :class:`JointAttack`: looks up each batch sample's role, lets the
    attack poison the batch with its current generator, and steps the generator's Adam optimiser after the
    classifier's step (learning rate ``generator_lr`` times the attack's schedule)."""

    def __init__(self, attack: JointAttack, role: torch.Tensor) -> None:
        self.attack = attack
        self.role = role
        self.opt: torch.optim.Optimizer | None = None
        self.total = 1
        # the generator's initial weights: begin() starts from them again after a checkpoint that failed to load
        self.initial = {k: v.clone() for k, v in attack.networks["gen"].state_dict().items()}

    def begin(self, x: torch.Tensor, y: torch.Tensor, device: torch.device, total_steps: int) -> None:
        if len(self.role) != len(x):
            raise ValueError(f"the hook was made for {len(self.role)} training samples, the loop has {len(x)}")
        del y
        nets = self.attack.networks
        nets["gen"].load_state_dict(self.initial)
        nets.to(device)
        nets["gen"].train()
        if "fixed" in nets:
            nets["fixed"].eval()
        self.role = self.role.to(device)
        self.total = max(1, total_steps)
        params = [p for p in nets["gen"].parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=self.attack.generator_lr, betas=self.attack.adam_betas) \
            if params else None

    def batch(self, x, y, index, step):
        if self.opt is not None:
            for g in self.opt.param_groups:
                g["lr"] = self.attack.generator_lr * self.attack.lr_factor(step / self.total)
            self.opt.zero_grad(set_to_none=True)
        return self.attack.train_batch(x, y, self.role[index], step)

    def after_step(self, step: int) -> None:
        del step
        if self.opt is not None:
            self.opt.step()
        self.attack._trained = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"gen.{k}": v for k, v in self.attack.networks["gen"].state_dict().items()}
        if self.opt is not None:
            for i, p in enumerate(self.opt.param_groups[0]["params"]):
                for k, v in self.opt.state.get(p, {}).items():
                    out[f"adam.{i}.{k}"] = torch.as_tensor(v)
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        gen = self.attack.networks["gen"]
        own = {k[4:]: v for k, v in tensors.items() if k.startswith("gen.")}
        if own:
            gen.load_state_dict(own)
        if self.opt is not None:
            for i, p in enumerate(self.opt.param_groups[0]["params"]):
                state = {k.split(".", 2)[2]: v.to(p.device) for k, v in tensors.items()
                         if k.startswith(f"adam.{i}.")}
                if state:
                    state["step"] = state["step"].cpu().float()
                    self.opt.state[p] = state


def train_with_model(
    attack: JointAttack, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 2, width: int = 16,
    batch_size: int = 128, lr: float = 0.05, device=None, progress: bool = False,
) -> nn.Module | None:
    """Train the attack's generator together with a small model (the project's ``small-cnn`` of ``width``,
    ``epochs`` of the one-cycle recipe) on (x, y), preparing the attack first; returns that model. Cached: a second
    call with the same attack, budget and data loads the generator and trains nothing (the returned model is then
    None). For the trigger gallery and tests; experiments train their own model (:mod:`unitlib.experiment`)."""
    dev = resolve_device(device)
    attack.prepare(x, y, device=dev, progress=progress)
    context = {"model": "small-cnn", "width": width, "epochs": epochs, "batch_size": batch_size, "lr": lr,
               "seed": attack.seed}
    if attack.load_trained(context):
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(attack.seed)
        model = models.build("small-cnn", num_classes=int(y.max()) + 1, in_channels=x.shape[1], width=width)
    recipe = Recipe(epochs=epochs, batch_size=batch_size, lr=lr, schedule="onecycle")
    fit(model, x, y, recipe, device=dev, seed=attack.seed, progress=progress, channels_last=False,
        hook=attack.hook(y))
    attack.networks.cpu().eval()
    attack.save_trained(context)
    return model
