import pytest
import torch

from unitlib import models
from unitlib.defenses.unit import activation_sites


@pytest.mark.parametrize("name", list(models.MODELS))
def test_models_forward(name):
    m = models.build(name, width=4, num_classes=7).eval()
    out = m(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("act", list(models.ACTIVATIONS))
def test_every_activation(act):
    m = models.build("small-cnn", width=4, activation=act).eval()
    assert torch.isfinite(m(torch.rand(2, 3, 32, 32))).all()
    kinds = {type(mod) for mod in m.modules() if isinstance(mod, models.ACTIVATION_TYPES)}
    assert len(kinds) == 1


def test_resnet18_has_the_official_bound_points():
    # stem + 2 per basic block x 8 blocks = 17, as the official UNIT code bounds
    m = models.build("resnet18", width=8).eval()
    sites = activation_sites(m, torch.rand(1, 3, 32, 32))
    assert len(sites) == 17
    assert sites[0] == "net.act1" and sites[-1] == "net.layer4.1.act2"


def test_resnet_mini_is_residual_with_batchnorm_and_average_pooling():
    m = models.build("resnet-mini", width=8).eval()
    net = m.net
    assert isinstance(net.pool, torch.nn.AdaptiveAvgPool2d)
    assert any(isinstance(mod, torch.nn.BatchNorm2d) for mod in net.modules())
    sites = activation_sites(m, torch.rand(1, 3, 32, 32))
    # stem + per stage: the pooled conv's activation and a basic block's two (inner, after the residual add)
    assert len(sites) == 10
    assert sites[:4] == ["net.act0", "net.stages.0.act", "net.stages.0.block.act1", "net.stages.0.block.act2"]
    # the residual path is live: zeroing the block's second conv leaves its input to pass through
    block = net.stages[0].block
    x = torch.rand(2, 8, 16, 16)
    torch.nn.init.zeros_(block.conv2.weight)
    with torch.no_grad():
        assert torch.allclose(block(x), torch.relu(block.bn2.bias[None, :, None, None] + x))


def test_width_scales_parameters():
    small = sum(p.numel() for p in models.build("resnet18", width=16).parameters())
    full = sum(p.numel() for p in models.build("resnet18").parameters())
    assert 10_000_000 < full < 12_000_000  # CIFAR ResNet-18: 11.2M
    assert small < full / 10


def test_grayscale_input():
    m = models.build("small-cnn", width=4, in_channels=1).eval()
    assert m(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_bad_names():
    with pytest.raises(ValueError, match="unknown model 'resnet19'; valid choices: resnet18"):
        models.build("resnet19")
    with pytest.raises(ValueError, match="unknown activation 'swish'; valid choices: relu, leakyrelu"):
        models.build("resnet18", activation="swish")


def test_resnet_depths_have_their_papers_blocks():
    # He et al.: 18 and 34 layers in basic blocks (2 convolutions), 50 and 101 in bottlenecks (3): the stem, the
    # blocks' convolutions (not the projection shortcuts) and the linear head
    def depth(name):
        m = models.build(name, width=4)
        return 1 + sum(isinstance(x, torch.nn.Conv2d) and ".shortcut" not in n for n, x in m.named_modules())
    assert [depth(n) for n in ("resnet18", "resnet34", "resnet50", "resnet101")] == [18, 34, 50, 101]
