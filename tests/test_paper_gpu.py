"""The GPU-session scripts: benchmarks/paper_gpu.py (progress parsing, job specs, finish estimates) and
benchmarks/train_step.py."""

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "paper_gpu.py"


@pytest.fixture(scope="module")
def driver():
    spec = importlib.util.spec_from_file_location("paper_gpu", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_gpu"] = module
    spec.loader.exec_module(module)
    return module


def test_job_spec(driver):
    job = driver.parse_job("badnets")
    assert job.args == ["--attack", "badnets", "--defense", "unit"]
    job = driver.parse_job("clean:--attack badnets --set poison_rate=0 --defense none")
    assert job.name == "clean" and job.args == ["--attack", "badnets", "--set", "poison_rate=0", "--defense", "none"]


def test_progress_is_read_from_the_log_tail(driver, tmp_path):
    log = tmp_path / "j.log"
    bars = "".join(f"train:  {i // 391}%|█         | {i}/39100 [00:58<06:43, 86.92step/s, acc=0.791]\r"
                   for i in range(0, 4000, 50))
    log.write_text("experiment abc: badnets -> unit\n" + bars)
    job = driver.Job(name="j", args=[], log=log)
    assert job.progress() == (3950, 39100)
    log.write_text("decoding: 1000img\n")
    assert job.progress() is None


def test_eta_from_recent_rate(driver):
    job = driver.Job(name="j", args=[], total=1000)
    assert job.eta(100.0, window=40, tail_s=5) is None  # nothing seen yet
    job.history = [(60.0, 100), (70.0, 200), (80.0, 300), (100.0, 500)]
    # 10 steps/s over the last 40 s: 500 steps left take 50 s, plus the tail
    assert job.eta(100.0, window=40, tail_s=5) == pytest.approx(55.0)
    job.history = [(95.0, 100), (100.0, 150)]
    assert job.eta(100.0, window=40, tail_s=5) is None  # under half a window of data
    job.history = [(60.0, 1000), (100.0, 1000)]
    assert job.eta(100.0, window=40, tail_s=5) == 5  # training done: only the tail is left


def test_train_step_benchmark_measures_a_mode():
    # benchmarks/train_step.py, the step-rate comparison of the training loop's modes, on a tiny CPU run.
    spec = importlib.util.spec_from_file_location("train_step", PATH.parent / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = module.one("eager", "small-cnn", 4, n=80, batch=32, epochs=3, device="cpu")
    assert row["mode"] == "eager" and row["device"] == "cpu" and row["steps_per_s"] > 0
    assert row["images_per_s"] == pytest.approx(row["steps_per_s"] * 32, rel=0.01)
