"""CIFAR VGG with BatchNorm as in the RepDistiller / mdistiller knowledge-distillation zoo."""

from __future__ import annotations

from torch import Tensor, nn

from fisherkd.models.layers import init_conv_bn, pooled_features
from fisherkd.models.registry import register_model

# conv widths of the five blocks; a 2×2 max-pool follows each of the first three
_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class VGG(nn.Module):
    """Five blocks of 3×3 conv-BN-ReLU layers (``block0``..``block4``), max-pooled after the first three."""

    stages: tuple[str, ...] = ("block0", "block1", "block2", "block3", "block4")

    def __init__(self, config: tuple[tuple[int, ...], ...], in_channels: int, num_classes: int) -> None:
        super().__init__()
        blocks = []
        for widths in config:
            layers: list[nn.Module] = []
            for width in widths:
                layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
                in_channels = width
            blocks.append(nn.Sequential(*layers))
        self.block0, self.block1, self.block2, self.block3, self.block4 = blocks
        self.pool0, self.pool1, self.pool2 = (nn.MaxPool2d(2) for _ in range(3))
        self.features = pooled_features()
        self.head = nn.Linear(in_channels, num_classes)
        init_conv_bn(self)
        nn.init.normal_(self.head.weight, 0, 0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block4(self.block3(x))
        return self.head(self.features(x))


@register_model("vgg8")
def vgg8(in_channels: int = 3, num_classes: int = 100, **kwargs) -> VGG:
    """VGG-8 with BatchNorm, the CRD zoo's student (Simonyan & Zisserman, 2015; Tian et al., 2020)."""
    return VGG(_CONFIGS["vgg8"], in_channels, num_classes, **kwargs)


@register_model("vgg11")
def vgg11(in_channels: int = 3, num_classes: int = 100, **kwargs) -> VGG:
    """VGG-11 with BatchNorm, CIFAR variant (Simonyan & Zisserman, 2015; Tian et al., 2020)."""
    return VGG(_CONFIGS["vgg11"], in_channels, num_classes, **kwargs)


@register_model("vgg13")
def vgg13(in_channels: int = 3, num_classes: int = 100, **kwargs) -> VGG:
    """VGG-13 with BatchNorm, the CRD zoo's teacher (Simonyan & Zisserman, 2015; Tian et al., 2020)."""
    return VGG(_CONFIGS["vgg13"], in_channels, num_classes, **kwargs)
