"""Result records and the model cache.

A record is one JSON file per experiment, named by the experiment's hash, written atomically, carrying its
provenance (code version, data set, device, library versions, seconds). Backdoored models are cached by the
experiment's model hash as safetensors (never pickles)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import Experiment
from .data import cache_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "results"
SCHEMA = 1


def code_version() -> str:
    """The git commit of the library (``+dirty`` when ``unitlib/`` has uncommitted changes), or ``unknown``. A runner
    that executes a copy of a committed tree elsewhere (a remote GPU machine, whose copy may carry stale or no git
    metadata) declares the commit in ``$UNITLIB_CODE_VERSION``; it wins, marked `` (declared)``."""
    declared = os.environ.get("UNITLIB_CODE_VERSION", "").strip()
    if declared:
        return f"{declared} (declared)"
    try:
        run = lambda *a: subprocess.run(
            ["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        rev = run("rev-parse", "HEAD")
        dirty = run("status", "--porcelain", "--", "unitlib")
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def provenance(device: torch.device) -> dict[str, Any]:
    import torchvision

    return {
        "code_version": code_version(),
        "device": str(device),
        "device_name": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


@dataclass
class Record:
    """What one experiment measured. ``metrics``: ``before``/``after`` the defense, each ``clean_acc``, ``asr``."""

    key: str
    config: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    seconds: dict[str, float]
    provenance: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA

    @property
    def experiment(self) -> Experiment:
        return Experiment.from_dict(self.config)

    def filename(self) -> str:
        c = self.config
        return f"{c['dataset']}__{c['attack']}__{c['defense']}__{self.key[:12]}.json"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def save(record: Record, directory: str | os.PathLike | None = None) -> Path:
    return write_json(Path(directory or RESULTS_DIR) / record.filename(), asdict(record))


def load(path: str | os.PathLike) -> Record:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: record schema {data.get('schema')!r}, this library reads schema {SCHEMA}")
    return Record(**data)


def find(experiment: Experiment, directory: str | os.PathLike | None = None) -> Record | None:
    """The stored record of exactly this experiment, if any."""
    key = experiment.key()
    for path in Path(directory or RESULTS_DIR).glob(f"*__{key[:12]}.json"):
        record = load(path)
        if record.key == key:
            return record
    return None


def load_all(directory: str | os.PathLike | None = None) -> list[Record]:
    return [load(p) for p in sorted(Path(directory or RESULTS_DIR).glob("*.json"))]


# -- models ----------------------------------------------------------------------------------------------------------
def save_model(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Save a model's state dict as safetensors (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_model(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load safetensors weights into ``model`` (same architecture)."""
    model.load_state_dict(load_file(str(path)))
    return model


def set_aside(path: str | os.PathLike, error: BaseException) -> Path:
    """Move an unreadable cache file or checkpoint out of the way (``<name>.corrupt-<time>``), with a warning that
    names it, so the work it held is redone."""
    import warnings

    path = Path(path)
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(path, target)
    warnings.warn(f"{path} could not be read ({type(error).__name__}: {error}); moved to {target.name}, redoing "
                  "the work", stacklevel=2)
    return target


def model_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata saved with a safetensors file (how and where the model was trained)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 over tensors' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes())
    return h.hexdigest()


def model_path(experiment: Experiment, data_digest: str) -> Path:
    """Where the backdoored model of ``experiment`` trained on the data with ``data_digest`` is cached: the key joins
    the experiment's model key and the data's digest, so a model is never reused on other data of the same name."""
    key = hashlib.sha256(f"{experiment.model_key()}:{data_digest}".encode()).hexdigest()
    return cache_dir() / "models" / f"{key}.safetensors"
