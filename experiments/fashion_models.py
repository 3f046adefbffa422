"""The two Fashion-MNIST architectures of issue 15: a MobileNet-v1-style CNN and a small ResNet.

Both are sized for 28x28x1 inputs and a 2-core CPU (a few hundred K
parameters at most), and both use BatchNorm, as the paper's ImageNet models do:

- :class:`MobileNetV1` is the paper's hard case.  Nearly all of its weights
  sit in 1x1 (pointwise) convolutions, and its 3x3 depthwise kernels have only
  9 weights per channel, so there is little redundancy for clustering to
  absorb; the paper reports its largest accuracy losses on MobileNet-v1.
- :class:`ResNet` is a CIFAR-style ResNet (He et al. 2016, section 4.2) with
  :class:`BasicBlock` s, shrunk to three stages of widths 16/32/64: the
  redundant, easier case to compare against.

Layer names are plain attributes (``stem``, ``blocks.3.pointwise``,
``stages.1.0.conv1``, ``fc``) so a torchdkm setting can single layers out.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

NUM_CLASSES = 10


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Convolution without bias (BatchNorm's shift replaces it), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DepthwiseSeparable(nn.Module):
    """MobileNet-v1's block: a 3x3 depthwise convolution (one filter per channel), then a 1x1 pointwise one."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.depthwise = conv_bn(c_in, c_in, 3, stride, groups=c_in)
        self.pointwise = conv_bn(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


#: (output channels, stride) of each depthwise-separable block: MobileNet-v1's pattern of
#: doubling the width at every downsampling, cut to two downsamplings for 28x28 inputs (28 -> 14 -> 7), the first one
#: straight after the stem: at full resolution a 2-core CPU needs ~3-10 min per epoch.
MOBILENET_BLOCKS: tuple[tuple[int, int], ...] = ((32, 2), (64, 1), (128, 2), (128, 1), (256, 1))


class MobileNetV1(nn.Module):
    """A 3x3 stem, depthwise-separable blocks, global average pooling and one Linear classifier."""

    def __init__(
        self, blocks: Sequence[tuple[int, int]] = MOBILENET_BLOCKS, stem: int = 16, num_classes: int = NUM_CLASSES
    ) -> None:
        super().__init__()
        self.stem = conv_bn(1, stem, 3)
        layers, width = [], stem
        for c_out, stride in blocks:
            layers.append(DepthwiseSeparable(width, c_out, stride))
            width = c_out
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity shortcut (a 1x1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


#: Widths of the three stages and blocks per stage: a ResNet-14 at CIFAR's smallest widths.  Every stage
#: halves the resolution (28 -> 14 -> 7 -> 4): at full resolution a 2-core CPU needs ~6 min per epoch.
RESNET_WIDTHS = (16, 32, 64)
RESNET_DEPTH = 2


class ResNet(nn.Module):
    """A 3x3 stem, three stages of :class:`BasicBlock` s (the later two downsample), pooling, one Linear."""

    def __init__(
        self, widths: Sequence[int] = RESNET_WIDTHS, depth: int = RESNET_DEPTH, num_classes: int = NUM_CLASSES
    ) -> None:
        super().__init__()
        self.stem = conv_bn(1, widths[0], 3)
        stages, width = [], widths[0]
        for c_out in widths:
            blocks = [BasicBlock(width if j == 0 else c_out, c_out, 2 if j == 0 else 1) for j in range(depth)]
            stages.append(nn.Sequential(*blocks))
            width = c_out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.stages(self.stem(x)).mean(dim=(2, 3)))


#: The architectures by name, as the experiments' ``--model`` option spells them.
MODELS = {"mobilenet": MobileNetV1, "resnet": ResNet}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
