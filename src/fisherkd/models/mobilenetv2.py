"""CIFAR MobileNetV2 as in the RepDistiller / mdistiller knowledge-distillation zoo."""

from __future__ import annotations

from torch import Tensor, nn

from fisherkd.models.layers import conv_bn, init_conv_bn, pooled_features
from fisherkd.models.registry import register_model

# (expansion or None for the model's expand_ratio, channels, repeats, first stride) per row of inverted residuals
_ROWS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
         (None, 160, 3, 2), (None, 320, 1, 1))  # fmt: skip
# which rows make up each stage: the reference taps its features after rows 1, 2, 4 and 6
_STAGE_ROWS = ((0, 1), (2,), (3, 4), (5, 6))


class InvertedResidual(nn.Module):
    """1×1 expansion, 3×3 depthwise, linear 1×1 projection; residual when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_channels * expand
        self.conv = nn.Sequential(
            conv_bn(in_channels, mid, 1),
            conv_bn(mid, mid, 3, stride, groups=mid),
            conv_bn(mid, out_channels, 1, relu=False),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 with a stride-2 stem, inverted residuals grouped into four stages, and a 1×1 conv to 1280."""

    stages: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, in_channels: int, num_classes: int, width_mult: float = 0.5, expand_ratio: int = 6) -> None:
        super().__init__()
        channels = int(32 * width_mult)
        self.stem = conv_bn(in_channels, channels, 3, 2)
        for i, rows in enumerate(_STAGE_ROWS, 1):
            blocks = []
            for row in rows:
                expand, width, repeats, stride = _ROWS[row]
                for j in range(repeats):
                    out = int(width * width_mult)
                    blocks.append(InvertedResidual(channels, out, stride if j == 0 else 1, expand or expand_ratio))
                    channels = out
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.features = pooled_features(conv_bn(channels, last, 1))
        self.head = nn.Linear(last, num_classes)
        init_conv_bn(self)
        nn.init.normal_(self.head.weight, 0, 0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.head(self.features(x))


@register_model("mobilenetv2")
def mobilenetv2(in_channels: int = 3, num_classes: int = 100, width_mult: float = 0.5, **kwargs) -> MobileNetV2:
    """MobileNetV2 (Sandler et al., 2018), CIFAR variant of the CRD zoo: expansion 6, width 0.5 (Tian et al., 2020)."""
    return MobileNetV2(in_channels, num_classes, width_mult=width_mult, **kwargs)
