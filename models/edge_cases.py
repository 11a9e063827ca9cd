"""Small graphs with the awkward BatchNormalization placements a folding pass must handle.

Each has one or two BN nodes whose neighbourhood is not the plain Conv -> BN pattern:

* :class:`BNAfterAdd` - Conv and Conv, Add, BN (fold into both Convs, or keep).
* :class:`BNAfterConcat` - Conv and Conv, Concat, BN (split the BN per Concat input).
* :class:`BNBeforeConvNoPad` - graph input -> BN -> Conv without padding (fold forward
  into the Conv; exact only because there is no zero padding).
* :class:`BNBeforePoolLinear` - Conv, ReLU, BN, GlobalAveragePool, Flatten, Linear
  (fold forward through the linear pooling into the Gemm).
* :class:`BNAfterReLUThenConv` - Conv, ReLU, BN, padded Conv (the ReLU blocks folding back,
  the padding blocks exact folding forward: the BN must stay or be handled specially).

Inputs are 1x8x12x12 (8 channels) for every model; outputs are small.
"""

from __future__ import annotations

import torch
from torch import nn

CHANNELS = 8
SIZE = 12


class BNAfterAdd(nn.Module):
    def __init__(self, c: int = CHANNELS) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(c, 16, 3, padding=1)
        self.conv_b = nn.Conv2d(c, 16, 1)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv_a(x) + self.conv_b(x)))


class BNAfterConcat(nn.Module):
    def __init__(self, c: int = CHANNELS) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(c, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(c, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(torch.cat([self.conv_a(x), self.conv_b(x)], 1)))


class BNBeforeConvNoPad(nn.Module):
    def __init__(self, c: int = CHANNELS) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, 16, 3, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


class BNBeforePoolLinear(nn.Module):
    def __init__(self, c: int = CHANNELS, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(torch.relu(self.conv(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class BNAfterReLUThenConv(nn.Module):
    def __init__(self, c: int = CHANNELS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.bn(torch.relu(self.conv1(x))))
