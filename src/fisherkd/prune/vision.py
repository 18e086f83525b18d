"""Structured pruning of the zoo's MLPs, 1-D CNNs and CIFAR ResNets into a real, smaller zoo model.

The pruned model is rebuilt by the zoo constructor with smaller widths (``create_model(name, **kwargs)``) and the
kept rows / columns of the teacher's weights are copied in, so it saves, exports and loads like any student of its
family (``student.json`` names the zoo model and its new kwargs). Prunable:

- the hidden units of each ``mlp`` layer (per-layer widths, ``hidden=``);
- the channels of each ``cnn1d`` convolution (one ``channels=`` for all three layers, so every layer keeps the same
  number, each its own best);
- the inner channels of each CIFAR ResNet block (its first convolution's, ``inner=`` block by block; the residual
  widths stay, as the zoo's ResNets have one width per stage), and its blocks with an identity shortcut
  (``blocks=``, the count per stage; a removed block is the identity, and its gate scales the block's update
  out − in). Blocks with a projection shortcut change the shape and always stay.

Channel gates sit after each ReLU, so a pruned unit is exactly a unit whose gate is zero. In the plain stacks a
layer maps one width to another, so no layer is removable there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from fisherkd.models import create_model
from fisherkd.models.resnet import ResNet
from fisherkd.models.small import CNN1D, MLP
from fisherkd.prune.criteria import Gate, Slice, Structure, slice_state


def _linears(model: MLP) -> list[tuple[int, nn.Linear]]:
    return [(i, m) for i, m in enumerate(model.features) if isinstance(m, nn.Linear)]


def zoo_structures(model: nn.Module) -> list[Structure]:
    """The prunable structures of a zoo ``mlp`` or ``cnn1d``."""
    if isinstance(model, MLP):
        linears = _linears(model)
        out = []
        for k, (i, layer) in enumerate(linears):
            reader = f"features.{linears[k + 1][0]}" if k + 1 < len(linears) else "head"
            out.append(
                Structure(
                    f"features.{i}",
                    "neuron",
                    layer.out_features,
                    (Gate(f"features.{i + 1}"),),
                    (Slice(f"features.{i}.weight", 0), Slice(f"features.{i}.bias", 0), Slice(f"{reader}.weight", 1)),
                )
            )
        return out
    if isinstance(model, CNN1D):
        convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv1d)]
        channels = model.features[convs[0]].out_channels
        positions = model.head.in_features // channels  # the head reads the flattened C × L map, channel-major
        out = []
        for k, i in enumerate(convs):
            last = k + 1 == len(convs)
            reader = Slice("head.weight", 1, positions) if last else Slice(f"features.{convs[k + 1]}.weight", 1)
            out.append(
                Structure(
                    f"features.{i}",
                    "channel",
                    channels,
                    (Gate(f"features.{i + 1}"),),
                    (Slice(f"features.{i}.weight", 0), Slice(f"features.{i}.bias", 0), reader),
                )
            )
        return out
    if isinstance(model, ResNet):
        out = []
        for stage in ("layer1", "layer2", "layer3"):
            for b, block in enumerate(model.get_submodule(stage)):
                name = f"{stage}.{b}.conv1"
                bn = [Slice(f"{name}.1.{t}", 0) for t in ("weight", "bias", "running_mean", "running_var")]
                slices = (Slice(f"{name}.0.weight", 0), *bn, Slice(f"{stage}.{b}.conv2.0.weight", 1))
                out.append(Structure(name, "channel", block.conv1[0].out_channels, (Gate(f"{name}.2"),), slices))
        removable = [f"{stage}.{b}" for stage, b, block in _blocks(model) if isinstance(block.shortcut, nn.Identity)]
        if removable:
            out.append(Structure(BLOCKS, "layer", len(removable), tuple(Gate(b, 1, 1, "delta") for b in removable)))
        return out
    raise TypeError(
        f"structured pruning supports the zoo's mlp, cnn1d and CIFAR ResNets (resnet8 … resnet110, resnet8x4, "
        f"resnet32x4) and Llama-style Hugging Face causal LMs, not {type(model).__name__}: choose one of those teachers"
    )


BLOCKS = "blocks"


def _blocks(model: ResNet) -> list[tuple[str, int, nn.Module]]:
    return [
        (stage, b, block)
        for stage in ("layer1", "layer2", "layer3")
        for b, block in enumerate(model.get_submodule(stage))
    ]


def fixed_blocks(model: nn.Module) -> int:
    """Blocks that cannot be removed (a ResNet block whose shortcut is a projection changes the shape)."""
    if not isinstance(model, ResNet):
        return 0
    return sum(not isinstance(block.shortcut, nn.Identity) for _, _, block in _blocks(model))


def _kept_blocks(model: ResNet, keep: Mapping[str, Tensor]) -> list[str]:
    """The names of the blocks a pruned ResNet keeps, in order."""
    names = [f"{stage}.{b}" for stage, b, _ in _blocks(model)]
    blocks = next((s for s in zoo_structures(model) if s.name == BLOCKS), None)
    if blocks is None or BLOCKS not in keep:
        return names
    dropped = {blocks.gates[i].module for i in range(blocks.size)} - {blocks.gates[i].module for i in keep[BLOCKS]}
    return [n for n in names if n not in dropped]


def _renumber_blocks(state: Mapping[str, Tensor], kept: list[str]) -> dict[str, Tensor]:
    """Drop the removed blocks' tensors and number each stage's kept blocks 0, 1, … again."""
    new_name = {}
    for stage in ("layer1", "layer2", "layer3"):
        for i, name in enumerate(n for n in kept if n.startswith(f"{stage}.")):
            new_name[name] = f"{stage}.{i}"
    out = {}
    for key, tensor in state.items():
        stage, _, rest = key.partition(".")
        if stage in ("layer1", "layer2", "layer3"):
            index, _, tail = rest.partition(".")
            block = f"{stage}.{index}"
            if block not in new_name:
                continue
            key = f"{new_name[block]}.{tail}"
        out[key] = tensor
    return out


def zoo_kwargs(model: nn.Module, name: str, kwargs: Mapping[str, Any], keep: Mapping[str, Tensor]) -> dict[str, Any]:
    """The zoo kwargs of the pruned model."""
    new = dict(kwargs)
    sizes = [len(keep[s.name]) for s in zoo_structures(model) if s.kind != "layer"]
    if isinstance(model, MLP):
        new["hidden"] = sizes
    elif isinstance(model, ResNet):
        kept = _kept_blocks(model, keep)
        new["inner"] = [
            len(keep[s.name])
            for s in zoo_structures(model)
            if s.kind == "channel" and s.name.removesuffix(".conv1") in kept
        ]
        if len(kept) < len(_blocks(model)):
            new["blocks"] = [sum(n.startswith(f"{stage}.") for n in kept) for stage in ("layer1", "layer2", "layer3")]
    else:
        if len(set(sizes)) != 1:
            raise ValueError(f"{name}: every convolution has one width (channels=), got kept counts {sizes}")
        new["channels"] = sizes[0]
    return new


def prune_zoo(
    model: nn.Module,
    name: str,
    kwargs: Mapping[str, Any],
    keep: Mapping[str, Tensor],
    in_channels: int | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """(the pruned zoo model, its kwargs): ``create_model(name, in_channels, num_classes, **kwargs)`` loaded with
    the kept weights of ``model`` (a strict load, so every tensor has the rebuilt model's shape). ``in_channels``
    and ``num_classes`` default to the teacher's."""
    structures = zoo_structures(model)
    new_kwargs = zoo_kwargs(model, name, kwargs, keep)
    num_classes = model.head.out_features if num_classes is None else num_classes
    if in_channels is None:
        if isinstance(model, CNN1D):
            in_channels = model.in_channels
        elif isinstance(model, ResNet):
            in_channels = model.stem[0].in_channels
        else:  # an MLP sees in_channels · in_features inputs: the flat count is what fixes its first layer
            in_channels, new_kwargs["in_features"] = 1, model.features[1].in_features
    pruned = create_model(name, in_channels=in_channels, num_classes=num_classes, **new_kwargs)
    state = slice_state(model.state_dict(), structures, keep)
    if isinstance(model, ResNet):
        state = _renumber_blocks(state, _kept_blocks(model, keep))
    pruned.load_state_dict(state, strict=True)
    return pruned.to(next(model.parameters()).device).train(model.training), new_kwargs
