"""A small 2-conv CNN for Fashion-MNIST students."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from fisherkd.models.layers import conv_bn, init_conv_bn, pooled_features
from fisherkd.models.registry import register_model


class SmallCNN(nn.Module):
    """Two 3×3 conv-BN-ReLU-maxpool stages (16, 32 channels): a 7×7 map for 28×28 input, then a linear head.

    ``head="flatten"`` classifies the flattened 32·7·7 map (other input sizes are average-pooled to 7×7 first);
    ``head="gap"`` classifies the globally average-pooled 32 channels.
    """

    stages: tuple[str, ...] = ("layer1", "layer2")

    def __init__(self, in_channels: int, num_classes: int, head: Literal["gap", "flatten"] = "flatten") -> None:
        super().__init__()
        if head not in ("gap", "flatten"):
            raise ValueError(f"head must be 'gap' or 'flatten', got {head!r}")
        self.layer1 = nn.Sequential(conv_bn(in_channels, 16), nn.MaxPool2d(2))
        self.layer2 = nn.Sequential(conv_bn(16, 32), nn.MaxPool2d(2))
        size = 1 if head == "gap" else 7
        self.features = pooled_features(size=size)
        self.head = nn.Linear(32 * size * size, num_classes)
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(self.layer2(self.layer1(x))))


@register_model("cnn_small")
def cnn_small(
    in_channels: int = 3, num_classes: int = 100, head: Literal["gap", "flatten"] = "flatten", **kwargs
) -> SmallCNN:
    """A 2-conv CNN student for Fashion-MNIST (LeCun et al., 1998 style), as in FisherKD's pilot benchmarks."""
    return SmallCNN(in_channels, num_classes, head=head, **kwargs)
