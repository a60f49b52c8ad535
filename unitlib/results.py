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
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
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
    """The record stored at ``path``; a ValueError naming the file when it is not a readable record of this schema
    (invalid JSON, missing or unknown fields, metrics that are not fractions)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON record ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a record is a JSON object, got {type(data).__name__}")
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: record schema {data.get('schema')!r}, this library reads schema {SCHEMA}")
    known = {f.name: f for f in fields(Record)}
    unknown = sorted(set(data) - set(known))
    missing = sorted(k for k, f in known.items()
                     if k not in data and f.default is MISSING and f.default_factory is MISSING)
    problems = [f"unknown field(s) {', '.join(unknown)}"] * bool(unknown)
    problems += [f"missing {', '.join(missing)}"] * bool(missing)
    if problems:
        raise ValueError(f"{path}: not a record ({'; '.join(problems)})")
    for key in ("config", "metrics", "seconds", "provenance", "report"):
        if key in data and not isinstance(data[key], dict):
            raise ValueError(f"{path}: {key} must be a JSON object, got {data[key]!r}")
    for key in ("profile", "dataset", "attack", "defense"):  # what tables and file names are made of
        if not isinstance(data["config"].get(key), str):
            raise ValueError(f"{path}: config.{key} must be a string, got {data['config'].get(key)!r}")
    for stage in ("before", "after"):
        metrics = data["metrics"].get(stage)
        if not isinstance(metrics, dict):
            raise ValueError(f"{path}: metrics.{stage} is missing or not an object")
        for metric in ("clean_acc", "asr"):
            value = metrics.get(metric)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
            if not ok:  # NaN fails the range test too
                raise ValueError(f"{path}: metrics.{stage}.{metric} must be a number in [0, 1], got {value!r}")
    return Record(**data)


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def stale_reason(record: Record, experiment: Experiment, *, defense: bool = True) -> str | None:
    """Why ``record`` no longer describes ``experiment`` as the library would run it today, or ``None``.

    An experiment names only the parameters it sets; the rest are the attack's and defense's defaults, which a
    record stores as resolved (``report["resolved"]``). A default changed since the record was made makes it stale:
    the same key, another experiment. ``defense`` false compares the attack alone (the undefended model's
    metrics do not depend on the defense). An attack whose poisoning changed with no parameter to show it raises
    its ``cache_version``: a record made at another version (one without it: version 1) is stale too. Records
    without resolved parameters cannot be checked and count as current."""
    resolved = (record.report or {}).get("resolved")
    if not isinstance(resolved, dict):
        return None
    if "attack" in resolved:
        now_version = getattr(type(experiment.make_attack()), "cache_version", 1)
        then_version = resolved.get("attack_version", 1)
        if then_version != now_version:
            return (f"the attack's poisoning changed since it was made (cache_version {then_version} -> "
                    f"{now_version})")
    parts = [("attack", experiment.make_attack)] + ([("defense", experiment.make_defense)] if defense else [])
    for part, make in parts:
        if part not in resolved:
            continue
        obj = make()
        now, then = _canonical(obj.params()), _canonical(resolved[part])
        # A parameter added since the record was made reads as the value that reproduces the older runs.
        then = {**_canonical(getattr(type(obj), "added_params", {})), **then}
        changed = sorted(k for k in set(now) | set(then) if now.get(k, MISSING) != then.get(k, MISSING))
        if changed:
            diffs = ", ".join(f"{k} {then.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}" for k in changed)
            return f"{part} defaults changed since it was made: {diffs}"
    return None


def canonical_key(experiment: Experiment) -> str:
    """The key of ``experiment`` with every attack and defense parameter that sits at today's default left out:
    an experiment that names a parameter at its default and one that does not are the same experiment."""
    from . import attacks, defenses  # the registries; imported here as config imports them too

    def strip(params: dict[str, Any], registry: Any, name: str) -> dict[str, Any]:
        try:
            defaults = _canonical(registry.parameters(name))
        except (KeyError, ValueError):
            return params
        return {k: v for k, v in params.items() if k not in defaults or _canonical(v) != defaults[k]}

    return experiment.replace(
        attack_params=strip(experiment.attack_params, attacks.REGISTRY, experiment.attack),
        defense_params=strip(experiment.defense_params, defenses.REGISTRY, experiment.defense)).key()


def find(experiment: Experiment, directory: str | os.PathLike | None = None) -> Record | None:
    """The stored record of this experiment as the library runs it today, if any: the record of its key, or one
    whose experiment differs only by naming parameters at today's defaults (:func:`canonical_key`). A file that is
    not a readable record is skipped with a warning naming it, as by :func:`load_all`; a record made under other
    defaults (:func:`stale_reason`) is not this experiment."""
    key = experiment.key()
    folder = Path(directory or RESULTS_DIR)
    exact = list(folder.glob(f"*__{key[:12]}.json"))
    c = experiment
    others = [p for p in folder.glob(f"{c.dataset}__{c.attack}__{c.defense}__*.json") if p not in exact]
    canonical = None
    for path in exact + others:
        try:
            record = load(path)
        except ValueError as err:
            warnings.warn(f"skipping {err}", stacklevel=2)
            continue
        if record.key != key:
            canonical = canonical or canonical_key(experiment)
            try:
                same = canonical_key(record.experiment) == canonical
            except ValueError:
                same = False
            if not same:
                continue
        if stale_reason(record, experiment) is None:
            return record
    return None


def load_all(directory: str | os.PathLike | None = None) -> list[Record]:
    """Every record in ``directory`` (default: the committed ``results/``), in file-name order. A file that is not
    a readable record is skipped with a warning naming it, so one bad file never hides the others."""
    records = []
    for path in sorted(Path(directory or RESULTS_DIR).glob("*.json")):
        try:
            records.append(load(path))
        except ValueError as err:
            warnings.warn(f"skipping {err}", stacklevel=2)
    return records


def check_writable(directory: str | os.PathLike | None = None) -> Path:
    """Make sure records can be written to ``directory`` (default: ``results/``), creating it if needed: a
    ValueError naming it now, rather than after a run whose record would then be lost."""
    path = Path(directory or RESULTS_DIR)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-check.{os.getpid()}.tmp"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"results directory '{path}' is not writable ({type(err).__name__}: {err.strerror or err}); "
                         "pass a writable directory for the records") from err
    return path


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


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state (every tensor of its state dict by name: dtype, shape and bytes in standard
    contiguous layout, so the memory format does not count). Two records with the same ``model_key`` and another
    digest ran on two trainings of one configuration (a model trained again need not be the same model)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_model(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load safetensors weights into ``model`` (same architecture)."""
    model.load_state_dict(load_file(str(path)))
    return model


