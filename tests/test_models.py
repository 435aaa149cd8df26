"""The model factory: the seed CNN as Keras defined it, EfficientNet-Lite0/1/2 with real ImageNet
weights, and the grayscale handling of both."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from covid_cxr.errors import ModelError
from covid_cxr.models import accepts, available, create
from covid_cxr.models.efficientnet_lite import (
    LITE1,
    LITE2,
    pretrained_weights_path,
    round_channels,
)
from covid_cxr.models.seed_cnn import FastDropout
from covid_cxr.training.steps import train_step

torch.set_num_threads(2)


def test_registry_lists_both_models_and_refuses_unknown() -> None:
    assert {"seed-cnn", "efficientnet-lite0", "efficientnet-lite2"} <= set(available())
    assert accepts("seed-cnn", "size") and not accepts("efficientnet-lite0", "size")
    with pytest.raises(ModelError, match="available"):
        create("resnet-9000")
    with pytest.raises(ModelError, match="bad options"):
        create("seed-cnn", widht=3)


# ---------------------------------------------------------------- seed CNN


def test_seed_cnn_has_exactly_the_keras_parameter_count() -> None:
    model = create("seed-cnn")
    assert sum(p.numel() for p in model.parameters()) == 5_668_097
    assert model.conv1.weight.shape == (32, 3, 3, 3)  # Keras' 3-channel first layer is kept
    assert model.fc1.weight.shape == (64, 26 * 26 * 128)


def test_seed_cnn_refuses_pretrained() -> None:
    with pytest.raises(ModelError, match="no pretrained weights"):
        create("seed-cnn", pretrained=True)


def test_seed_cnn_uses_keras_initialisation() -> None:
    model = create("seed-cnn")
    fan_in, fan_out = 3 * 3 * 32, 3 * 3 * 64
    limit = (6 / (fan_in + fan_out)) ** 0.5  # Glorot uniform
    w = model.conv2.weight
    assert w.abs().max() <= limit and w.abs().max() > 0.9 * limit
    assert all(float(m.bias.detach().abs().max()) == 0 for m in (model.conv1, model.fc1, model.fc2))


def _keras_order_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The Keras layer order on a 3-channel replicated input, with the model's weights."""
    x = x.expand(-1, 3, -1, -1)
    x = F.relu(F.conv2d(x, model.conv1.weight, model.conv1.bias))
    for conv in (model.conv2, model.conv3, model.conv4):
        x = F.max_pool2d(F.relu(F.conv2d(x, conv.weight, conv.bias)), 2)
    x = x.permute(0, 2, 3, 1).flatten(1)  # Keras flattens NHWC
    return model.fc2(F.relu(model.fc1(x))).squeeze(1)


def test_seed_cnn_equals_the_keras_layer_order_in_values_and_gradients() -> None:
    """Folding the grey channel and pooling before ReLU are exact rewrites, not approximations."""
    torch.manual_seed(0)
    model = create("seed-cnn", size=64).eval()
    x = torch.rand(3, 1, 64, 64)
    ours = model(x)
    reference = _keras_order_reference(model, x)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(ours.sum(), [model.conv1.weight, model.conv2.weight])
    ref_grads = torch.autograd.grad(reference.sum(), [model.conv1.weight, model.conv2.weight])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)


def test_seed_cnn_shapes_and_cam_layer() -> None:
    model = create("seed-cnn", size=96).eval()
    seen = []
    model.cam_layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        out = model(torch.rand(5, 1, 96, 96))
    assert out.shape == (5,)
    assert seen[0].shape == (5, 128, 20, 20)  # 96-2-2, pool, -2, pool, -2
    assert float(seen[0].min()) >= 0  # the Keras layer's output is after its ReLU


def test_fast_dropout_drops_the_right_share_and_keeps_the_mean() -> None:
    drop = FastDropout(0.25)
    x = torch.ones(16, 32, 40, 40).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(1)
    out = drop(x)
    assert abs(float((out == 0).float().mean()) - 0.25) < 0.01
    assert abs(float(out.mean()) - 1.0) < 0.02
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(1)
    assert torch.equal(drop(x), out)  # reproducible from the seed
    assert torch.equal(drop.eval()(x), x)


# ---------------------------------------------------------------- EfficientNet-Lite0


@pytest.fixture(scope="module")
def imagenet_state() -> dict[str, torch.Tensor]:
    return torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    return create("efficientnet-lite0", pretrained=True).eval()


def test_efficientnet_loads_every_imagenet_weight_except_the_head(lite0, imagenet_state) -> None:
    state = lite0.state_dict()
    shared = [k for k in imagenet_state if not k.startswith("_fc.")]
    assert set(shared) == {k for k in state if not k.startswith("_fc.")}
    for key in shared:
        assert torch.equal(state[key], imagenet_state[key]), key
    assert lite0._fc.weight.shape == (1, 1280)


def _grace_hopper() -> torch.Tensor:
    """The standard test photograph that ships with matplotlib (a woman in navy uniform)."""
    import matplotlib.cbook

    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    image = Image.open(path).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((224, 224))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def test_efficientnet_imagenet_weights_are_real(lite0, imagenet_state) -> None:
    """With the 1000-class head put back, the photograph is a 'military uniform' (652)."""
    head = nn.Linear(1280, 1000)
    head.load_state_dict(
        {"weight": imagenet_state["_fc.weight"], "bias": imagenet_state["_fc.bias"]}
    )
    with torch.no_grad():
        features = lite0.features(_grace_hopper())
        probs = head(features.mean((2, 3))).softmax(1)[0]
        # The stem's batch-norm statistics match this normalisation (a wrong one is ~5x off).
        stem = lite0._conv_stem(_grace_hopper() * (255 / 128) - 127 / 128)
    assert int(probs.argmax()) == 652 and float(probs[652]) > 0.2
    ratio = stem.var((0, 2, 3)) / lite0._bn0.running_var
    assert 0.5 < float(ratio.median()) < 2.0


