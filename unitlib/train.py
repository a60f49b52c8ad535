"""The one training loop: SGD with Nesterov momentum, a one-cycle or step learning-rate schedule, batched tensor
augmentation (random crop with padding, horizontal flip), resumable per-epoch checkpoints (safetensors).
Device-agnostic; on CUDA it keeps data on the device and uses channels_last with bf16 autocast."""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

SCHEDULES = ("onecycle", "step", "cosine")


@dataclass(frozen=True)
class Recipe:
    """A training recipe. ``step`` decays by 10x at ``milestones`` (fractions of training), like the paper's
    100-epoch recipe (lr 0.1, x0.1 at epoch 50)."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "step"
    milestones: tuple[float, ...] = (0.5,)
    warmup: float = 0.2
    label_smoothing: float = 0.0
    crop: int = 4
    flip: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid choices: {', '.join(SCHEDULES)}")
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")

    def lr_at(self, progress: float) -> float:
        """Learning rate at ``progress`` in [0, 1] of training."""
        if self.schedule == "onecycle":
            if progress < self.warmup:
                return self.lr * progress / self.warmup
            return self.lr * max(0.0, 1 - progress) / (1 - self.warmup)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * 0.1 ** sum(progress >= m for m in self.milestones)


def augment(x: torch.Tensor, crop: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop after ``crop`` pixels of reflect padding and random horizontal flip, for a whole batch at once."""
    return apply_augment(x, crop, *draw_augment(len(x), crop, flip, generator))