def set_aside(path: str | os.PathLike, error: BaseException) -> Path:
    """Move an unreadable cache file or checkpoint out of the way (``<name>.corrupt-<time>``), with a warning that
    names it, so the work it held is redone."""
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


def attack_identity(experiment: Experiment) -> str:
    """What decides the poisoned training set beyond the experiment's own fields: the attack's class, its
    ``cache_version`` and every parameter as resolved today, defaults included (but a parameter of the attack's
    ``added_params`` at the value it was added with, which changes nothing). An attack whose defaults or trigger
    change (a new ``cache_version``) so gets new cached models instead of reusing ones made the old way."""
    attack = experiment.make_attack()
    added = _canonical(getattr(type(attack), "added_params", {}))
    params = {k: v for k, v in attack.params().items() if k not in added or _canonical(v) != added[k]}
    ident = {"attack": type(attack).__name__, "version": getattr(type(attack), "cache_version", 1), "params": params}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def model_path(experiment: Experiment, data_digest: str) -> Path:
    """Where the backdoored model of ``experiment`` trained on the data with ``data_digest`` is cached: the key joins
    the experiment's model key, the data's digest and the attack as resolved today (:func:`attack_identity`), so a
    model is never reused on other data of the same name, nor after the attack's defaults or trigger changed."""
    key = hashlib.sha256(f"{experiment.model_key()}:{data_digest}:{attack_identity(experiment)}".encode()).hexdigest()
    return cache_dir() / "models" / f"{key}.safetensors"