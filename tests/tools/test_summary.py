"""summary(): counts checked against formulas computed here by hand, and the table users see."""

import torch
from torch import nn

from onebit import models, quant
from onebit.cli import main
from onebit.nn import QActivation, QConv2d, QLinear
from onebit.summary import summary


def test_lenet_binary_counts_match_the_formulas():
    w, c_in, classes, h = 4, 1, 10, 8  # width, input channels, classes, image side
    model = models.create("lenet_binary", num_classes=classes, in_channels=c_in, width=w)
    s = summary(model, torch.randn(1, c_in, h, h))
    w1, w2, hidden = w, 2 * w, 4 * w
    stem = c_in * w1 * 9
    conv2 = w1 * w2 * 9
    conv3 = w2 * w2 * 9
    fc = 4 * w2 * hidden
    head = hidden * classes + classes
    bn = 2 * (w1 + w2 + w2 + hidden)
    assert s.total_params == stem + conv2 + conv3 + fc + head + bn
    assert s.binary_params == conv2 + conv3 + fc
    assert s.memory_float_bytes == 4 * s.total_params
    assert s.memory_packed_bytes == (conv2 + conv3 + fc) / 8 + 4 * (stem + head + bn)
    # MACs per example: stem and conv2 at 8x8, conv3 at 4x4 (after pooling), fc, head
    binary = conv2 * h * h + conv3 * (h // 2) ** 2 + fc
    floating = stem * h * h + hidden * classes
    assert s.binary_macs == binary
    assert s.float_macs == floating
    assert s.row("3").binary_macs == conv2 * 64 and s.row("3").weight_bits == 1 and s.row("3").input_bits == 1
    assert s.row("0").output_shape == (1, w1, h, h)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)  # float
        self.binary = QConv2d(
            8, 8, 3, stride=2, padding=1, groups=2, bias=False, input_quantizer="ste_sign", weight_quantizer="ste_sign"
        )
        self.noact = QConv2d(8, 4, 1, input_quantizer=None, weight_quantizer="ste_sign")  # float input, binary weights
        self.sign = QActivation("ste_sign")
        self.twobit = QLinear(64, 6, input_quantizer=quant.DoReFa(2), weight_quantizer="ste_sign")
        self.shared = nn.Linear(6, 6, bias=False)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = self.noact(self.binary(self.stem(x)))
        x = self.twobit(torch.flatten(self.sign(x), 1))
        x = self.shared(self.shared(x))  # called twice
        return self.head(x)


def test_mixed_model_counts_match_the_formulas():
    s = summary(Mixed(), torch.randn(3, 3, 8, 8))  # batch 3: MACs are per example
    stem_p, bin_p, noact_w, twobit_w = 3 * 8 * 9 + 8, 8 * 4 * 9, 8 * 4, 64 * 6
    params = stem_p + bin_p + (noact_w + 4) + (twobit_w + 6) + 36 + (12 + 2)
    assert s.total_params == params  # the shared layer once
    assert s.binary_params == bin_p + noact_w + twobit_w
    assert s.memory_packed_bytes == (bin_p + noact_w + twobit_w) / 8 + 4 * (params - bin_p - noact_w - twobit_w)
    assert s.row("binary").macs == 8 * 4 * 4 * (4 * 9) and s.row("binary").binary_macs == s.row("binary").macs
    assert s.row("noact").macs == 4 * 4 * 4 * 8 and s.row("noact").binary_macs == 0  # 32-bit input
    assert s.row("twobit").macs == 6 * 64 and s.row("twobit").binary_macs == 0  # 2-bit input
    assert (s.row("twobit").input_bits, s.row("twobit").weight_bits) == (2, 1)
    assert s.row("shared").macs == 2 * 36 and s.row("shared").calls == 2
    assert s.binary_macs == 8 * 4 * 4 * 36
    assert s.float_macs == 8 * 8 * 8 * 27 + 4 * 4 * 4 * 8 + 6 * 64 + 72 + 12
    assert s.row("sign").params == 0 and s.row("sign").macs == 0
    assert [r.name for r in s.rows] == ["stem", "binary", "noact", "sign", "twobit", "shared", "head"]


