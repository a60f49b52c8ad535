import matplotlib
import pytest
import torch

from unitlib import data
from unitlib.book.gallery import plot_trigger_gallery, trigger_gallery

matplotlib.use("Agg")


def test_gallery_panels_and_figure():
    ds = data.load("synthetic", size=200)
    x, y = data.to_float(ds.x_train), ds.y_train
    budget = {"surrogate_epochs": 1, "surrogate_width": 8, "surrogate_size": None, "steps": 5}
    panels = trigger_gallery(["sig", "badnets", "narcissus"], x[:2], prepare_data=(x, y), budget=budget)
    assert list(panels) == ["sig", "badnets", "narcissus"]
    for p in panels.values():
        assert set(p) == {"clean", "poisoned", "difference"}
        assert p["clean"].shape == p["poisoned"].shape == (3, 32, 32)
        assert torch.allclose(p["difference"], (p["poisoned"] - p["clean"]).abs())
        assert p["difference"].max() > 0
    assert torch.equal(panels["badnets"]["clean"], x[1])  # attack i takes image i mod N
    fig = plot_trigger_gallery(panels)
    assert len(fig.axes) == 9


def test_gallery_refuses_unknown_attacks():
    with pytest.raises(ValueError, match="unknown attack 'nope'; valid choices:"):
        trigger_gallery(["nope"], torch.rand(1, 3, 32, 32))
