"""Class-balanced index splits: the subsets the attacks poison and the defender's clean data (optimise, validate)."""

from __future__ import annotations

import torch


def balanced_subset(
    y: torch.Tensor, n: int, generator: torch.Generator, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """``n`` sorted indices into ``y``, as equal per class as possible, none in ``exclude``, drawn with ``generator``.

    A class with too few samples left after ``exclude`` gives all it has and the others make up the difference;
    which classes get the remainder when ``n`` does not divide evenly is drawn at random too.
    """
    y = _check_labels(y)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    available = ~_exclusion_mask(exclude, len(y))
    classes = torch.unique(y)
    pools = [torch.nonzero((y == c) & available).flatten() for c in classes]
    caps = torch.tensor([len(p) for p in pools], dtype=torch.int64)
    if n > int(caps.sum()):
        raise ValueError(f"n={n} but only {int(caps.sum())} samples are available "
                         f"({len(y)} in total, {len(y) - int(caps.sum())} excluded)")
    quota = _water_fill(caps, n, generator)
    picked = [pool[torch.randperm(len(pool), generator=generator)[:q]]
              for pool, q in zip(pools, quota.tolist(), strict=True)]
    return torch.sort(torch.cat(picked)).values


def defense_split(
    y: torch.Tensor, clean_fraction: float, *, exclude: torch.Tensor | None, seed: int, val_fraction: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The defender's clean data, split into (optimise, validate) sorted index tensors.

    The defender holds ``round(clean_fraction * len(y))`` training samples, balanced per class and never any index
    in ``exclude`` (the poisoned samples); each class's share is split so that ``val_fraction`` of it validates.
    """
    y = _check_labels(y)
    _check_fraction("clean_fraction", clean_fraction)
    _check_fraction("val_fraction", val_fraction)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    n_clean = round(clean_fraction * len(y))
    if n_clean < 1:
        raise ValueError(f"clean_fraction={clean_fraction} of {len(y)} training samples is no sample at all")
    excluded = _exclusion_mask(exclude, len(y))
    for c in torch.unique(y).tolist():
        available = int(((y == c) & ~excluded).sum())
        if available < 2:
            raise ValueError(f"class {c} has {available} training sample(s) that are not poisoned "
                             f"({int(((y == c) & excluded).sum())} are): the defender's clean data needs at least 2 "
                             "of each class (one to optimise, one to validate); lower the poisoning rate")
    generator = torch.Generator().manual_seed(seed)
    clean = balanced_subset(y, n_clean, generator, exclude)
    optimise, validate = [], []
    for c in torch.unique(y).tolist():
        members = clean[y[clean] == c]
        if len(members) < 2:
            raise ValueError(f"clean_fraction={clean_fraction} gives {len(members)} clean sample(s) of class {c}; "
                             "each class needs at least 2 (one to optimise, one to validate): raise clean_fraction")
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = min(max(round(val_fraction * len(members)), 1), len(members) - 1)
        validate.append(members[:n_val])
        optimise.append(members[n_val:])
    return torch.sort(torch.cat(optimise)).values, torch.sort(torch.cat(validate)).values


def _check_labels(y: torch.Tensor) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"labels must be a 1-D integer tensor, got {getattr(y, 'dtype', type(y))} "
                        f"{tuple(getattr(y, 'shape', ()))}")
    return y.to(torch.int64)


def _check_fraction(label: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{label} must be a fraction strictly between 0 and 1, got {value!r}")


def _exclusion_mask(exclude: torch.Tensor | None, n: int) -> torch.Tensor:
    """A bool mask of the excluded samples, from indices (or from a bool mask of length ``n``)."""
    mask = torch.zeros(n, dtype=torch.bool)
    if exclude is None:
        return mask
    exclude = torch.as_tensor(exclude)
    if exclude.numel() == 0:  # also an empty list, which torch reads as float
        return mask
    if exclude.dtype == torch.bool:
        if exclude.shape != (n,):
            raise ValueError(f"exclude as a bool mask must have shape ({n},), got {tuple(exclude.shape)}")
        return exclude.clone()
    if exclude.dtype.is_floating_point:
        raise TypeError(f"exclude must hold integer indices (or be a bool mask), got {exclude.dtype}")
    exclude = exclude.flatten().to(torch.int64)
    if len(exclude) and (int(exclude.min()) < 0 or int(exclude.max()) >= n):
        raise ValueError(f"exclude holds indices outside 0..{n - 1} "
                         f"(min {int(exclude.min())}, max {int(exclude.max())})")
    mask[exclude] = True
    return mask


def _water_fill(caps: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Per-class counts summing to ``n``, each at most its cap, as equal as the caps allow."""
    quota = torch.zeros_like(caps)
    remaining = n
    while remaining:
        open_ = torch.nonzero(quota < caps).flatten()
        share = remaining // len(open_)
        if share == 0:
            # Fewer samples left than open classes: a random subset of them gets one more.
            lucky = open_[torch.randperm(len(open_), generator=generator)[:remaining]]
            quota[lucky] += 1
            break
        grant = torch.minimum(caps[open_] - quota[open_], torch.tensor(share))
        quota[open_] += grant
        remaining -= int(grant.sum())
    return quota
