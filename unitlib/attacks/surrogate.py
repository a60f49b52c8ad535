"""What the model-based attacks (Trojan, CL, NARCISSUS) share: the attacker's own clean or surrogate model, trained
with the project's training loop at a small budget, and a cache of what they learn from it.

Everything is cached as safetensors under ``unitlib.data.cache_dir() / "attacks"``, keyed by a hash of the attack's
parameters and a fingerprint of the data (size, shape, labels and a sample of pixels), so a second run with the same
attack and data loads its trigger instead of training again."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import data, models
from ..train import Recipe, fit, resolve_device
from .base import Attack

CACHE_FORMAT = 2  # 2: the surrogate's initial weights are seeded


def fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """A cheap identity of a data set: shape, every label, and every 97th image's pixels (rounded to 8 bits)."""
    h = hashlib.sha256()
    h.update(json.dumps([list(x.shape), str(x.dtype)]).encode())
    h.update(y.detach().cpu().to(torch.int64).numpy().tobytes())
    sample = x[:: max(1, len(x) // 97)].detach().cpu()
    if sample.dtype != torch.uint8:
        sample = (sample.float().clamp(0, 1) * 255).round().to(torch.uint8)
    h.update(sample.contiguous().numpy().tobytes())
    return h.hexdigest()


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def cache_path(kind: str, key: dict) -> Path:
    return data.cache_dir() / "attacks" / f"{kind}-{digest({'format': CACHE_FORMAT, **key})[:24]}.safetensors"


def load_cached(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors cached at ``path``, or None when there are none. A file that cannot be read (truncated by a
    kill, say) is set aside with a warning naming it, and None returned: the caller redoes the work."""
    if not path.exists():
        return None
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors reports damage as its own SafetensorError
        _set_aside(path, err)
        return None


def _set_aside(path: Path, err: BaseException) -> None:
    from ..results import set_aside  # imported here: results imports the config, which imports the attacks

    set_aside(path, err)


def save_cached(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def surrogate_model(
    x: torch.Tensor, y: torch.Tensor, *, epochs: int, width: int, size: int | None, seed: int,
    device: str | torch.device | None = None, progress: bool = False,
) -> nn.Module:
    """The attacker's clean model: the project's ``small-cnn`` of ``width`` trained for ``epochs`` (one-cycle
    schedule) on a class-balanced subset of ``size`` samples of (x, y) (all of them when ``size`` is None or
    larger). Cached by (budget, seed, data fingerprint); returned in eval mode on ``device``."""
    dev = resolve_device(device)
    num_classes = int(y.max()) + 1
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone, not on earlier draws
        torch.manual_seed(seed)
        model = models.build("small-cnn", num_classes=num_classes, in_channels=x.shape[1], width=width)
    key = {"epochs": epochs, "width": width, "size": size, "seed": seed, "data": fingerprint(x, y)}
    path = cache_path("surrogate", key)
    cached = load_cached(path)
    if cached is not None:
        if {k: v.shape for k, v in cached.items()} == {k: v.shape for k, v in model.state_dict().items()}:
            model.load_state_dict(cached)
            return model.to(dev).eval()
        _set_aside(path, ValueError("its tensors are not this model's"))
    if size is not None and size < len(y):
        idx = data.balanced_subset(y, size, torch.Generator().manual_seed(seed))
        x, y = x[idx], y[idx]
    recipe = Recipe(epochs=epochs, batch_size=128, lr=0.1, schedule="onecycle", label_smoothing=0.1)
    fit(model, x, y, recipe, device=dev, seed=seed, progress=progress, channels_last=False)
    save_cached(path, model.state_dict(), {"key": json.dumps(key)})
    return model.eval()


def check_surrogate_budget(epochs: int, width: int, size: int | None) -> None:
    """Raise ValueError, naming the value, unless a surrogate budget is usable: ``epochs`` >= 1, ``width`` >= 2 and
    ``size`` (images; None: all) >= 10."""
    if epochs < 1:
        raise ValueError(f"surrogate_epochs must be >= 1, got {epochs!r}")
    if width < 2:
        raise ValueError(f"surrogate_width must be >= 2, got {width!r}")
    if size is not None and size < 10:
        raise ValueError(f"surrogate_size must be >= 10 or None, got {size!r}")


@dataclass
class ModelAttack(Attack):
    """An attack that learns its trigger from the attacker's clean model (``surrogate_*`` set its budget: a few
    epochs of the small CNN on a balanced subset of the training set). :meth:`prepare` trains or loads that model,
    then :meth:`learn` (or the cache) provides the trigger state; ``apply``/``poison`` raise until then."""

    needs_prepare = True

    surrogate_epochs: int = 4
    surrogate_width: int = 16
    surrogate_size: int | None = 10000

    def __post_init__(self) -> None:
        super().__post_init__()
        check_surrogate_budget(self.surrogate_epochs, self.surrogate_width, self.surrogate_size)

    # The trigger does not depend on how many samples are poisoned.
    def trigger_key(self) -> dict:
        return {k: v for k, v in self.params().items() if k != "poison_rate"}

    def model(self, x: torch.Tensor, y: torch.Tensor, *, device=None, progress: bool = False) -> nn.Module:
        """The attacker's clean model for (x, y) (cached, see :func:`surrogate_model`)."""
        return surrogate_model(x, y, epochs=self.surrogate_epochs, width=self.surrogate_width,
                               size=self.surrogate_size, seed=self.seed, device=device, progress=progress)

    def learn(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """Learn the trigger state (tensors) from the clean ``model``."""
        raise NotImplementedError

    def prepare(self, x: torch.Tensor, y: torch.Tensor, *, device=None, progress: bool = False) -> None:
        if self.target >= int(y.max()) + 1:
            raise ValueError(f"target {self.target} is not a class of the data (0..{int(y.max())})")
        dev = resolve_device(device)
        self._data_key = fingerprint(x, y)
        path = cache_path(self.name, {**self.trigger_key(), "data": self._data_key})
        state = load_cached(path)
        if state is None:
            model = self.model(x, y, device=dev, progress=progress)
            for p in model.parameters():
                p.requires_grad_(False)
            state = self.learn(model, x, y, dev)
            save_cached(path, state, {"attack": self.name, "params": json.dumps(self.trigger_key(), default=str)})
        self._state = {k: v.cpu() for k, v in state.items()}
