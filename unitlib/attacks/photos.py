"""Natural photographs that ship inside the scikit-image wheel (its ``skimage/data`` folder: astronaut, camera,
Chelsea the cat, coffee, ...), read straight from the installed files with PIL: no download, works offline. They
stand in for the image sets attacks draw on that cannot be downloaded here (Refool's PASCAL VOC reflections,
Adap-Blend's Hello Kitty blend pattern). Images with transparency (the scikit-image logo) are laid on white."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# name -> file in skimage/data (only files bundled in the wheel, never the ones scikit-image fetches on demand)
PHOTOS = {
    "astronaut": "astronaut.png", "brick": "brick.png", "camera": "camera.png", "chelsea": "chelsea.png",
    "clock": "clock_motion.png", "coffee": "coffee.png", "coins": "coins.png", "grass": "grass.png",
    "gravel": "gravel.png", "hubble": "hubble_deep_field.jpg", "logo": "logo.png", "moon": "moon.png",
    "motorcycle": "motorcycle_left.png", "rocket": "rocket.jpg",
}


def data_dir() -> Path:
    import skimage.data  # only the package's location is needed; its fetchers are never called

    return Path(skimage.data.__file__).resolve().parent


@functools.lru_cache(maxsize=32)
def _read(name: str) -> torch.Tensor:
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; valid choices: {', '.join(PHOTOS)}")
    path = data_dir() / PHOTOS[name]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: scikit-image's bundled data was not installed with the wheel")
    with Image.open(path) as im:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        rgb = np.asarray(Image.alpha_composite(white, im).convert("RGB"))  # transparent parts on white
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255)


def photo(name: str, channels: int = 3, size: tuple[int, int] | None = None) -> torch.Tensor:
    """The photo ``name`` as a float C x H x W tensor in [0, 1]; ``size`` resizes it (antialiased, whole image);
    ``channels`` 1 gives its luminance."""
    img = _read(name)
    if size is not None:
        img = F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    if channels == 1:
        img = (img * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
    elif channels != 3:
        raise ValueError(f"photos come as 1 or 3 channels, got {channels}")
    return img.clamp(0, 1)


def random_crops(name: str, n: int, channels: int, size: tuple[int, int], generator: torch.Generator,
                 zoom: float = 2.0) -> torch.Tensor:
    """``n`` crops of ``size`` from the photo resized so that its shorter side is ``zoom`` times the crop's."""
    img = _read(name)
    h, w = img.shape[-2:]
    scale = zoom * max(size) / min(h, w)
    big = photo(name, channels, (max(size[0], round(h * scale)), max(size[1], round(w * scale))))
    tops = torch.randint(0, big.shape[-2] - size[0] + 1, (n,), generator=generator)
    lefts = torch.randint(0, big.shape[-1] - size[1] + 1, (n,), generator=generator)
    return torch.stack([big[:, t : t + size[0], s : s + size[1]] for t, s in zip(tops.tolist(), lefts.tolist())])