class LowBit(nn.Module):
    """An int8 stem, a binary conv and a ternary classifier: three weight widths."""

    def __init__(self):
        super().__init__()
        self.stem = QConv2d(3, 8, 3, padding=1, bias=False, input_quantizer="int8", weight_quantizer="int8_weight")
        self.binary = QConv2d(8, 8, 3, padding=1, bias=False, input_quantizer="ste_sign", weight_quantizer="ste_sign")
        self.head = QLinear(8 * 16, 5, input_quantizer="absmax8", weight_quantizer="ternary")

    def forward(self, x):
        return self.head(torch.flatten(self.binary(self.stem(x)), 1))


def test_memory_counts_each_weight_at_its_own_width():
    model = LowBit()
    s = summary(model, torch.randn(2, 3, 4, 4))
    stem_w, bin_w, head_w = 8 * 3 * 9, 8 * 8 * 9, 5 * 128
    assert s.lowbit_params == {1: bin_w, 2: head_w, 8: stem_w}
    assert s.binary_params == bin_w
    lowbit_bits = 1 * bin_w + 2 * head_w + 8 * stem_w
    others = s.total_params - stem_w - bin_w - head_w  # quantizer steps, scales, the head's bias
    assert others == sum(p.numel() for p in model.parameters()) - stem_w - bin_w - head_w > 0
    assert s.memory_packed_bytes == (lowbit_bits + 32 * others) / 8
    assert (s.row("stem").weight_bits, s.row("stem").input_bits) == (8, 8)
    assert s.integer_macs == 8 * 16 * 27 + 5 * 128  # stem and head, per example: both operands under 32 bits
    assert s.integer_macs == s.float_macs  # the binary conv's MACs are binary
    assert "8-bit weights at 8 bits" in str(s) and "ternary weights at 2 bits" in str(s)


def test_summary_leaves_the_model_as_it_was():
    model = models.create("lenet_binary", in_channels=1, width=4).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    summary(model, torch.randn(2, 1, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(m._forward_hooks for m in model.modules())


SNAPSHOT = """\
input (1, 1, 4, 4)

 Layer   Type          Output shape   Params   Binary   W bits   In bits    MACs   Binary MACs
 ─────────────────────────────────────────────────────────────────────────────────────────────
 0       Conv2d        (1, 2, 4, 4)       18        0       32        32     288             0
 1       BatchNorm2d   (1, 2, 4, 4)        4        0       32         -       0             0
 2       QConv2d       (1, 4, 4, 4)       72       72        1         1   1,152         1,152
 3       Flatten       (1, 64)             0        0        -         -       0             0
 4       Linear        (1, 3)            195        0       32        32     192             0

 Total                                   289       72                      1,632         1,152

Parameters: 289 (72 binary, 217 float)
Memory:     1.13 KiB as float32, 877 B packed (binary weights at 1 bit): 1.32x smaller
MACs:       1,632 per example (1,152 binary = 70.6%, 480 float)
"""


def test_rendered_table_snapshot():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, bias=False),
        nn.BatchNorm2d(2),
        QConv2d(2, 4, 3, padding=1, bias=False, input_quantizer="ste_sign", weight_quantizer="ste_sign"),
        nn.Flatten(),
        nn.Linear(64, 3),
    )
    assert str(summary(model, torch.randn(1, 1, 4, 4))) == SNAPSHOT


def test_cli_prints_the_table_for_a_zoo_model(capsys):
    assert main(["summary", "lenet_binary"]) == 0
    out = capsys.readouterr().out
    assert "QConv2d" in out and "Total" in out and "smaller" in out
    assert main(["summary", "no_such_model"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_cli_builds_the_model_with_its_model_args(capsys):
    assert main(["summary", "lenet_binary", "--model-arg", "width=4"]) == 0
    narrow = capsys.readouterr().out
    assert main(["summary", "lenet_binary", "--model-arg", "width=8"]) == 0
    wide = capsys.readouterr().out
    assert (
        summary(models.create("lenet_binary", in_channels=1, width=4), torch.zeros(1, 1, 8, 8)).totals_text() in narrow
    )
    assert narrow != wide
    assert main(["summary", "lenet_binary", "--model-arg", "widht=4"]) == 2
    assert "widht" in capsys.readouterr().err
