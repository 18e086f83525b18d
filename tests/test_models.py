"""Model zoo: shapes, stage taps, heads, and parameter counts against the reference definitions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisherkd.models import available_models, create_model

ONE_D = {"mlp", "cnn1d"}
IMAGE_MODELS = [name for name in available_models() if name not in ONE_D]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # batches of 2 run faster on one thread, and a busy second core cannot stall it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize(("in_channels", "num_classes", "size"), [(3, 100, 32), (1, 10, 28)])
def test_logits_stages_and_head(name: str, in_channels: int, num_classes: int, size: int) -> None:
    model = create_model(name, in_channels=in_channels, num_classes=num_classes)
    assert isinstance(model.head, nn.Linear)
    assert model.stages, f"{name} lists no stages"
    modules = dict(model.named_modules())
    assert "features" in modules, f"{name} has no 'features' module"
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(tap: str):
        def hook(_module: nn.Module, inputs: tuple, output: object) -> None:
            value = inputs[0] if tap == "head:in" else output
            assert isinstance(value, torch.Tensor), f"{name}.{tap} did not output a tensor"
            captured[tap] = (value, value.detach().clone())

        return hook

    handles = [modules[stage].register_forward_hook(keep(stage)) for stage in model.stages]
    handles.append(modules["features"].register_forward_hook(keep("features")))
    handles.append(model.head.register_forward_hook(keep("head:in")))
    logits = model(torch.randn(2, in_channels, size, size))
    for handle in handles:
        handle.remove()

    assert logits.shape == (2, num_classes)
    assert set(captured) == {*model.stages, "features", "head:in"}
    for tap, (value, at_capture) in captured.items():
        assert value.shape[0] == 2, f"{name}.{tap}: batch dimension lost"
        assert torch.equal(value, at_capture), f"{name}.{tap} was modified in place after the hook saw it"
    assert torch.equal(captured["features"][0], captured["head:in"][0])
    assert captured["head:in"][0].shape == (2, model.head.in_features)


def test_one_dimensional_models() -> None:
    x = torch.randn(2, 40)
    assert create_model("mlp", 1, 10)(x).shape == (2, 10)
    assert create_model("cnn1d", 1, 10)(x).shape == (2, 10)


def test_unknown_name_suggests_nearest() -> None:
    with pytest.raises(KeyError, match="resnet56"):
        create_model("resnet57")
    with pytest.raises(KeyError, match="wrn_40_2"):
        create_model("wrn_40_3")


# Independent counts, written from the reference definitions (Tian et al.'s RepDistiller), not from our classes.
def conv(cin: int, cout: int, k: int, bias: bool = False) -> int:
    return k * k * cin * cout + (cout if bias else 0)


def bn(c: int) -> int:
    return 2 * c


def linear(cin: int, cout: int) -> int:
    return cin * cout + cout


def reference_resnet(depth: int, widths: tuple[int, ...], classes: int = 100) -> int:
    n = (depth - 2) // 6
    total, cin = conv(3, widths[0], 3) + bn(widths[0]), widths[0]
    for cout in widths[1:]:
        for _ in range(n):
            total += conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout)
            if cin != cout:  # in this zoo every stride-2 block also changes width: 1×1 conv + BN projection
                total += conv(cin, cout, 1) + bn(cout)
            cin = cout
    return total + linear(cin, classes)


def reference_wrn(depth: int, k: int, classes: int = 100) -> int:
    n = (depth - 4) // 6
    total, cin = conv(3, 16, 3), 16
    for cout in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += bn(cin) + conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3)
            if cin != cout:
                total += conv(cin, cout, 1)
            cin = cout
    return total + bn(cin) + linear(cin, classes)


def reference_vgg(blocks: tuple[tuple[int, ...], ...], classes: int = 100) -> int:
    total, cin = 0, 3
    for block in blocks:
        for cout in block:
            total += conv(cin, cout, 3, bias=True) + bn(cout)
            cin = cout
    return total + linear(cin, classes)


def test_hand_counted_block() -> None:
    # resnet8x4: stem 3·9·32 + 64 = 928; stage 32→64: 9·32·64 + 128 + 9·64·64 + 128 + 32·64 + 128 = 57,728;
    # 64→128: 230,144; 128→256: 919,040; head 256·100 + 100 = 25,700 → 1,233,540
    assert reference_resnet(8, (32, 64, 128, 256)) == 928 + 57_728 + 230_144 + 919_040 + 25_700 == 1_233_540


REFERENCE = {
    "resnet8x4": reference_resnet(8, (32, 64, 128, 256)),
    "resnet32x4": reference_resnet(32, (32, 64, 128, 256)),
    "resnet20": reference_resnet(20, (16, 16, 32, 64)),
    "resnet56": reference_resnet(56, (16, 16, 32, 64)),
    "resnet110": reference_resnet(110, (16, 16, 32, 64)),
    "wrn_40_2": reference_wrn(40, 2),
    "wrn_16_2": reference_wrn(16, 2),
    "wrn_40_1": reference_wrn(40, 1),
    "vgg13": reference_vgg(((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))),
    "vgg8": reference_vgg(((64,), (128,), (256,), (512,), (512,))),
}

# CIFAR-100 parameter counts in millions as published for the CRD / mdistiller zoo
PUBLISHED = {
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "resnet20": 0.28,
    "resnet56": 0.86,
    "resnet110": 1.73,
    "wrn_40_2": 2.26,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "vgg13": 9.46,
    "vgg8": 3.96,
    "mobilenetv2": 0.81,
    "shufflenetv1": 0.95,
    "shufflenetv2": 1.35,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts(name: str) -> None:
    count = sum(p.numel() for p in create_model(name, in_channels=3, num_classes=100).parameters())
    assert count == pytest.approx(PUBLISHED[name] * 1e6, rel=0.02)
    if name in REFERENCE:
        assert count == REFERENCE[name]


def test_small_cnn_heads() -> None:
    flat = create_model("cnn_small", 1, 10)
    gap = create_model("cnn_small", 1, 10, head="gap")
    assert flat.head.in_features == 32 * 7 * 7
    assert gap.head.in_features == 32
    assert gap(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="head"):
        create_model("cnn_small", 1, 10, head="mean")


def test_vit_image_size_and_attention_tap() -> None:
    model = create_model("vit_tiny", 1, 10, image_size=28)
    assert model.pos_embed.shape == (1, 1 + 7 * 7, 64)
    maps = []
    handle = model.blocks[0].attn.probs.register_forward_hook(lambda _m, _i, out: maps.append(out))
    model(torch.randn(2, 1, 28, 28))
    handle.remove()
    assert maps[0].shape == (2, 4, 50, 50)
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 4, 50))
    assert model.stages == ("blocks.0", "blocks.1", "blocks.2", "blocks.3")


def test_an_unknown_model_argument_names_the_model_and_the_nearest_argument():
    with pytest.raises(TypeError, match=r"model 'mlp' has no argument 'hiden'.*did you mean: hidden"):
        create_model("mlp", in_channels=1, num_classes=10, hiden=3)