def test_efficientnet_grey_input_equals_the_replicated_rgb_image(lite0) -> None:
    grey = _grace_hopper().mean(1, keepdim=True)
    with torch.no_grad():
        folded = lite0(grey)
        replicated = lite0(grey.expand(-1, 3, -1, -1))
    torch.testing.assert_close(folded, replicated, rtol=1e-4, atol=1e-4)


def test_efficientnet_shapes_cam_layer_and_freezing() -> None:
    model = create("efficientnet-lite0", pretrained=False, freeze_blocks=3, dropout=0.0)
    seen = []
    model.cam_layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    model.train()
    out = model(torch.rand(2, 1, 160, 160))
    assert out.shape == (2,)
    assert seen[0].shape == (2, 1280, 5, 5)
    cam = seen[0].detach()
    assert float(cam.min()) >= 0 and float(cam.max()) <= 6  # after ReLU6
    # GAP -> linear head: the logit is the CAM-weighted mean of the cam-layer features.
    torch.testing.assert_close(
        out, seen[0].mean((2, 3)) @ model._fc.weight[0] + model._fc.bias, rtol=1e-4, atol=1e-4
    )
    frozen = [model._conv_stem, model._bn0, *model._blocks[:3]]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in model._blocks[3].parameters())
    assert not model._bn0.training and model._blocks[3]._bn1.training
    with pytest.raises(ModelError, match="freeze_blocks"):
        create("efficientnet-lite0", pretrained=False, freeze_blocks=17)


def test_efficientnet_bf16_training_gradients_follow_float32() -> None:
    """The bf16 path (with its float32-backward depthwise layers) computes the same gradients."""
    torch.manual_seed(0)
    model = create("efficientnet-lite0", pretrained=True, dropout=0.0, drop_connect=0.0).eval()
    x = torch.rand(4, 1, 96, 96)
    grads = []
    for bf16 in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        out.float().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    cosine = F.cosine_similarity(grads[0], grads[1], dim=0)
    assert float(cosine) > 0.99
    assert model._blocks[5]._depthwise_conv.weight.grad.dtype == torch.float32


# ---------------------------------------------------------------- EfficientNet-Lite1 and -Lite2

LITE_SIZES = {"efficientnet-lite0": 16, "efficientnet-lite1": 21, "efficientnet-lite2": 21}


def test_width_rounding_follows_efficientnet() -> None:
    # Nearest multiple of 8, but never more than 10% under the scaled width.
    assert [round_channels(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [
        16,
        24,
        48,
        88,
        120,
        208,
        352,
    ]
    assert round_channels(20, 1.0) == 24 and round_channels(11, 1.0) == 16


@pytest.mark.parametrize("name", sorted(LITE_SIZES))
def test_every_lite_size_loads_its_imagenet_weights_and_takes_grey_input(name: str) -> None:
    model = create(name, pretrained=True, dropout=0.1, drop_connect=0.3).eval()
    variant = model.variant
    imagenet = torch.load(pretrained_weights_path(variant), map_location="cpu", weights_only=True)
    state = model.state_dict()
    # Every ImageNet tensor but the 1000-class head is in the model, value for value.
    assert {k for k in imagenet if not k.startswith("_fc.")} == set(state) - {
        "_fc.weight",
        "_fc.bias",
    }
    assert all(torch.equal(state[k], v) for k, v in imagenet.items() if not k.startswith("_fc."))
    assert len(model._blocks) == LITE_SIZES[name]
    assert (model._dropout.p, model.drop_connect) == (0.1, 0.3)
    seen = []
    model.cam_layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 64))
    assert out.shape == (2,) and torch.isfinite(out).all()
    assert seen[0].shape == (2, 1280, 2, 2)


def test_lite_sizes_default_to_the_reference_dropout() -> None:
    assert create("efficientnet-lite1", pretrained=False)._dropout.p == LITE1.dropout == 0.2
    assert create("efficientnet-lite2", pretrained=False)._dropout.p == LITE2.dropout == 0.3


def test_lite2_trains_one_step_like_the_trainer() -> None:
    """bf16 autocast and channels-last, as `covid-cxr train` runs it on a CPU."""
    torch.manual_seed(0)
    model = create("efficientnet-lite2", pretrained=True, freeze_blocks=2)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, outputs = train_step(
        model,
        optimizer,
        torch.rand(4, 1, 64, 64),
        torch.tensor([0.0, 1.0, 0.0, 1.0]),
        F.binary_cross_entropy_with_logits,
        torch.device("cpu"),
        bf16=True,
        channels_last=True,
    )
    after = model.state_dict()
    assert np.isfinite(loss) and outputs.shape == (4,) and outputs.dtype == torch.float32
    assert not torch.equal(
        after["_blocks.20._project_conv.weight"], before["_blocks.20._project_conv.weight"]
    )
    assert not torch.equal(after["_fc.weight"], before["_fc.weight"])
    assert torch.equal(
        after["_blocks.1._depthwise_conv.weight"], before["_blocks.1._depthwise_conv.weight"]
    )
