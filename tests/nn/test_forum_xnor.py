"""The classic hand-written XNOR net that "does not learn", rebuilt with onebit layers, learns.

Its shape follows the usual forum post: input kept in [N, H, C, W] layout and
permuted right before a binary conv, BatchNorm -> sign -> binary conv -> ReLU
blocks (XNOR-Net order), a ReLU straight into a later sign. With ``torch.sign``
and ``.data`` tricks this network loses its gradients; with onebit every layer
receives gradient and the loss falls.
"""

import torch
import torch.nn.functional as F
from torch import nn

from onebit import data
from onebit.nn import QActivation, QConv2d, QLinear


class ForumXNORNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv1 = QConv2d(32, 64, 3, padding=1, input_quantizer="ste_sign", weight_quantizer="ste_sign")
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv2 = QConv2d(64, 64, 3, padding=1, input_quantizer="ste_sign", weight_quantizer="ste_sign")
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.bn3 = nn.BatchNorm1d(256)
        self.sign3 = QActivation("ste_sign")
        self.fc1 = QLinear(256, 64, weight_quantizer="ste_sign")
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x_hcw):
        x = self.stem(x_hcw.permute(0, 2, 1, 3))
        h = self.bn1(x).permute(0, 2, 1, 3)  # the model keeps activations as [N, H, C, W] ...
        h = self.conv1(h.permute(0, 2, 1, 3))  # ... and permutes right before the binary conv
        h = self.pool1(self.relu1(h))
        h = self.pool2(self.relu2(self.conv2(self.bn2(h))))
        h = self.sign3(self.bn3(h.flatten(1)))
        return self.fc2(self.fc1(h))


def digits_hcw(n=512):
    d = data.load("digits")
    x, y = d.train.tensors
    return x[:n].permute(0, 2, 1, 3).contiguous(), y[:n]


def test_every_layer_receives_a_nonzero_gradient():
    torch.manual_seed(0)
    model = ForumXNORNet()
    x, y = digits_hcw(128)
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert p.grad.abs().sum() > 0, f"{name} received an all-zero gradient"
        assert torch.isfinite(p.grad).all(), name


def test_loss_falls():
    torch.manual_seed(0)
    model = ForumXNORNet()
    x, y = digits_hcw(512)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        for i in range(0, len(y), 64):
            loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            losses.append(F.cross_entropy(model(x), y).item())
        model.train()
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.8


def test_the_hand_written_version_dies_where_onebit_does_not():
    """Contrast: torch.sign after a ReLU maps every zero to 0, so a ReLU -> sign path carries nothing."""
    x = torch.relu(torch.randn(1000))
    assert (torch.sign(x) == 0).float().mean() > 0.4
    assert (QActivation("ste_sign")(x) == 0).sum() == 0
