"""Small models for MNIST-1D and quick experiments."""

from __future__ import annotations

from torch import Tensor, nn

from fisherkd.models.registry import register_model


class MLP(nn.Module):
    """Fully connected ReLU network; ``features`` ends at the last hidden layer, ``head`` is the classifier."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)
        self.stages = tuple(f"features.{i}" for i, m in enumerate(layers) if isinstance(m, nn.ReLU))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class CNN1D(nn.Module):
    """The MNIST-1D paper's CNN: three stride-2 Conv1d layers of ``channels`` channels, then a linear head.

    Greydanus, "Scaling down Deep Learning with MNIST-1D" (2020). Input (B, length) or (B, 1, length).
    """

    def __init__(self, in_channels: int, num_classes: int, length: int = 40, channels: int = 25) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, channels, 5, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Flatten(),
        )
        out_len = length
        for kernel in (5, 3, 3):
            out_len = (out_len + 2 - kernel) // 2 + 1
        self.head = nn.Linear(channels * out_len, num_classes)
        self.stages = ("features.1", "features.3", "features.5")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.head(self.features(x))


@register_model("mlp")
def mlp(in_channels: int = 1, num_classes: int = 10, in_features: int = 40, hidden: tuple[int, ...] = (100, 100)):
    """MLP 40-100-100-10 by default: the MNIST-1D paper's MLP baseline (68% on the default split)."""
    return MLP(in_channels * in_features, tuple(hidden), num_classes)


@register_model("cnn1d")
def cnn1d(in_channels: int = 1, num_classes: int = 10, length: int = 40, channels: int = 25):
    """The MNIST-1D paper's 1-D CNN (94% on the default split)."""
    return CNN1D(in_channels, num_classes, length, channels)
