"""Building blocks shared by the model zoo."""

from __future__ import annotations

from torch import nn


def conv_bn(
    in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    """Bias-free 'same'-padded convolution, BatchNorm, and optionally ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        # never in place: a forward hook's captured tensor must keep the values it had when captured
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def pooled_features(*before: nn.Module, size: int = 1) -> nn.Sequential:
    """``before`` modules, then adaptive average pooling to ``size``×``size`` and flattening: the penultimate vector."""
    return nn.Sequential(*before, nn.AdaptiveAvgPool2d(size), nn.Flatten())


def init_conv_bn(model: nn.Module) -> None:
    """Kaiming-normal (fan-out) convolutions with zero bias, BatchNorm weight 1 and bias 0, as in the CIFAR zoo."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