def draw_augment(
    n: int, crop: int, flip: bool, generator: torch.Generator | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The random draws of :func:`augment` for ``n`` images, on the CPU: row and column shifts, flip mask."""
    dy = dx = mask = None
    if crop:
        dy = torch.randint(0, 2 * crop + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * crop + 1, (n,), generator=generator)
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
    return dy, dx, mask


def apply_augment(
    x: torch.Tensor, crop: int, dy: torch.Tensor | None, dx: torch.Tensor | None, mask: torch.Tensor | None
) -> torch.Tensor:
    """Crop and flip ``x`` as drawn by :func:`draw_augment` (the draws may already live on ``x``'s device)."""
    n, _, h, w = x.shape
    dev = x.device
    if crop:
        assert dy is not None and dx is not None
        padded = F.pad(x, (crop, crop, crop, crop), mode="reflect")
        dy, dx = dy.to(dev), dx.to(dev)
        rows = (torch.arange(h, device=dev)[None, :] + dy[:, None])[:, None, :, None]
        cols = (torch.arange(w, device=dev)[None, :] + dx[:, None])[:, None, None, :]
        batch = torch.arange(n, device=dev)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=dev)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if mask is not None:
        mask = mask.to(dev)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


DEVICES = "auto, cpu, cuda, cuda:N (N a GPU index), mps"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device for ``device``: one of :data:`DEVICES` (``auto``/None: CUDA when there is one, else the
    CPU). A device this machine does not have is a ValueError saying so, before any work starts."""
    text = "auto" if device is None else str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = re.fullmatch(r"(cpu|mps|cuda)(?::(\d+))?", text)
    if match is None or (match[2] is not None and match[1] != "cuda"):
        raise ValueError(f"unknown device {text!r}; valid: {DEVICES}")
    if match[1] == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r} asked for, but CUDA is not available here (this torch "
                             f"{torch.__version__} was built for CUDA {torch.version.cuda or 'no CUDA at all'}); "
                             "use cpu or auto")
        count = torch.cuda.device_count()
        if match[2] is not None and int(match[2]) >= count:
            raise ValueError(f"device {text!r} asked for, but there are {count} CUDA device(s): "
                             f"cuda:0..cuda:{count - 1}")
    if match[1] == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {text!r} asked for, but MPS (Apple's GPU backend) is not available here; use cpu or "
                         "auto")
    return torch.device(text)


# glibc's malloc serves a block above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on free,
# so every large activation of a CPU training step costs a round of page faults; PyTorch's CPU allocator has no cache
# of its own. Serving every block from the heap and never trimming it keeps that memory in the process for the next
# step (benchmarks/allocator.py measures the difference side by side).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
ALLOCATOR_ENV = "UNITLIB_MALLOC"
_allocator_state: str | None = None
_allocator_lock = threading.Lock()


def tune_allocator() -> str:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system (once per process; a
    CPU training or defense step then reuses its large buffers instead of faulting fresh pages in each time).

    Returns what was done: ``"tuned"``; ``"off"`` when the environment variable ``UNITLIB_MALLOC`` is ``default``
    (the process keeps glibc's settings); ``"unavailable"`` where the C library is not glibc (macOS, Windows, musl).
    The process's memory then stays near its peak until it exits."""
    global _allocator_state
    with _allocator_lock:
        if _allocator_state is not None:
            return _allocator_state
        choice = os.environ.get(ALLOCATOR_ENV, "tuned")
        if choice not in ("tuned", "default"):
            raise ValueError(f"{ALLOCATOR_ENV}={choice!r}; valid choices: tuned, default")
        if choice == "default":
            _allocator_state = "off"
            return _allocator_state
        _allocator_state = "unavailable"
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            mallopt = libc.mallopt
            libc.gnu_get_libc_version  # noqa: B018 - only glibc has it; musl has a mallopt that does nothing
        except (OSError, AttributeError, TypeError):  # TypeError: Windows' ctypes cannot open the process itself
            return _allocator_state
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        # without the trim threshold, a large block freed at the top of the heap would be handed back and faulted in
        # again at the next step, as an unmapped one is
        if mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and mallopt(_M_MMAP_MAX, 0) == 1:
            _allocator_state = "tuned"
        return _allocator_state


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA only: on CPUs without bf16 units it is many times slower."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class BatchHook(Protocol):
    """What :func:`fit` calls for an attack that trains with the model (a trigger generator trained together with
    the classifier, as in IA and Dynamic). The loop stays the one loop; the hook only rewrites each batch.

    - ``begin(x, y, device, total_steps)``: once, before the first step, with the training set on ``device``.
    - ``batch(x, y, index, step)``: every step, inside the loop's autocast, with the augmented batch and the
      training-set indices of its samples; returns the batch to train on, its labels, and an extra loss term (or
      None) added to the cross-entropy. Gradients of the summed loss reach whatever the hook's tensors depend on.
    - ``after_step(step)``: after the classifier's optimiser step (the hook steps its own optimiser here).
    - ``state_dict()`` / ``load_state_dict(tensors)``: the hook's tensors, saved in and restored from the loop's
      per-epoch checkpoint, so that an interrupted run resumes the generator with the classifier."""

    def begin(self, x: torch.Tensor, y: torch.Tensor, device: torch.device, total_steps: int) -> None: ...

    def batch(
        self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...

    def after_step(self, step: int) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None: ...


def _save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, gen: torch.Generator,
                     hook: BatchHook | None = None) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum.{i}"] = buf.detach().cpu().contiguous()
    tensors["rng"] = gen.get_state()
    if hook is not None:
        tensors.update({f"hook.{k}": v.detach().cpu().contiguous() for k, v in hook.state_dict().items()})
    # a name of this process's own: two processes checkpointing one model never write to the same file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    save_file(tensors, str(tmp), metadata={"epoch": str(epoch)})
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                     hook: BatchHook | None = None) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        epoch = int(f.metadata()["epoch"])
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if f"momentum.{i}" in tensors:
            opt.state[p]["momentum_buffer"] = tensors[f"momentum.{i}"].to(p.device)
    gen.set_state(tensors["rng"])
    if hook is not None:
        hook.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("hook.")})
    return epoch


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    *,
    device: str | torch.device | None = None,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    channels_last: bool = True,
    compile: bool | str = False,
    on_epoch: Callable[[int], None] | None = None,
    regulariser: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    hook: BatchHook | None = None,
) -> nn.Module:
    """Train ``model`` on images ``x`` (float in [0, 1] or uint8, N x C x H x W) with labels ``y``.

    ``regulariser(model, xb, yb)``, when given, is added to every batch's loss (an adaptive attacker's term, e.g.
    activation suppression). ``hook``, when given, rewrites every batch and trains alongside the model (see
    :class:`BatchHook`: an attack that trains its trigger generator with the classifier).

    With ``checkpoint``, the state after every epoch is saved there and an interrupted run resumes from it.
    ``compile`` runs the training steps through ``torch.compile`` (``True``, or a mode such as ``"reduce-overhead"``);
    it pays on a GPU, where an eager step of a small network is bound by Python. ``on_epoch(epoch)`` is called after
    each epoch (1-based). Returns the model in eval mode on ``device``."""
    dev = resolve_device(device)
    if dev.type == "cpu":
        tune_allocator()
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    # Data lives on the training device: no loader workers, no per-sample Python.
    x, y = x.to(dev), y.to(dev)
    model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    sgd = dict(lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov and recipe.momentum > 0)
    # On CUDA the fused optimizer updates every parameter in one kernel instead of a few per tensor list.
    opt = _sgd(groups, sgd, fused=dev.type == "cuda")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    start = 0
    n = len(x)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    if hook is not None:
        hook.begin(x, y, dev, total)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        try:
            start = _load_checkpoint(ckpt, model, opt, gen, hook)
        except Exception as err:  # truncated or from another model: start afresh
            moved = ckpt.with_name(f"{ckpt.name}.corrupt-{os.getpid()}")
            os.replace(ckpt, moved)
            warnings.warn(f"checkpoint {ckpt} could not be read ({type(err).__name__}: {err}); moved to "
                          f"{moved.name}, training from the start", stacklevel=2)
            start = 0
            torch.manual_seed(seed)
            gen.manual_seed(seed)
            model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
            opt.state.clear()
            if hook is not None:
                hook.begin(x, y, dev, total)
    bar = tqdm(total=total, initial=start * steps_per_epoch, desc="train", unit="step", disable=not progress)
    net: nn.Module = model
    if compile:
        net = torch.compile(model, mode=None if compile is True else compile, dynamic=False)  # type: ignore[assignment]
    with _cudnn_benchmark(dev.type == "cuda"):
        _epochs(model, net, x, y, recipe, opt, gen, start, steps_per_epoch, total, dev, ckpt, bar, channels_last,
                on_epoch, regulariser, hook)
    bar.close()
    return model.eval()


