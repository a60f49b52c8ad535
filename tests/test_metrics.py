import torch
from torch import nn

from unitlib import attacks
from unitlib.metrics import accuracy, attack_success_rate, evaluate


class Constant(nn.Module):
    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label

    def forward(self, x):
        out = torch.zeros(len(x), 10)
        out[:, self.label] = 1
        return out


class PatchDetector(nn.Module):
    """Predicts the true class (encoded in the top-left pixel) unless the bottom-right corner is white."""

    def forward(self, x):
        label = (x[:, 0, 0, 0] * 9).round().long()
        triggered = x[:, :, -4:, -4:].amax(dim=(1, 2, 3)) >= 1.0
        label = torch.where(triggered, torch.zeros_like(label), label)
        return nn.functional.one_hot(label, 10).float()


def test_accuracy_and_asr_definitions():
    y = torch.arange(100) % 10
    x = torch.zeros(100, 3, 8, 8)
    x[:, 0, 0, 0] = y / 9
    atk = attacks.get("badnets", target=0, pattern="white", patch_size=2)
    m = PatchDetector()
    assert accuracy(m, x, y) == 1.0
    # ASR is over non-target images only: all 90 flip to the target
    assert attack_success_rate(m, x, y, atk) == 1.0
    assert evaluate(Constant(0), x, y, atk) == {"clean_acc": 0.1, "asr": 1.0}
    assert evaluate(Constant(3), x, y, atk)["asr"] == 0.0


def test_uint8_inputs_are_scaled():
    y = torch.arange(20) % 10
    x = torch.zeros(20, 3, 8, 8, dtype=torch.uint8)
    x[:, 0, 0, 0] = (y.float() / 9 * 255).round().to(torch.uint8)
    assert accuracy(PatchDetector(), x, y) == 1.0
