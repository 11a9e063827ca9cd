"""Mobile networks built from inverted residuals: MobileNetV2 and EfficientNet-Lite0.

Both use parameter names of the published checkpoints, so the real ImageNet weights
(see :mod:`onnxopt.models.pretrained`) load with ``strict=True``:

* :class:`MobileNetV2` - torchvision's layout (``features.N...``, ``classifier.1``),
  Conv-BN-ReLU6 blocks, 52 BatchNorms.
* :class:`EfficientNetLite0` - the EfficientNet-PyTorch layout (``_conv_stem``, ``_bn0``,
  ``_blocks.N.{_expand_conv,_bn0,_depthwise_conv,_bn1,_project_conv,_bn2}``, ``_conv_head``,
  ``_bn1``, ``_fc``), MBConv blocks without squeeze-excite, ReLU6, BN eps 1e-3, 49 BatchNorms,
  TensorFlow "SAME" padding (the checkpoint was converted from TensorFlow).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias, "same" padding for odd kernels) - BN - ReLU6, keys ``0``/``1``."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand-BN-ReLU6] - 3x3 depthwise-BN-ReLU6 - 1x1 project-BN (+x)."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


# (expand ratio t, output channels c, repeats n, first stride s) - the MobileNetV2 paper's table.
MOBILENET_V2_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) for 224x224 ImageNet images."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvBNReLU6(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in MOBILENET_V2_SETTING:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(ConvBNReLU6(cin, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000) -> MobileNetV2:
    return MobileNetV2(num_classes)


# EfficientNet-Lite0 stages: (repeats, kernel, first stride, expand ratio, in, out).
EFFICIENTNET_LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
EFFICIENTNET_BN_EPS = 1e-3


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=EFFICIENTNET_BN_EPS, momentum=0.01)


class StaticSamePadConv2d(nn.Conv2d):
    """Bias-free Conv2d with TensorFlow "SAME" padding for a fixed input size ``image_size``.

    The checkpoint was converted from TensorFlow, whose strided convolutions pad
    asymmetrically (less before than after); PyTorch's symmetric padding would shift every
    strided feature map by one pixel.  Symmetric cases use the convolution's own padding;
    asymmetric ones a ZeroPad2d in front (exported as a Pad node, as in EfficientNet-PyTorch).
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int, image_size: int) -> None:
        total = max((math.ceil(image_size / stride) - 1) * stride + kernel - image_size, 0)
        before, after = total // 2, total - total // 2
        symmetric = before == after
        super().__init__(cin, cout, kernel, stride, before if symmetric else 0, groups=groups, bias=False)
        self.static_padding: nn.Module = nn.Identity() if symmetric else nn.ZeroPad2d((before, after, before, after))
        self.out_size = math.ceil(image_size / stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.static_padding(x))


class MBConvBlock(nn.Module):
    """EfficientNet-Lite MBConv: [expand 1x1-BN-ReLU6] - depthwise kxk-BN-ReLU6 - project 1x1-BN (+x)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand_ratio: int, image_size: int) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = StaticSamePadConv2d(hidden, hidden, kernel, stride, hidden, image_size)
        self.out_size = self._depthwise_conv.out_size
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.act = nn.ReLU6(inplace=True)
        self.id_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expansion:
            out = self.act(self._bn0(self._expand_conv(out)))
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.id_skip else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for ``image_size`` square images normalised as ``(x*255 - 127) / 128``.

    The TensorFlow "SAME" padding is computed for ``image_size`` (default 224).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        stages: Sequence[tuple[int, int, int, int, int, int]] = EFFICIENTNET_LITE0_STAGES,
        dropout: float = 0.2,
        image_size: int = 224,
    ) -> None:
        super().__init__()
        self._conv_stem = StaticSamePadConv2d(3, 32, 3, 2, 1, image_size)
        self._bn0 = _bn(32)
        size = self._conv_stem.out_size
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in stages:
            for i in range(repeats):
                block = MBConvBlock(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand, size)
                blocks.append(block)
                size = block.out_size
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(stages[-1][-1], 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))


def efficientnet_lite0(num_classes: int = 1000) -> EfficientNetLite0:
    return EfficientNetLite0(num_classes)
