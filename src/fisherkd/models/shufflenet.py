"""CIFAR ShuffleNetV1 and ShuffleNetV2 as in the RepDistiller / mdistiller knowledge-distillation zoo.

The reference code keeps PyTorch's default initialization for these two models, and so does this file.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fisherkd.models.layers import conv_bn, pooled_features
from fisherkd.models.registry import register_model


class ChannelShuffle(nn.Module):
    """Interleave the channels of ``groups`` groups: (B, g·c, H, W) → (B, c·g, H, W)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnitV1(nn.Module):
    """Grouped 1×1 conv, channel shuffle, 3×3 depthwise, grouped 1×1 conv; stride 2 concatenates an avg-pooled input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, group_input: bool) -> None:
        super().__init__()
        mid = out_channels // 4
        first_groups = groups if group_input else 1
        self.branch = nn.Sequential(
            conv_bn(in_channels, mid, 1, groups=first_groups),
            ChannelShuffle(first_groups),
            conv_bn(mid, mid, 3, stride, groups=mid),
            conv_bn(mid, out_channels, 1, groups=groups, relu=False),
        )
        self.stride = stride
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out, res = self.branch(x), self.shortcut(x)
        return self.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    """ShuffleNetV1 (groups 3): a 1×1 stem to 24 channels, then three stages that each start at stride 2."""

    stages: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3")

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: tuple[int, int, int] = (240, 480, 960),
        depths: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 24, 1)
        channels = 24
        for i, (width, depth) in enumerate(zip(widths, depths), 1):
            # the first unit concatenates its input, so its branch makes only the missing channels
            units = [ShuffleUnitV1(channels, width - channels, 2, groups, group_input=i > 1)]
            units += [ShuffleUnitV1(width, width, 1, groups, group_input=True) for _ in range(depth - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*units))
            channels = width
        self.features = pooled_features()
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(self.features(x))


class ShuffleUnitV2(nn.Module):
    """Keep half the channels, transform the other half (1×1, 3×3 depthwise, 1×1), concatenate, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            conv_bn(half, half, 1), conv_bn(half, half, 3, groups=half, relu=False), conv_bn(half, half, 1)
        )
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        kept, changed = x.chunk(2, dim=1)
        return self.shuffle(torch.cat([kept, self.branch(changed)], 1))


class DownUnitV2(nn.Module):
    """Stride-2 unit: two branches over the whole input, each making half the output channels, then shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.left = nn.Sequential(
            conv_bn(in_channels, in_channels, 3, 2, groups=in_channels, relu=False), conv_bn(in_channels, mid, 1)
        )
        self.right = nn.Sequential(
            conv_bn(in_channels, mid, 1), conv_bn(mid, mid, 3, 2, groups=mid, relu=False), conv_bn(mid, mid, 1)
        )
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 1×: a 1×1 stem to 24 channels, three stages (a down unit, then 3/7/3 units), 1×1 conv to 1024."""

    stages: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3")

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: tuple[int, int, int, int] = (116, 232, 464, 1024),
        depths: tuple[int, int, int] = (3, 7, 3),
    ) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 24, 1)
        channels = 24
        for i, (width, depth) in enumerate(zip(widths, depths), 1):
            units = [DownUnitV2(channels, width)] + [ShuffleUnitV2(width) for _ in range(depth)]
            setattr(self, f"layer{i}", nn.Sequential(*units))
            channels = width
        self.features = pooled_features(conv_bn(channels, widths[3], 1))
        self.head = nn.Linear(widths[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(self.features(x))


@register_model("shufflenetv1")
def shufflenetv1(in_channels: int = 3, num_classes: int = 100, **kwargs) -> ShuffleNetV1:
    """ShuffleNetV1, groups 3 (Zhang et al., 2018), CIFAR variant of the CRD zoo (Tian et al., 2020)."""
    return ShuffleNetV1(in_channels, num_classes, **kwargs)


@register_model("shufflenetv2")
def shufflenetv2(in_channels: int = 3, num_classes: int = 100, **kwargs) -> ShuffleNetV2:
    """ShuffleNetV2 1× (Ma et al., 2018), CIFAR variant of the CRD zoo (Tian et al., 2020)."""
    return ShuffleNetV2(in_channels, num_classes, **kwargs)
