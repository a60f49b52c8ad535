"""Run one experiment end to end: data -> poison -> train (cached) -> defend -> evaluate -> record."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from . import data, models, results, tempfiles
from .attacks import Attack, Poisoned
from .config import Experiment
from .defenses import CleanSplit
from .metrics import evaluate
from .train import fit, resolve_device, tune_allocator


@contextmanager
def _timer(seconds: dict[str, float], stage: str):
    start = time.perf_counter()
    yield
    seconds[stage] = round(time.perf_counter() - start, 3)


def build_model(exp: Experiment, dataset: data.Dataset) -> nn.Module:
    """The untrained model of ``exp``, its weights drawn from ``exp.seed`` alone (whatever ran before)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(exp.seed)
        return models.build(
            exp.model, num_classes=dataset.num_classes, in_channels=dataset.shape[0], width=exp.width,
            activation=exp.activation,
        )


def backdoored_model(
    exp: Experiment, dataset: data.Dataset, poisoned_x: torch.Tensor, poisoned_y: torch.Tensor, *,
    device: torch.device, progress: bool = True, compile: str = "off", attack: Attack | None = None,
) -> tuple[nn.Module, dict[str, str] | None]:
    """The backdoored model of ``exp``: loaded from the cache when present, else trained (resumably) and cached
    (``compile``: one of :data:`COMPILE_MODES`, how the training steps run). Returns the model and, when it came
    from the cache, the metadata saved with it (else ``None``).

    An ``attack`` that trains with the model (IA, Dynamic: ``trains_with_model``) gets the clean training set as
    ``poisoned_x``/``poisoned_y`` and poisons every batch itself through the loop's hook; its trained generator is
    cached beside the model (keyed by the model's key and the data) and loaded with it, and a cached model without
    its generator is trained again."""
    path = results.model_path(exp, dataset.digest)
    model = build_model(exp, dataset)
    joint = attack if getattr(attack, "trains_with_model", False) else None
    context = {"model_key": exp.model_key(), "data": dataset.digest, "attack": results.attack_identity(exp)}
    if path.exists() and (joint is None or joint.load_trained(context)):
        try:
            return results.load_model(model, path).to(device).eval(), results.model_metadata(path)
        except Exception as err:  # a truncated or foreign file: set it aside and train again
            results.set_aside(path, err)
            model = build_model(exp, dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = path.with_suffix(".partial.safetensors")
    start = time.perf_counter()
    fit(model, poisoned_x, poisoned_y, exp.recipe(), device=device, seed=exp.seed, checkpoint=checkpoint,
        regulariser=getattr(exp.make_attack(), "training_regulariser", None),
        hook=joint.hook(poisoned_y) if joint is not None else None,
        progress=progress, compile=_compile_arg(compile))
    if joint is not None:
        joint.save_trained(context)
    # How the cached model was made travels with it, so records that reuse it can say so.
    results.save_model(model, path, metadata={
        "model_key": exp.model_key(), "config": json.dumps(exp.to_dict()),
        "train_seconds": f"{time.perf_counter() - start:.1f}", "device_name": results.device_name(device),
        "code_version": results.code_version(), "compile": compile,
    })
    checkpoint.unlink(missing_ok=True)
    # Hand on the model as every later run gets it, read back from the cache: training leaves it channels-last, and
    # the float rounding of another memory format is enough to move a defense's discrete decisions (UNIT's kept step
    # on one `cpu` DFST model: 28.04% ASR on the model just trained, 69.30% on the same weights from the cache).
    return results.load_model(build_model(exp, dataset), path).to(device).eval(), None


def _saved_metadata(path: os.PathLike) -> dict[str, str]:
    """The metadata of the cached model at ``path`` (empty when it cannot be read)."""
    try:
        return results.model_metadata(path)
    except Exception:  # no cache file (never written) or an unreadable one: the record says nothing of its training
        return {}


COMPILE_MODES = ("off", "default", "reduce-overhead")


def _compile_arg(mode: str) -> bool | str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; valid choices: {', '.join(COMPILE_MODES)}")
    return False if mode == "off" else True if mode == "default" else mode


def _evaluation_path(exp: Experiment, dataset: data.Dataset):
    return results.model_path(exp, dataset.digest).with_suffix(".before.json")


def _evaluation_tag(exp: Experiment, dataset: data.Dataset) -> dict[str, object]:
    """What the undefended model's metrics depend on: the exact model file and the test set."""
    return {"model_sha256": results.file_digest(results.model_path(exp, dataset.digest)), "dataset": exp.dataset,
            "test_sha256": results.tensor_digest(dataset.x_test, dataset.y_test)}


def cached_evaluation(exp: Experiment, dataset: data.Dataset) -> dict[str, float] | None:
    """The undefended model's metrics saved beside the cached model, if they were measured on this very model file
    and test set (every defense of one backdoored model shares them; the attack, hence the test-time trigger, is
    part of the model's key); else None."""
    path = _evaluation_path(exp, dataset)
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return saved["metrics"] if saved.get("tag") == _evaluation_tag(exp, dataset) else None


def remember_evaluation(exp: Experiment, dataset: data.Dataset, metrics: dict[str, float]) -> None:
    if results.model_path(exp, dataset.digest).exists():
        results.write_json(_evaluation_path(exp, dataset), {"tag": _evaluation_tag(exp, dataset), "metrics": metrics})


@dataclass
class Setup:
    """Everything before the defense: the data, the prepared attack, the poisoned training set, the backdoored model
    (trained or from the cache, with the cache's metadata or None) and the defender's clean split (never a poisoned
    sample, never test data), with the seconds of each stage."""

    dataset: data.Dataset
    attack: Attack
    poisoned: Poisoned
    model: nn.Module
    cached_meta: dict[str, str] | None
    clean: CleanSplit
    opt_idx: torch.Tensor
    val_idx: torch.Tensor
    seconds: dict[str, float]


def setup(
    exp: Experiment, *, device: str | torch.device | None = None, data_root: str | os.PathLike | None = None,
    progress: bool = True, compile: str = "off", log=print,
) -> Setup:
    """The one pipeline up to the defense, as :func:`run` uses it (and the widgets and benchmarks with it)."""
    dev = resolve_device(device)
    if dev.type == "cpu":
        tune_allocator()
    seconds: dict[str, float] = {}
    torch.manual_seed(exp.seed)
    with _timer(seconds, "data"):
        dataset = data.load(exp.dataset, data_root, size=exp.train_size)
    attack = exp.make_attack()
    if exp.target >= dataset.num_classes:
        raise ValueError(f"target {exp.target} is not a class of {exp.dataset} (0..{dataset.num_classes - 1})")
    with _timer(seconds, "poison"):
        x_train = data.to_float(dataset.x_train)
        # Trojan, CL and NARCISSUS learn their trigger from a clean or surrogate model first (cached); IA pre-trains
        # its mask generator; others no-op.
        attack.prepare(x_train, dataset.y_train, device=dev, progress=progress)
        joint = getattr(attack, "trains_with_model", False)
        # An attack that trains its generator with the model poisons each batch during training (backdoored_model).
        poisoned = Poisoned(x_train, dataset.y_train, torch.empty(0, dtype=torch.long)) if joint else \
            attack.poison(x_train, dataset.y_train)
    if not joint:
        # the defender's split before the model is trained: a rate that leaves a class no clean sample fails now
        opt_idx, val_idx = data.defense_split(dataset.y_train, exp.clean_fraction, exclude=poisoned.index,
                                              seed=exp.seed)
    with _timer(seconds, "train"):
        model, cached_meta = backdoored_model(exp, dataset, poisoned.x, poisoned.y, device=dev, progress=progress,
                                              compile=compile, attack=attack)
    if joint:
        # the training set as the trained generator poisons it: which samples the attacker touched, for the split
        start = time.perf_counter()
        poisoned = attack.poison(x_train, dataset.y_train)
        seconds["poison"] = round(seconds["poison"] + time.perf_counter() - start, 3)
    log(f"backdoored model {'loaded from cache' if cached_meta is not None else 'trained'} in {seconds['train']:.1f}s")
    if joint:
        opt_idx, val_idx = data.defense_split(dataset.y_train, exp.clean_fraction, exclude=poisoned.index,
                                              seed=exp.seed)
    clean = CleanSplit(dataset.x_train[opt_idx], dataset.y_train[opt_idx],
                       dataset.x_train[val_idx], dataset.y_train[val_idx])
    return Setup(dataset, attack, poisoned, model, cached_meta, clean, opt_idx, val_idx, seconds)


def run(
    exp: Experiment,
    *,
    device: str | torch.device | None = None,
    results_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    progress: bool = True,
    save: bool = True,
    compile: str = "off",
    log=print,
) -> results.Record:
    """Run ``exp`` and (with ``save``) write its record. Prints each stage's metrics and time through ``log``.
    ``compile`` (one of :data:`COMPILE_MODES`) is how the backdoored model's training steps run: ``reduce-overhead``
    (``torch.compile`` with CUDA graphs) trains the `paper` profile's ResNet-18 about 2.4x faster on a GPU."""
    # Every check that can fail does so before the data load and the training, not after them.
    _compile_arg(compile)
    dev = resolve_device(device)
    if save:
        results.check_writable(results_dir)
    # What runs killed while writing left behind: temporary models, checkpoints, triggers and records.
    for folder in (data.cache_dir() / "models", data.cache_dir() / "attacks", results_dir or results.RESULTS_DIR):
        tempfiles.remove_stale(folder)
    origin = results.provenance(dev)  # taken first: the code version is the one that starts running
    ready = setup(exp, device=dev, data_root=data_root, progress=progress, compile=compile, log=log)
    dataset, attack, poisoned, model, cached_meta = (ready.dataset, ready.attack, ready.poisoned, ready.model,
                                                     ready.cached_meta)
    seconds = dict(ready.seconds)
    cached = cached_meta is not None
    model_digest = results.weights_digest(model)  # which training of the configuration, before any defense
    # Where and by which code the model was trained (a cached model's own metadata): a retrain on another thread
    # count or code version need not give the same weights, and the record says which training it measured.
    meta = cached_meta if cached else _saved_metadata(results.model_path(exp, dataset.digest))
    trained = {k: meta.get(k) for k in ("code_version", "device_name", "train_seconds")}
    with _timer(seconds, "eval_before"):
        before = cached_evaluation(exp, dataset) if cached else None
        before_cached = before is not None
        if before is None:
            before = evaluate(model, dataset.x_test, dataset.y_test, attack, device=dev)
            remember_evaluation(exp, dataset, before)
    log(f"before {exp.defense}: clean_acc {before['clean_acc']:.2%}  asr {before['asr']:.2%}")

    clean, opt_idx, val_idx = ready.clean, ready.opt_idx, ready.val_idx
    defense = exp.make_defense()
    with _timer(seconds, "defense"):
        defended = defense(model, clean, device=dev, progress=progress)
    with _timer(seconds, "eval_after"):
        after = evaluate(defended, dataset.x_test, dataset.y_test, attack, device=dev)
    log(f"after {exp.defense}: clean_acc {after['clean_acc']:.2%}  asr {after['asr']:.2%}  "
        f"({seconds['defense']:.1f}s)")
    if defense.report.get("threshold_met") is False:
        log(f"warning: no bounds {exp.defense} tried kept validation accuracy at or above "
            f"{defense.report['threshold']:.2%} (the original model's {defense.report['base_val_acc']:.2%} minus the "
            f"budget); it kept the bounds with the best validation accuracy, "
            f"{defense.report['final_val_acc']:.2%}. Loosen the start (init_std) or raise the budget (degradation).")
    if defense.report.get("stop_reason") == "step_cap":
        log(f"note: {exp.defense} stopped at its step cap ({defense.report['steps_run']} steps) with the kept bounds "
            f"{defense.report['budget_gap']:.2%} above the accuracy threshold {defense.report['threshold']:.2%}: "
            f"more steps or a larger lr would tighten further within the budget")
    record = results.Record(
        key=exp.key(),
        config=exp.to_dict(),
        metrics={"before": before, "after": after},
        seconds=seconds,
        provenance={**origin, "dataset": exp.dataset, "data_sha256": dataset.digest,
                    "model_key": exp.model_key(), "weights_sha256": model_digest, "model_trained": trained,
                    "model_from_cache": cached, "before_from_cache": before_cached,
                    "compile": (cached_meta or {}).get("compile", "off") if cached else compile,
                    "n_train": len(dataset.x_train), "n_poisoned": len(poisoned.index),
                    "n_clean_opt": len(opt_idx), "n_clean_val": len(val_idx)},
        report={"resolved": {"attack": attack.params(), "attack_version": getattr(type(attack), "cache_version", 1),
                             "defense": defense.params()}, **defense.report},
    )
    if save:
        path = results.save(record, results_dir)
        log(f"record written: {path}")
    return record
