"""What the labs call besides the library's own pipeline: quiet runs, test metrics of a model, and a run that never
reuses a model trained with an older version of a student's attack."""

from __future__ import annotations

import hashlib
import types
from typing import Any

import torch
from torch import nn

from ... import data, experiment, results
from ...config import Experiment
from ...metrics import evaluate


def quiet(*args: Any) -> None:
    """A ``log`` that prints nothing (the pipeline's stage messages would crowd a lab's page)."""
    del args


def test_metrics(model: nn.Module, ready: experiment.Setup) -> dict[str, float]:
    """``clean_acc`` and ``asr`` (and any attack-specific ASR) of ``model`` on the test set of ``ready``, with its
    attack's trigger: what a run reports after the defense."""
    return evaluate(model, ready.dataset.x_test, ready.dataset.y_test, ready.attack)


def run(exp: Experiment) -> results.Record:
    """Run ``exp`` through the one pipeline (:func:`unitlib.experiment.run`) without saving a record or printing.

    The backdoored model is cached by the experiment's settings, which do not include an attack's code. For an attack
    defined outside this library (a student's), the cached model is also tied to a digest of the attack's code, and
    retrained when the code changed, so that editing a trigger and running again never measures the old one."""
    cls = exp.make_attack().__class__
    if not cls.__module__.startswith("unitlib."):
        dataset = data.load(exp.dataset, size=exp.train_size)
        path = results.model_path(exp, dataset.digest)
        stamp = path.with_suffix(".code")
        digest = code_digest(cls)
        if path.exists() and (not stamp.exists() or stamp.read_text() != digest):
            path.unlink()
            path.with_suffix(".before.json").unlink(missing_ok=True)
        record = experiment.run(exp, save=False, progress=False, log=quiet)
        stamp.write_text(digest)
        return record
    return experiment.run(exp, save=False, progress=False, log=quiet)


def code_digest(cls: type) -> str:
    """A digest of a class's own code (its methods' bytecode, constants and names, and its plain class attributes),
    over every class of its hierarchy defined outside this library."""
    h = hashlib.sha256()
    for klass in cls.__mro__:
        if klass.__module__.startswith("unitlib.") or klass is object:
            continue
        h.update(klass.__qualname__.encode())
        for name, value in sorted(vars(klass).items()):
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, types.FunctionType):
                h.update(name.encode())
                _code(value.__code__, h)
                for cell in value.__closure__ or ():  # values a method reads from the cell that defined it
                    h.update(repr(cell.cell_contents).encode() if not callable(cell.cell_contents) else b"f")
            elif isinstance(value, (int, float, str, bool, type(None), tuple)):
                h.update(f"{name}={value!r}".encode())
    return h.hexdigest()


def _code(code: types.CodeType, h: Any) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code(const, h)
        else:
            h.update(repr(const).encode())


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Images as float in [0, 1] (uint8 images divided by 255; float images as they are)."""
    return x.float().div(255) if x.dtype == torch.uint8 else x.float()