def throughput(
    model: nn.Module, recipe: Recipe, *, steps: int = 15, warmup: int = 3, device: str | torch.device | None = None,
    image_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10, channels_last: bool = True,
) -> float:
    """Training images per second of ``model`` with ``recipe``'s batch size and augmentation on ``device``: ``steps``
    SGD steps timed after ``warmup`` untimed ones, on random images of ``image_shape`` (the seconds do not depend on
    pixel values). ``model`` is trained by these steps: pass a fresh one."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps!r}, warmup={warmup!r}")
    dev = resolve_device(device)
    model = model.to(dev).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=recipe.momentum,
                          nesterov=recipe.nesterov and recipe.momentum > 0)  # as fit: Nesterov needs momentum
    x = torch.rand(recipe.batch_size, *image_shape, device=dev)
    y = torch.randint(0, num_classes, (recipe.batch_size,), device=dev)

    def step() -> None:
        xb = augment(x, recipe.crop, recipe.flip)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(dev):
            loss = F.cross_entropy(model(xb), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    _synchronize(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(dev)
    return recipe.batch_size * steps / (time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sgd(groups: list[dict], options: dict, fused: bool) -> torch.optim.Optimizer:
    if fused:
        try:
            return torch.optim.SGD(groups, **options, fused=True)
        except (RuntimeError, TypeError, ValueError):  # a PyTorch without it, or parameters it cannot fuse
            pass
    return torch.optim.SGD(groups, **options)


@contextlib.contextmanager
def _cudnn_benchmark(on: bool) -> Iterator[None]:
    """Let cuDNN time its convolution algorithms (the shapes repeat every step), then restore the setting."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _augmented_epoch(
    x: torch.Tensor, perm: torch.Tensor, crop: int, draws: list, dev: torch.device, chunk: int = 8192
) -> torch.Tensor:
    """The whole epoch's training images in ``perm`` order, augmented with ``draws`` (the per-batch draws of
    :func:`draw_augment`), in chunks: the same pixels as augmenting batch by batch, with a few large operations
    instead of a dozen small ones per step."""
    dys, dxs, masks = (torch.cat(d).to(dev) if d[0] is not None else None for d in zip(*draws))
    out = torch.empty_like(x)
    for lo in range(0, len(perm), chunk):
        sl = slice(lo, lo + chunk)
        out[sl] = apply_augment(x[perm[sl]], crop, *(d[sl] if d is not None else None for d in (dys, dxs, masks)))
    return out


