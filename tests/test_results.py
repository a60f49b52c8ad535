import json
import re

import pytest
import torch

from unitlib import models, results
from unitlib.config import profile


def _record(**kw):
    exp = profile("smoke")
    return results.Record(key=exp.key(), config=exp.to_dict(), metrics={"before": {"clean_acc": 0.9, "asr": 1.0},
                          "after": {"clean_acc": 0.88, "asr": 0.05}}, seconds={"train": 1.0},
                          provenance=results.provenance(torch.device("cpu")), **kw)


def test_record_roundtrip_and_find(tmp_path):
    rec = _record()
    path = results.save(rec, tmp_path)
    assert path.name.startswith("synthetic__badnets__unit__") and path.suffix == ".json"
    assert results.load(path) == rec
    assert results.find(profile("smoke"), tmp_path) == rec
    assert results.find(profile("smoke", seed=3), tmp_path) is None
    assert rec.experiment == profile("smoke")
    assert [r.key for r in results.load_all(tmp_path)] == [rec.key]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_provenance_fields():
    p = results.provenance(torch.device("cpu"))
    assert {"code_version", "device", "device_name", "torch", "torchvision", "python", "created"} <= set(p)
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", p["code_version"])


def test_code_version_without_git_or_declared(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "REPO_ROOT", tmp_path)  # a copy of the tree without .git
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.delenv("UNITLIB_CODE_VERSION", raising=False)
    assert results.code_version() == "unknown"
    monkeypatch.setenv("UNITLIB_CODE_VERSION", "0123abc")
    assert results.code_version() == "0123abc (declared)"


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = results.write_json(tmp_path / "r.json", {"a": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", boom)
    with pytest.raises(OSError):
        results.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}


def test_schema_mismatch_is_refused(tmp_path):
    path = results.save(_record(), tmp_path)
    data = json.loads(path.read_text())
    data["schema"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="schema 99"):
        results.load(path)


def test_model_save_load_is_safetensors(tmp_path):
    m = models.build("small-cnn", width=4)
    path = results.save_model(m, tmp_path / "m.safetensors", {"k": "v"})
    assert path.read_bytes()[8:9] == b"{"  # safetensors header, not a pickle
    m2 = results.load_model(models.build("small-cnn", width=4), path)
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_model_path_uses_cache_model_key_and_data_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path))
    exp = profile("smoke")
    path = results.model_path(exp, "a" * 64)
    assert path.parent == tmp_path / "models" and path.suffix == ".safetensors"
    assert path == results.model_path(exp.replace(defense="none"), "a" * 64)
    assert path != results.model_path(exp, "b" * 64)
    assert path != results.model_path(exp.replace(seed=1), "a" * 64)
