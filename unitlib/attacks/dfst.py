"""DFST: Cheng, Liu, Ma and Zhang, "Deep Feature Space Trojan Attack of Neural Networks by Controlled
Detoxification", AAAI 2021.

The trigger is a style: an image-to-image generator restyles the whole input (the paper: a CycleGAN trained to carry
images into a "sunrise" weather domain), and the poisoned image is the input blended with its restyled self. A
dirty-label share of non-target training images carries it with the target label. Then *controlled detoxification*
keeps the model from settling on the trigger's simple features: after the model has been trojaned, the neurons
whose activation the trigger raises most are the *compromised* ones; a *feature injector* (the detoxicant
generator) is trained to reproduce what excites them (it drives the model to the target label while its output stays
similar to the input); its outputs, the *detoxicants*, join the training set with their true labels, so that the
only way left to the target label is the trigger's deeper features. Retrain and repeat for a few rounds.

Everything the attacker learns happens in :meth:`DFST.prepare`, on the attacker's own small models, and is cached;
:meth:`DFST.poison` then writes the payload and the detoxicants into the training set once (see the class docstring
for how this maps onto the paper's procedure)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import data, models
from ..train import Recipe, fit, resolve_device
from .base import Attack, Poisoned
from .photos import PHOTOS, random_crops
from .registry import register
from .surrogate import cache_path, check_surrogate_budget, fingerprint, load_cached, save_cached

# The smoke profile's budget (synthetic data, six epochs of a width-8 small CNN): a narrower generator with one
# residual block trained for 150 steps, two detoxification rounds of five injector epochs on 500 images, attacker
# models of width 8 trained for 2 epochs.
SMOKE_PARAMS: dict[str, object] = {
    "generator_width": 8, "generator_blocks": 1, "style_steps": 150, "detox_rounds": 2, "detox_epochs": 5,
    "detox_size": 500, "surrogate_epochs": 2, "surrogate_width": 8,
}
DETOX_LAYERS = ("groups.0", "groups.1", "groups.2")  # the attacker's small CNN's conv groups, shallow to deep
WINDOW = 11  # the feature injector's local max/min/mean window (the authors' code)
SSIM_WINDOW = 5  # the detoxicants' SSIM window (the authors' code)


# -- the trigger generator ---------------------------------------------------------------------------------------------
class _ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c, affine=True), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


def _conv(c_in: int, c_out: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.ReflectionPad2d(k // 2), nn.Conv2d(c_in, c_out, k, stride), nn.InstanceNorm2d(c_out, affine=True),
            nn.ReLU(inplace=True)]


class StyleGenerator(nn.Module):
    """The CycleGAN generator of the authors' code, narrower: a 7x7 convolution of ``width`` channels, two stride-2
    convolutions (``2 width``, ``4 width``), ``blocks`` residual blocks, two upsample-and-convolve stages back to
    ``width`` and a 7x7 convolution to the image's channels; instance norm and ReLU throughout, reflection padding,
    ``tanh`` output mapped to [0, 1]. The authors': width 32, nine residual blocks."""

    def __init__(self, channels: int, width: int = 16, blocks: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv(channels, width, 7), *_conv(width, 2 * width, 3, 2),
                                   *_conv(2 * width, 4 * width, 3, 2)]
        layers += [_ResBlock(4 * width) for _ in range(blocks)]
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), *_conv(4 * width, 2 * width, 3),
                   nn.Upsample(scale_factor=2, mode="nearest"), *_conv(2 * width, width, 3),
                   nn.ReflectionPad2d(3), nn.Conv2d(width, channels, 7)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(x)) / 2 + 0.5


class StyleFeatures(nn.Module):
    """The features whose Gram matrices define a style: the pixels (their colour statistics) and three ReLU layers
    of a fixed convolutional network with random weights (16, 32, 64 channels of 3x3 filters, 2x average pooling
    between them). Random filters capture texture statistics well enough for synthesis (Ustyuzhaninov, Brendel,
    Gatys and Bethge, "What does it take to generate natural textures?", ICLR 2017); an ImageNet VGG, as in the
    style-transfer networks DFST uses, cannot be downloaded here."""

    def __init__(self, channels: int, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.convs = nn.ModuleList([nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="reflect")
                                        for c_in, c_out in ((channels, 16), (16, 32), (32, 64))])
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [x - 0.5]
        h = x - 0.5
        for i, conv in enumerate(self.convs):
            if i:
                h = F.avg_pool2d(h, 2)
            h = F.relu(conv(h))
            feats.append(h)
        return feats


