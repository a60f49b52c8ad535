import os

# One intra-op thread for the whole suite, the notebook kernels it starts included (they inherit the environment).
# The tests run tiny models, where two threads spend their time synchronising: on two cores that something else
# also uses, the A.5 section at the smoke profile took 951 s with two threads and 157 s with one. Set before torch
# is imported, so that torch's thread pool is sized by it.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never read or write the user's cache: each session gets its own."""
    cache = tmp_path_factory.getbasetemp() / "unitlib-cache"
    monkeypatch.setenv("UNITLIB_CACHE", str(cache))


@pytest.fixture
def killed_after_saves(monkeypatch):
    """``killed_after_saves(n, run)`` calls ``run()`` as a kill would end it: right after the trainer's ``n``-th
    checkpoint save, training raises ``KeyboardInterrupt``. The trainer's saving is restored afterwards, so the
    next call resumes from what was saved."""
    from unitlib import train

    def kill(n: int, run) -> None:
        real_save, calls = train._save_checkpoint, []

        def save_then_die(*args, **kw):
            real_save(*args, **kw)
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt

        monkeypatch.setattr(train, "_save_checkpoint", save_then_die)
        try:
            with pytest.raises(KeyboardInterrupt):
                run()
        finally:
            monkeypatch.setattr(train, "_save_checkpoint", real_save)
        assert len(calls) == n

    return kill


@pytest.fixture
def generator_resumes(tmp_path, killed_after_saves):
    """``generator_resumes(make_attack, x, y, recipe, kill_after)``: an attack whose generator trains with the model
    (through its per-batch hook) is trained twice: once straight through, once killed after ``kill_after`` epoch
    checkpoints and resumed. The two generators must match."""
    from unitlib import models
    from unitlib.train import fit

    def check(make_attack, x, y, recipe, kill_after: int = 2) -> None:
        def run(checkpoint):
            atk = make_attack()
            atk.prepare(x, y)
            torch.manual_seed(0)
            model = models.build("small-cnn", width=4, num_classes=10)
            fit(model, x, y, recipe, seed=1, progress=False, channels_last=False, checkpoint=checkpoint,
                hook=atk.hook(y))
            return atk.networks["gen"].state_dict()

        reference = run(tmp_path / "ref.safetensors")
        killed_after_saves(kill_after, lambda: run(tmp_path / "run.safetensors"))
        resumed = run(tmp_path / "run.safetensors")
        for k, v in reference.items():
            assert torch.allclose(v.float(), resumed[k].float(), atol=1e-5), k

    return check
