"""CIFAR ResNets and Wide ResNets as in the RepDistiller / mdistiller knowledge-distillation zoo."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from fisherkd.models.layers import conv_bn, init_conv_bn, pooled_features
from fisherkd.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus an identity (or 1×1 conv-BN projection) shortcut, ReLU after the sum.

    ``inner``: the first convolution's width (default ``out_channels``; smaller in a pruned ResNet)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, inner: int | None = None) -> None:
        super().__init__()
        inner = out_channels if inner is None else inner
        self.conv1 = conv_bn(in_channels, inner, 3, stride)
        self.conv2 = conv_bn(inner, out_channels, 3, relu=False)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = conv_bn(in_channels, out_channels, 1, stride, relu=False)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: a 3×3 conv stem, then three stages of ``(depth - 2) / 6`` basic blocks at strides 1, 2, 2.

    ``inner``: the width of every block's first convolution, block by block, and ``blocks``: the blocks of each
    stage (a ResNet pruned by fisherkd.prune); by default each block's stage width and ``(depth - 2) / 6``."""

    stages: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3")

    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int],
        in_channels: int,
        num_classes: int,
        inner: Sequence[int] | None = None,
        blocks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        counts = list(blocks) if blocks is not None else [(depth - 2) // 6] * 3
        # a stage's first block changes the shape unless it is the stride-1 first stage at the stem's width
        least = [int(widths[0] != widths[1]), 1, 1]
        if len(counts) != 3 or any(c < m for c, m in zip(counts, least)):
            raise ValueError(f"blocks: one count per stage (three), at least {least} for these widths, got {counts}")
        if inner is not None and len(inner) != sum(counts):
            raise ValueError(f"inner: {len(inner)} widths given for {sum(counts)} blocks (one width each)")
        starts = [0, counts[0], counts[0] + counts[1], sum(counts)]
        per_stage = [list(inner[starts[i] : starts[i + 1]]) if inner is not None else None for i in range(3)]
        self.stem = conv_bn(in_channels, widths[0])
        self.layer1 = _stage(BasicBlock, widths[0], widths[1], counts[0], 1, inner=per_stage[0])
        self.layer2 = _stage(BasicBlock, widths[1], widths[2], counts[1], 2, inner=per_stage[1])
        self.layer3 = _stage(BasicBlock, widths[2], widths[3], counts[2], 2, inner=per_stage[2])
        self.features = pooled_features()
        self.head = nn.Linear(widths[3], num_classes)
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(self.features(x))


class WideBlock(nn.Module):
    """Pre-activation block (BN-ReLU-conv, twice); a 1×1 projection shortcut takes the activated input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        identity = stride == 1 and in_channels == out_channels
        self.shortcut = None if identity else nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(act)))))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-depth-k: a 3×3 conv stem, three stages of ``(depth - 4) / 6`` pre-activation blocks, BN-ReLU, pool."""

    stages: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3")

    def __init__(self, depth: int, widen: int, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"Wide ResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.layer1 = _stage(WideBlock, widths[0], widths[1], n, 1, dropout=dropout)
        self.layer2 = _stage(WideBlock, widths[1], widths[2], n, 2, dropout=dropout)
        self.layer3 = _stage(WideBlock, widths[2], widths[3], n, 2, dropout=dropout)
        self.features = pooled_features(nn.BatchNorm2d(widths[3]), nn.ReLU())
        self.head = nn.Linear(widths[3], num_classes)
        init_conv_bn(self)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(self.features(x))


def _stage(
    block: type[nn.Module], in_channels: int, out_channels: int, n: int, stride: int, inner: list | None = None, **kw
) -> nn.Sequential:
    widths = [{} if inner is None else {"inner": inner[i]} for i in range(n)]
    blocks = [block(in_channels, out_channels, stride, **widths[0], **kw)] if n else []  # none: the identity
    blocks += [block(out_channels, out_channels, 1, **widths[i], **kw) for i in range(1, n)]
    return nn.Sequential(*blocks)


_THIN = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


@register_model("resnet8")
def resnet8(in_channels: int = 3, num_classes: int = 100, **kwargs) -> ResNet:
    """ResNet-8 for CIFAR (He et al., 2016; the CRD zoo of Tian et al., 2020)."""
    return ResNet(8, _THIN, in_channels, num_classes, **kwargs)


@register_model("resnet14")
def resnet14(in_channels: int = 3, num_classes: int = 100, **kwargs) -> ResNet:
    """ResNet-14 for CIFAR (He et al., 2016; the CRD zoo of Tian et al., 2020)."""
    return ResNet(14, _THIN, in_channels, num_classes, **kwargs)


@register_model("resnet20")
def resnet20(in_channels: int = 3, num_classes: int = 100, **kwargs) -> ResNet:
    """ResNet-20 for CIFAR (He et al., 2016; the CRD zoo of Tian et al., 2020)."""
    return ResNet(20, _THIN, in_channels, num_classes, **kwargs)


@register_model("resnet32")
def resnet32(in_channels: int = 3, num_classes: int = 100, **kwargs) -> ResNet:
    """ResNet-32 for CIFAR (He et al., 2016; the CRD zoo of Tian et al., 2020)."""
    return ResNet(32, _THIN, in_channels, num_classes, **kwargs)


@register_model("resnet44")
def resnet44(in_channels: int = 3, num_classes: int = 100, **kwargs) -> ResNet:
    """ResNet-44 for CIFAR (He et al., 2016; the CRD zoo of Tian et al., 2020)."""
    return ResNet(44, _THIN, in_channels, num_classes, **kwargs)


@register_model("resnet56")
def resnet56(in_channels: int = 3, num_classes: int = 100, **kwargs) -> ResNet:
    """ResNet-56 for CIFAR (He et al., 2016; the CRD zoo of Tian et al., 2020)."""
    return ResNet(56, _THIN, in_channels, num_classes, **kwargs)


@register_model("resnet110")
def resnet110(in_channels: int = 3, num_classes: int = 100, **kwargs) -> ResNet:
    """ResNet-110 for CIFAR (He et al., 2016; the CRD zoo of Tian et al., 2020)."""
    return ResNet(110, _THIN, in_channels, num_classes, **kwargs)


@register_model("resnet8x4")
def resnet8x4(in_channels: int = 3, num_classes: int = 100, **kwargs) -> ResNet:
    """ResNet-8 with 4× widths (32/64/128/256), the CRD zoo's student (Tian et al., 2020)."""
    return ResNet(8, _X4, in_channels, num_classes, **kwargs)


@register_model("resnet32x4")
def resnet32x4(in_channels: int = 3, num_classes: int = 100, **kwargs) -> ResNet:
    """ResNet-32 with 4× widths (32/64/128/256), the CRD zoo's teacher (Tian et al., 2020)."""
    return ResNet(32, _X4, in_channels, num_classes, **kwargs)


@register_model("resnet_fmnist")
def resnet_fmnist(in_channels: int = 3, num_classes: int = 100, **kwargs) -> ResNet:
    """CIFAR-style ResNet-20 at widths 32/64/128 (He et al., 2016): the Fashion-MNIST teacher of the pilots."""
    return ResNet(20, (32, 32, 64, 128), in_channels, num_classes, **kwargs)


@register_model("wrn_16_2")
def wrn_16_2(in_channels: int = 3, num_classes: int = 100, **kwargs) -> WideResNet:
    """WRN-16-2 (Zagoruyko & Komodakis, "Wide Residual Networks", 2016)."""
    return WideResNet(16, 2, in_channels, num_classes, **kwargs)


@register_model("wrn_40_1")
def wrn_40_1(in_channels: int = 3, num_classes: int = 100, **kwargs) -> WideResNet:
    """WRN-40-1 (Zagoruyko & Komodakis, "Wide Residual Networks", 2016)."""
    return WideResNet(40, 1, in_channels, num_classes, **kwargs)


@register_model("wrn_40_2")
def wrn_40_2(in_channels: int = 3, num_classes: int = 100, **kwargs) -> WideResNet:
    """WRN-40-2 (Zagoruyko & Komodakis, "Wide Residual Networks", 2016)."""
    return WideResNet(40, 2, in_channels, num_classes, **kwargs)
