"""The kinds of layers the model tools tell apart, as the module classes (and functions) of each.

Shared by the canonizers (:mod:`onebit.canonize`), the packed engine's lowering
(:mod:`onebit.engine.lowering`), the tracer (:mod:`onebit.tracing`), the summary and the
thresholds: a kind is named once, here. A tuple is for ``isinstance`` (subclasses count) or
``type(m) in`` (exact classes only); each reader says which it uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BATCHNORMS",
    "CONVOLUTIONS",
    "WEIGHT_LAYERS",
    "IDENTITIES",
    "AVG_POOLS",
    "ADAPTIVE_AVG_POOLS",
    "MAX_POOLS",
    "RELU_FUNCTIONS",
    "AVG_POOL_FUNCTIONS",
    "ADAPTIVE_AVG_POOL_FUNCTIONS",
    "MAX_POOL_FUNCTIONS",
    "DROPOUT_FUNCTIONS",
]

#: every BatchNorm (1-d, 2-d, 3-d, lazy, synchronized): ``y = gamma (x - mean) / sqrt(var + eps) + beta``
BATCHNORMS = nn.modules.batchnorm._BatchNorm

#: the convolutions whose weights a per-channel map can be merged into
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: the layers with a weight over input channels: the convolutions and ``nn.Linear``
WEIGHT_LAYERS = (*CONVOLUTIONS, nn.Linear)

#: the modules that are the identity in eval mode (``nn.Identity`` always, dropout in eval mode)
IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

#: average poolings over fixed windows (``padding``, ``count_include_pad``, ``divisor_override`` matter)
AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)

#: adaptive average poolings: every window averages real values only
ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)

#: every max pooling, fixed or adaptive: ``max`` over windows, non-decreasing in each value
MAX_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)

#: the functional forms of the same kinds, as called in a ``forward``
RELU_FUNCTIONS = (F.relu, torch.relu)
AVG_POOL_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
ADAPTIVE_AVG_POOL_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
MAX_POOL_FUNCTIONS = (
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
)
DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)