def gram(f: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of each sample's feature maps (N x C x C), normalised by the number of positions."""
    flat = f.flatten(2)
    return flat @ flat.transpose(1, 2) / flat.shape[-1]


def style_distance(feats: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """Per sample, the sum over layers of the squared distance between its Gram matrix and the style's, each
    relative to the style Gram matrix's squared norm (so that no layer dominates by its scale)."""
    return sum(((gram(f) - t).pow(2).flatten(1).sum(1) / t.pow(2).sum()) for f, t in zip(feats, target))


# -- the detoxicant generator ------------------------------------------------------------------------------------------
class FeatureInjector(nn.Module):
    """The authors' feature injector: each output pixel is a learnt linear map of the input pixel and of the local
    maximum, minimum and mean over a ``window`` x ``window`` neighbourhood (4C inputs to C outputs), clamped to
    [0, 1], starting from the identity. (The authors' code negates the local maximum where the design names the
    local minimum; this takes the minimum.)"""

    def __init__(self, channels: int, window: int = WINDOW) -> None:
        super().__init__()
        self.window = window
        self.delta = nn.Parameter(torch.cat([torch.eye(channels), torch.zeros(3 * channels, channels)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.window // 2
        local_max = F.max_pool2d(x, self.window, 1, pad)
        local_min = -F.max_pool2d(-x, self.window, 1, pad)
        local_mean = F.avg_pool2d(x, self.window, 1, pad, count_include_pad=False)
        feats = torch.cat([x, local_max, local_min, local_mean], 1)
        return torch.einsum("nkhw,kc->nchw", feats, self.delta).clamp(0, 1)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity of two image batches in [0, 1] (Gaussian window, per channel)."""
    c = a.shape[1]
    coords = torch.arange(window, dtype=a.dtype, device=a.device) - window // 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, [window // 2] * 4, mode="reflect"), kernel, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean()


# -- the attack --------------------------------------------------------------------------------------------------------
@register
@dataclass
class DFST(Attack):
    """The trigger: ``(1 - alpha) x + alpha G(x)`` with ``G`` a style generator and ``alpha`` 0.6 (the authors'
    code). The paper's ``G`` is a CycleGAN generator trained between the training images and a "sunrise" photo set;
    the authors' current code uses a pre-trained arbitrary style-transfer network with a sunrise style image. Neither
    the weather photos nor a pre-trained network can be had offline, so ``G`` (:class:`StyleGenerator`, the
    CycleGAN generator narrowed) is trained here as a fast style-transfer network (Johnson, Alahi and Fei-Fei, ECCV
    2016): Adam (``style_lr``) for ``style_steps`` batches of the attacker's images, minimising ``style_weight``
    times the Gram-matrix distance of ``G(x)`` to crops of the ``style`` photo (default ``coffee``, the warm
    orange-brown palette of the bundled photos; features: :class:`StyleFeatures`) plus ``content_weight`` times the
    relative feature distance of ``G(x)`` to ``x`` and ``tv_weight`` times total variation.

    Controlled detoxification, the paper's loop (trojan the model, find compromised neurons, train a feature
    injector, add its detoxicants with their true labels, retrain; repeat), runs on the attacker's own model in
    :meth:`prepare`: for each of ``detox_rounds`` rounds, a small CNN (``surrogate_*``, trained from scratch) learns a
    balanced subset of ``surrogate_size`` training images poisoned as the victim's set will be, with the
    detoxicants of the rounds before; the ``detox_neuron_ratio`` share (at least one) of the channels of its layer
    ``detox_layer`` whose mean activation rises most from ``detox_size`` clean images to their restyled versions
    are the compromised neurons (the authors' current code: top 1% of ResNet-18's ``layer4``; their first code and
    the paper: every neuron whose elevation passes a threshold); a :class:`FeatureInjector` is trained for
    ``detox_epochs`` over those clean images (Adam ``detox_lr`` 0.01, betas (0.5, 0.9)) on the authors' loss:
    cross-entropy of the detoxicant ``(1 - alpha) x + alpha I(x)`` towards the target, ``w_ssim`` 0.1 times its
    SSIM dissimilarity to ``x`` (window 5), minus ``w_detox`` 0.3 times the compromised neurons' mean value before
    and after their activation function (the authors' first code maximises both: the first keeps a gradient where
    the ReLU cuts the second off).
    :meth:`poison` restyles ``poison_rate`` of the set (non-target samples, target label) and turns
    ``detox_ratio`` times as many other samples into detoxicants of the rounds' injectors in turn, labels kept
    (``Poisoned.cover``). The authors' code trains the injector with the model's forward pass under ``no_grad``
    and subtracts the SSIM *loss*, so only its similarity term moves it, towards dissimilarity; here gradients flow
    through the frozen model and similarity is kept, as the paper describes.

    The authors' code detoxifies after every one of 200 epochs of the victim's training, re-drawing the detoxicants
    in every batch (as many as the batch's poisoned samples: ``detox_ratio`` 1), its injector trained on about 3% of
    the training set (11 batches of 128 CIFAR-10 images; ``detox_size`` 1500); here a fixed set of detoxicants from
    ``detox_rounds`` rounds on the attacker's model is written into the training set once, so the victim trains
    once, with the project's loop. Scaled down for CPUs (the authors' values in brackets): ``generator_width`` 16
    [32], ``generator_blocks`` 2 [9], a style network trained for ``style_steps`` 400 batches of 32 instead of a
    CycleGAN; ``detox_rounds`` 3 [one after each of 200 epochs];
    the attacker's model is the small CNN for 4 epochs on 10,000 images [ResNet-18, the victim itself]. The class
    default ``poison_rate`` is the authors' (0.05); experiments pass their own."""

    name = "dfst"
    citation = ("Cheng, Liu, Ma and Zhang, Deep Feature Space Trojan Attack of Neural Networks by Controlled "
                "Detoxification, AAAI 2021")
    needs_prepare = True

    poison_rate: float = 0.05
    alpha: float = 0.6
    style: str = "coffee"
    generator_width: int = 16
    generator_blocks: int = 2
    style_steps: int = 400
    style_lr: float = 1e-3
    style_weight: float = 1.0
    content_weight: float = 1.0
    tv_weight: float = 1e-3
    detox_rounds: int = 3
    detox_layer: str = "groups.2"
    detox_neuron_ratio: float = 0.01
    detox_epochs: int = 10
    detox_size: int = 1500
    detox_ratio: float = 1.0
    detox_lr: float = 1e-2
    w_ssim: float = 0.1
    w_detox: float = 0.3
    surrogate_epochs: int = 4
    surrogate_width: int = 16
    surrogate_size: int | None = 10000

    STYLE_BATCH = 32  # images per style-generator step (and style crops)
    DETOX_BATCH = 128  # the authors' batch size

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1] (the restyled image's weight), got {self.alpha!r}")
        if self.style not in PHOTOS:
            raise ValueError(f"unknown style {self.style!r}; valid choices: {', '.join(PHOTOS)}")
        if self.detox_layer not in DETOX_LAYERS:
            raise ValueError(f"unknown detox_layer {self.detox_layer!r}; valid choices: {', '.join(DETOX_LAYERS)}")
        for key, low in (("generator_width", 2), ("generator_blocks", 0), ("style_steps", 1), ("detox_rounds", 0),
                         ("detox_epochs", 1), ("detox_size", 2)):
            if getattr(self, key) < low:
                raise ValueError(f"{key} must be >= {low}, got {getattr(self, key)!r}")
        if not 0.0 < self.detox_neuron_ratio <= 1.0:
            raise ValueError(f"detox_neuron_ratio must be in (0, 1], got {self.detox_neuron_ratio!r}")
        for key in ("style_lr", "detox_lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)!r}")
        for key in ("style_weight", "content_weight", "tv_weight", "detox_ratio", "w_ssim", "w_detox"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        check_surrogate_budget(self.surrogate_epochs, self.surrogate_width, self.surrogate_size)

    # -- the style generator -------------------------------------------------------------------------------------------
    def _style_key(self) -> dict:
        keys = ("style", "generator_width", "generator_blocks", "style_steps", "style_lr", "style_weight",
                "content_weight", "tv_weight", "seed")
        return {k: getattr(self, k) for k in keys}

    def _new_generator(self, channels: int) -> StyleGenerator:
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone
            torch.manual_seed(self.seed * 1_000_003 + 61)
            return StyleGenerator(channels, self.generator_width, self.generator_blocks)

    def style_target(self, shape: tuple[int, int, int], device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """The style's Gram matrices (one per :class:`StyleFeatures` layer), averaged over crops of the photo."""
        crops = random_crops(self.style, 4 * self.STYLE_BATCH, shape[0], tuple(shape[1:]), self.generator(salt=63))
        feats = self.style_features(shape[0]).to(device)(crops.to(device))
        return [gram(f).mean(0) for f in feats]

    def style_features(self, channels: int) -> StyleFeatures:
        return StyleFeatures(channels, self.seed * 1_000_003 + 67)

    def _train_style(self, x: torch.Tensor, device: torch.device, progress: bool) -> StyleGenerator:
        gen = self._new_generator(x.shape[1]).to(device).train()
        feats = self.style_features(x.shape[1]).to(device)
        target = self.style_target(tuple(x.shape[1:]), device)
        opt = torch.optim.Adam(gen.parameters(), lr=self.style_lr)
        g = self.generator(salt=65)
        for step in range(self.style_steps):
            xb = x[torch.randint(0, len(x), (min(self.STYLE_BATCH, len(x)),), generator=g)].to(device)
            out = gen(xb)
            f_out, f_in = feats(out), feats(xb)
            style = style_distance(f_out, target).mean()
            content = ((f_out[2] - f_in[2]).pow(2).mean() / f_in[2].pow(2).mean().clamp_min(1e-8))
            tv = (out[..., 1:, :] - out[..., :-1, :]).abs().mean() + (out[..., 1:] - out[..., :-1]).abs().mean()
            loss = self.style_weight * style + self.content_weight * content + self.tv_weight * tv
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress and (step + 1) % 100 == 0:
                print(f"dfst style step {step + 1}/{self.style_steps}: style {style.item():.3f} "
                      f"content {content.item():.3f}")
        return gen.cpu().eval()

    # -- detoxification ------------------------------------------------------------------------------------------------
    def _surrogate(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, rnd: int,
                   device: torch.device, progress: bool) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + 71 + rnd)
            model = models.build("small-cnn", num_classes=num_classes, in_channels=x.shape[1],
                                 width=self.surrogate_width)
        recipe = Recipe(epochs=self.surrogate_epochs, batch_size=128, lr=0.1, schedule="onecycle",
                        label_smoothing=0.1)
        fit(model, x, y, recipe, device=device, seed=self.seed + rnd, progress=progress, channels_last=False)
        return model.eval().requires_grad_(False)

    def _layer(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(f"net.{self.detox_layer}")

    def _activations(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's logits and the detox layer's per-channel maps for ``x``: before its last activation function
        and after it (the layer's output)."""
        seen: list[torch.Tensor] = []
        layer = self._layer(model)
        handles = [layer.bn2.register_forward_hook(lambda m, i, o: seen.append(o)),
                   layer.register_forward_hook(lambda m, i, o: seen.append(o))]
        try:
            logits = model(x)
        finally:
            for h in handles:
                h.remove()
        return logits, seen[0], seen[1]

    def _channel_means(self, model: nn.Module, x: torch.Tensor, device: torch.device,
                       which: int = 2) -> torch.Tensor:
        """Mean over ``x`` and positions of each channel of the detox layer: before (``which`` 1) or after (2) its
        activation function."""
        with torch.no_grad():
            return torch.cat([self._activations(model, x[i : i + 256].to(device))[which].mean((2, 3))
                              for i in range(0, len(x), 256)]).mean(0).cpu()

    def _detox_round(self, model: nn.Module, clean: torch.Tensor, styled: torch.Tensor, device: torch.device,
                     rnd: int, progress: bool) -> dict[str, torch.Tensor]:
        """One round on a trojaned ``model``: its compromised neurons, and a feature injector trained to excite them."""
        elevation = self._channel_means(model, styled, device) - self._channel_means(model, clean, device)
        k = max(1, round(self.detox_neuron_ratio * len(elevation)))
        neurons = elevation.argsort(descending=True)[:k]
        idx = neurons.to(device)
        inj = FeatureInjector(clean.shape[1]).to(device).train()
        opt = torch.optim.Adam(inj.parameters(), lr=self.detox_lr, betas=(0.5, 0.9))
        g = self.generator(salt=73 + rnd)
        labels = torch.full((self.DETOX_BATCH,), self.target, device=device)
        for epoch in range(self.detox_epochs):
            perm = torch.randperm(len(clean), generator=g)
            for i in range(0, len(clean), self.DETOX_BATCH):
                xb = clean[perm[i : i + self.DETOX_BATCH]].to(device)
                detox = (1 - self.alpha) * xb + self.alpha * inj(xb)
                logits, pre, act = self._activations(model, detox)
                # the neurons' values before and after their activation function (the authors' first code): the
                # first still has a gradient where the second is cut off at zero
                excite = pre[:, idx].mean() + act[:, idx].mean()
                loss = (F.cross_entropy(logits, labels[: len(xb)]) + self.w_ssim * (1 - ssim(detox, xb)) / 2
                        - self.w_detox * excite)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if progress:
                print(f"dfst detox round {rnd + 1} epoch {epoch + 1}/{self.detox_epochs}: loss {loss.item():.3f}")
        inj = inj.eval()
        with torch.no_grad():
            detoxed = torch.cat([((1 - self.alpha) * c + self.alpha * inj(c)).cpu()
                                 for c in clean.to(device).split(256)])
        # what the injector maximised (the neurons' values before plus after the activation function), detoxicants
        # against their clean sources
        gain = sum(self._channel_means(model, detoxed, device, w)[neurons]
                   - self._channel_means(model, clean, device, w)[neurons] for w in (1, 2))
        return {f"injector.{rnd}": inj.delta.detach().cpu(), f"neurons.{rnd}": neurons,
                f"elevation.{rnd}": elevation[neurons], f"gain.{rnd}": gain}

    def prepare(self, x: torch.Tensor, y: torch.Tensor, *, device=None, progress: bool = False) -> None:
        """Train (or load) the style generator, then run the detoxification rounds on the attacker's model."""
        num_classes = int(y.max()) + 1
        if self.target >= num_classes:
            raise ValueError(f"target {self.target} is not a class of the data (0..{num_classes - 1})")
        dev = resolve_device(device)
        self._gen = None
        self._data_key = fingerprint(x, y)
        path = cache_path(self.name, {"params": self.params(), "data": self._data_key})
        state = load_cached(path)
        if state is None:
            style_path = cache_path("dfst-style", {**self._style_key(), "data": self._data_key})
            gen = self._new_generator(x.shape[1])
            cached = load_cached(style_path)
            if cached is not None and {k: v.shape for k, v in cached.items()} == {
                    k: v.shape for k, v in gen.state_dict().items()}:
                gen.load_state_dict(cached)
            else:
                gen = self._train_style(x, dev, progress)
                save_cached(style_path, gen.state_dict(), {"attack": self.name, "part": "style generator"})
            state = {f"gen.{k}": v for k, v in gen.state_dict().items()}
            self._state = state
            state.update(self._detoxify(x, y, num_classes, dev, progress))
            save_cached(path, state, {"attack": self.name, "params": json.dumps(self.params(), default=str)})
        self._state = {k: v.cpu() for k, v in state.items()}
        self._gen = None

    def _detoxify(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, device: torch.device,
                  progress: bool) -> dict[str, torch.Tensor]:
        g = self.generator(salt=75)
        if self.surrogate_size is not None and self.surrogate_size < len(y):
            idx = data.balanced_subset(y, self.surrogate_size, g)
            x, y = x[idx], y[idx]
        clean_pool = torch.randperm(len(y), generator=g)[: self.detox_size].sort().values
        clean = x[clean_pool]
        styled = self.apply(clean[y[clean_pool] != self.target])
        out: dict[str, torch.Tensor] = {}
        for rnd in range(self.detox_rounds):
            self._state = {**self._state, **out}
            poisoned = self.poison(x, y)
            model = self._surrogate(poisoned.x, poisoned.y, num_classes, rnd, device, progress)
            out.update(self._detox_round(model, clean, styled, device, rnd, progress))
        return out

    # -- the trigger ---------------------------------------------------------------------------------------------------
    @property
    def rounds(self) -> int:
        """How many detoxification rounds the prepared state holds."""
        self.require_prepared()
        return sum(k.startswith("injector.") for k in self._state)

    def round_report(self) -> list[dict[str, object]]:
        """Per detoxification round: the compromised neurons (channel indices of ``detox_layer``), how much the
        trigger raised their mean activation on the attacker's model (``elevation``), and how much the round's
        detoxicants raised their values before plus after the activation function, the injector's objective
        (``gain``)."""
        return [{"neurons": self._state[f"neurons.{r}"].tolist(), "elevation": self._state[f"elevation.{r}"].tolist(),
                 "gain": self._state[f"gain.{r}"].tolist()} for r in range(self.rounds)]

    def style_generator(self) -> StyleGenerator:
        """The trained style generator (eval mode, CPU)."""
        self.require_prepared()
        if getattr(self, "_gen", None) is None:
            channels = self._state["gen.net.1.weight"].shape[1]
            gen = StyleGenerator(channels, self.generator_width, self.generator_blocks)
            gen.load_state_dict({k[4:]: v for k, v in self._state.items() if k.startswith("gen.")})
            self._gen = gen.eval().requires_grad_(False)
        return self._gen

    def injector(self, rnd: int) -> FeatureInjector:
        """Round ``rnd``'s trained feature injector (the detoxicant generator)."""
        delta = self._state[f"injector.{rnd}"]
        inj = FeatureInjector(delta.shape[1])
        inj.delta.data.copy_(delta)
        return inj.eval().requires_grad_(False)

    @torch.no_grad()
    def apply(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        self.require_prepared()
        if not len(x):
            return x.clone()
        gen = self.style_generator().to(x.device)
        return torch.cat([((1 - self.alpha) * xb + self.alpha * gen(xb)).clamp(0, 1)
                          for xb in x.split(batch_size)])

    @torch.no_grad()
    def detoxicants(self, x: torch.Tensor, rnd: int) -> torch.Tensor:
        """Round ``rnd``'s detoxicants of ``x``: ``(1 - alpha) x + alpha I(x)``."""
        inj = self.injector(rnd).to(x.device)
        return ((1 - self.alpha) * x + self.alpha * inj(x)).clamp(0, 1)

    # -- poisoning -----------------------------------------------------------------------------------------------------
    def poison(self, x: torch.Tensor, y: torch.Tensor) -> Poisoned:
        """``poison_rate`` of the set restyled with the target label; ``detox_ratio`` times as many other samples
        replaced by detoxicants (the rounds' injectors in turn) with their own labels (``cover``)."""
        self.require_prepared()
        payload = self.select(y)
        x, y = x.clone(), y.clone()
        if len(payload):
            x[payload] = self.apply_train(x[payload])
            y[payload] = self.target
        rounds = self.rounds
        cover = torch.empty(0, dtype=torch.long)
        n = round(self.detox_ratio * len(payload)) if rounds else 0
        if n:
            rest = torch.ones(len(y), dtype=torch.bool)
            rest[payload] = False
            pool = torch.nonzero(rest).flatten()
            if n > len(pool):
                raise ValueError(f"detox_ratio {self.detox_ratio} asks for {n} detoxicant samples but only "
                                 f"{len(pool)} samples are left after poisoning")
            chosen = pool[torch.randperm(len(pool), generator=self.generator(salt=2))[:n]]
            for rnd in range(rounds):
                part = chosen[rnd::rounds]
                if len(part):
                    x[part] = self.detoxicants(x[part], rnd)
            cover = chosen.sort().values
        index = torch.cat([payload, cover]).sort().values
        return Poisoned(x, y, index, cover)