def _epochs(
    model: nn.Module, net: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, opt: torch.optim.Optimizer,
    gen: torch.Generator, start: int, steps_per_epoch: int, total: int, dev: torch.device, ckpt: Path | None,
    bar: tqdm, channels_last: bool, on_epoch: Callable[[int], None] | None,
    regulariser: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    hook: BatchHook | None = None,
) -> None:
    n = len(x)
    for epoch in range(start, recipe.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        # The epoch's augmentation draws, in the order augment() would make them batch by batch, moved to the device
        # in one copy (a copy from pageable memory per step would make the host wait for the GPU at every step) and
        # applied to the whole epoch at once.
        bs = recipe.batch_size
        draws = [draw_augment(min(bs, n - i * bs), recipe.crop, recipe.flip, gen) for i in range(steps_per_epoch)]
        perm = perm.to(dev)
        xe, ye = _augmented_epoch(x, perm, recipe.crop, draws, dev), y[perm]
        seen = 0
        correct = torch.zeros((), dtype=torch.long, device=dev)
        loss_sum = torch.zeros((), device=dev)
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = recipe.lr_at(step / total)
            sl = slice(i * bs, (i + 1) * bs)
            xb, yb = xe[sl], ye[sl]
            with autocast(dev):
                extra = None
                if hook is not None:
                    xb, yb, extra = hook.batch(xb, yb, perm[sl], step)
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                out = net(xb)
                loss = F.cross_entropy(out, yb, label_smoothing=recipe.label_smoothing)
                if regulariser is not None:
                    loss = loss + regulariser(net, xb, yb)
                if extra is not None:
                    loss = loss + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if hook is not None:
                hook.after_step(step)
            seen += len(yb)
            loss_sum += loss.detach().float() * len(yb)
            correct += (out.argmax(1) == yb).sum()
            bar.update()
            # Reading the running numbers waits for the device: do it now and then, not at every step.
            if i % 50 == 49 or i == steps_per_epoch - 1:
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
        del xe
        if not math.isfinite(loss_sum.item()):
            raise FloatingPointError(f"training loss is not finite in epoch {epoch + 1} (lr {recipe.lr}): lower the "
                                     "learning rate; nothing was saved from this run")
        if ckpt is not None:
            _save_checkpoint(ckpt, model, opt, epoch + 1, gen, hook)
        if on_epoch is not None:
            on_epoch(epoch + 1)


__all__ = ["DEVICES", "BatchHook", "Recipe", "apply_augment", "augment", "autocast", "draw_augment", "fit",
           "resolve_device"]
