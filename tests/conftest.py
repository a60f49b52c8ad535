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
