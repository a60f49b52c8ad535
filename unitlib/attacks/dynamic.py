"""Dynamic: Salem, Wen, Backes, Ma and Zhang, "Dynamic Backdoor Attacks Against Machine Learning Models",
EuroS&P 2022: triggers with random patterns at random locations. Of the paper's three techniques this is the
single-target pair: the Backdoor Generating Network (BaN), a generator that maps uniform noise to a trigger patch and
is trained jointly with the classifier (the classifier's loss on backdoored samples, labelled with the target,
trains both), and the Random Backdoor, whose patch pixels are drawn from a uniform distribution. Each poisoned image
gets a fresh noise vector and a location drawn uniformly among every position where the patch fits, at training and
at test time alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .joint import JointAttack
from .registry import register

TECHNIQUES = ("ban", "random")


class BaN(nn.Sequential):
    """The Backdoor Generating Network: fully connected ``noise_dim`` -> 64 -> 128 -> 128 -> C*size*size, ReLU and
    dropout (0.5) between, a sigmoid at the end (the authors' CIFAR-10 code, without the target-class input of its
    conditional variant)."""

    def __init__(self, noise_dim: int, channels: int, size: int, dropout: float = 0.5) -> None:
        super().__init__(
            nn.Linear(noise_dim, 64), nn.ReLU(),
            nn.Linear(64, 128), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(128, 128), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(128, channels * size * size), nn.Sigmoid(),
        )
        self.shape = (channels, size, size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return super().forward(z).view(len(z), *self.shape)


@register
@dataclass
class Dynamic(JointAttack):
    """``technique`` ``"ban"`` (the default) or ``"random"`` (the Random Backdoor: no network, uniform pixels);
    ``trigger_size`` 5 (5 x 5 patches on CIFAR-10), ``noise_dim`` 100, uniform noise in [0, 1), Adam at its default
    learning rate 1e-3 for the BaN (the authors' code). The classifier trains with the project's recipe (the authors'
    code: a small CNN with Adam) and the project's augmentation (crop, flip) before the trigger is placed. The
    backdoored samples are ``poison_rate`` of the set, drawn from non-target classes (the authors' code backdoors a
    copy of every batch)."""

    name = "dynamic"
    citation = ("Salem, Wen, Backes, Ma and Zhang, Dynamic Backdoor Attacks Against Machine Learning Models, "
                "EuroS&P 2022")

    technique: str = "ban"
    trigger_size: int = 5
    noise_dim: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.technique not in TECHNIQUES:
            raise ValueError(f"unknown Dynamic technique {self.technique!r}; valid choices: {', '.join(TECHNIQUES)}")
        if self.trigger_size < 1:
            raise ValueError(f"trigger_size must be >= 1 (pixels), got {self.trigger_size!r}")
        if self.noise_dim < 1:
            raise ValueError(f"noise_dim must be >= 1, got {self.noise_dim!r}")

    def build_generator(self, shape):
        c, h, w = shape
        if self.trigger_size > min(h, w):
            raise ValueError(f"trigger_size {self.trigger_size} does not fit images of {h} x {w}")
        if self.technique == "random":
            return nn.Identity()
        return BaN(self.noise_dim, c, self.trigger_size)

    def draws(self, n: int, height: int, width: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        """Per image: the noise vector (or, for the Random Backdoor, the patch itself) and the patch's top-left
        corner, uniform over every position where it fits."""
        s = self.trigger_size
        c = self._shape[0]
        noise = torch.rand(n, c, s, s, generator=g) if self.technique == "random" else \
            torch.rand(n, self.noise_dim, generator=g)
        return {"noise": noise, "row": torch.randint(0, height - s + 1, (n,), generator=g),
                "col": torch.randint(0, width - s + 1, (n,), generator=g)}

    def patches(self, noise: torch.Tensor) -> torch.Tensor:
        return noise if self.technique == "random" else self.networks["gen"](noise)

    def place(self, x: torch.Tensor, patch: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """``x`` with each ``patch`` pasted at its (row, col); differentiable in ``patch``."""
        s = self.trigger_size
        dev = x.device
        n, c = x.shape[:2]
        rows = (row.to(dev)[:, None] + torch.arange(s, device=dev))[:, None, :, None]
        cols = (col.to(dev)[:, None] + torch.arange(s, device=dev))[:, None, None, :]
        b = torch.arange(n, device=dev)[:, None, None, None]
        ch = torch.arange(c, device=dev)[None, :, None, None]
        return x.index_put((b, ch, rows, cols), patch.to(x.dtype))

    def stamp(self, x):
        d = self.draws(len(x), *x.shape[-2:], self.generator(salt=53))
        return self.place(x, self.patches(d["noise"].to(x.device)), d["row"], d["col"])

    def train_batch(self, x, y, role, step):
        payload = torch.nonzero(role == 1).flatten()
        if not len(payload):
            return x, y, None
        d = self.draws(len(payload), *x.shape[-2:], self.generator(salt=59 + 7919 * step))
        stamped = self.place(x[payload], self.patches(d["noise"].to(x.device)), d["row"], d["col"])
        out = x.index_put((payload,), stamped)
        return out, y.index_put((payload,), torch.full_like(payload, self.target)), None
