"""ONNX export: ONNX Runtime equals PyTorch, metadata travels, int8 stays close to fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from covid_cxr.cli import main
from covid_cxr.errors import ModelError
from covid_cxr.imaging import PreprocessConfig
from covid_cxr.inference.metadata import FEATURES, LOGIT, read_metadata
from covid_cxr.inference.onnx_export import export_onnx, find_cam_head, sample_batch
from covid_cxr.inference.quantize import quantize_int8
from covid_cxr.models import create
from covid_cxr.models.checkpoint import ModelInfo
from inference_helpers import build, model_inputs, real_radiographs, torch_probabilities
from train_helpers import real_rows, write_rows

MODELS = ["efficientnet-lite0", "seed-cnn"]


@pytest.fixture
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture
def built(request: pytest.FixtureRequest, root: Path):
    return build(request.param, root)


@pytest.mark.parametrize("built", MODELS, indirect=True)
def test_onnx_runtime_equals_pytorch_in_fp32_on_real_radiographs(built, datasets: Path) -> None:
    files = real_radiographs(datasets)
    inputs = model_inputs(files["png"][:4] + files["jpeg"][:4], built.info.preprocess)
    import torch

    with torch.inference_mode():
        expected = built.model(torch.from_numpy(inputs)).numpy()
    session = ort.InferenceSession(str(built.onnx), providers=["CPUExecutionProvider"])
    (actual,) = session.run([LOGIT], {"image": inputs})
    assert actual.shape == (8,)
    assert np.max(np.abs(actual - expected)) < 1e-4
    # The radiographs really differ to the model (a constant output would prove nothing).
    assert np.ptp(expected) > 1e-2
    # The batch axis is dynamic: one image alone gives the same logit.
    (single,) = session.run([LOGIT], {"image": inputs[:1]})
    assert abs(float(single[0]) - float(expected[0])) < 1e-4


@pytest.mark.parametrize("built", MODELS, indirect=True)
def test_model_info_roundtrips_through_onnx_metadata(built) -> None:
    info, head = read_metadata(built.onnx)
    assert info == built.info
    assert info.preprocess.intensity == "equalize" and info.thresholds["youden"] == 0.3
    outputs = [o.name for o in onnx.load(str(built.onnx)).graph.output]
    if built.info.name == "efficientnet-lite0":
        assert outputs == [LOGIT, FEATURES]
        assert head is not None
        np.testing.assert_array_equal(head.weight, built.model._fc.weight.detach().numpy()[0])
    else:
        # Flatten -> Dense: no pooled-linear head, so no CAM features are exported.
        assert outputs == [LOGIT] and head is None


def test_cam_head_is_recognised_by_its_arithmetic_not_its_name(root: Path) -> None:
    built = build("efficientnet-lite0", root)
    batch = sample_batch(built.info, 3)
    head = find_cam_head(built.model, batch)
    assert head is not None
    # Break the pooled-linear relation (a bias on the pooled features): no head is claimed.
    import torch

    class Shifted(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.cam_layer = inner, inner.cam_layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + self.inner.features(x).amax(dim=(1, 2, 3))

    assert find_cam_head(Shifted(built.model).eval(), batch) is None


def test_int8_model_tracks_fp32_on_real_radiographs(
    datasets: Path, tmp_path: Path, root: Path
) -> None:
    built = build("efficientnet-lite0", root)
    files = real_radiographs(datasets)
    calibration = model_inputs(files["png"][:4] + files["jpeg"][:4], built.info.preprocess)
    held_out = model_inputs(files["png"][6:] + files["jpeg"][6:], built.info.preprocess)
    out = quantize_int8(built.onnx, tmp_path / "int8.onnx", calibration, method="minmax")

    assert out.stat().st_size < 0.45 * built.onnx.stat().st_size
    info, head = read_metadata(out)
    assert info.metadata["export"]["precision"] == "int8"
    assert info.metadata["export"]["calibration"]["images"] == 8
    assert head is not None  # CAM still works on the int8 model
    proto = onnx.load(str(out))
    nodes = {n.name: n for n in proto.graph.node}
    dequantized = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    float_weights = {i.name for i in proto.graph.initializer}
    # The linear head keeps float weights; every convolution is int8.
    kept_float = info.metadata["export"]["calibration"]["float_nodes"]
    assert [nodes[name].op_type for name in kept_float] == ["Gemm"]
    assert nodes[kept_float[0]].input[1] in float_weights
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert all(n.input[1] in dequantized for n in convs)

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run([LOGIT], {"image": held_out})
    p8 = 1 / (1 + np.exp(-logits.astype(np.float64)))
    p32 = torch_probabilities(built.model, held_out)
    # A loose bound: 8 calibration images and a random head amplify rounding; the real
    # model's AUC change is what `covid-cxr export --validate-on` measures.
    assert np.corrcoef(p8, p32)[0, 1] > 0.9
    assert np.mean(np.abs(p8 - p32)) < 0.15


def test_export_command_reports_parity_sizes_and_int8_accuracy_change(
    datasets: Path, tmp_path: Path, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built = build("seed-cnn", root)
    manifest = write_rows(tmp_path / "manifest.csv", real_rows(datasets, 9, 9), datasets)
    out = tmp_path / "exported" / "model.onnx"
    code = main(
        [
            "export",
            "--model",
            str(built.checkpoint.parent),
            "--out",
            str(out),
            "--int8",
            "--calibration",
            str(manifest),
            "--calibration-count",
            "6",
            "--validate-on",
            str(manifest),
            "--fp32-out",
            str(tmp_path / "fp32.onnx"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert out.is_file() and (tmp_path / "fp32.onnx").is_file()
    assert "max |logit ONNX - PyTorch|" in printed and "on 6 real inputs" in printed
    assert "calibration: 6 radiographs" in printed and "(train split)" in printed
    assert "validation: 6 radiographs" in printed and "(val split)" in printed
    assert "ONNX int8" in printed and "change" in printed and "MB" in printed
    info, _ = read_metadata(out)
    assert info.metadata["export"]["precision"] == "int8"
    assert read_metadata(tmp_path / "fp32.onnx")[0].metadata["export"]["precision"] == "fp32"


def test_export_refuses_bad_requests_with_usage_errors(
    tmp_path: Path, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built = build("seed-cnn", root)
    cases = {
        "needs --calibration": ["--model", str(built.checkpoint), "--int8"],
        "already ONNX": ["--model", str(built.onnx)],
        "model not found": ["--model", str(tmp_path / "missing.pt")],
    }
    for message, args in cases.items():
        assert main(["export", *args, "--out", str(tmp_path / "x.onnx")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_export_refuses_a_model_it_cannot_trace(tmp_path: Path) -> None:
    import torch

    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.mean() > 0.5:  # control flow on values cannot be exported as one graph
                return x.mean(dim=(1, 2, 3))
            return -x.mean(dim=(1, 2, 3))

    with pytest.raises(ModelError, match=r"ONNX export of odd failed"):
        export_onnx(DataDependent(), ModelInfo(name="odd"), tmp_path / "odd.onnx")


def test_lite2_exports_with_its_cam_head(tmp_path: Path) -> None:
    """The larger Lite sizes export like Lite0: logit and CAM features, equal to PyTorch."""
    import torch

    torch.manual_seed(0)
    model = create("efficientnet-lite2", pretrained=True).eval()
    torch.nn.init.normal_(model._fc.weight, std=0.2)
    info = ModelInfo(name="efficientnet-lite2", preprocess=PreprocessConfig(size=64))
    head = export_onnx(model, info, tmp_path / "lite2.onnx")
    assert head is not None and head.weight.shape == (1280,)
    inputs = np.random.default_rng(0).random((3, 1, 64, 64), dtype=np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(inputs)).numpy()
    session = ort.InferenceSession(str(tmp_path / "lite2.onnx"), providers=["CPUExecutionProvider"])
    logits, features = session.run([LOGIT, FEATURES], {"image": inputs})
    assert features.shape == (3, 1280, 2, 2)
    assert np.max(np.abs(logits - expected)) < 1e-4
    assert read_metadata(tmp_path / "lite2.onnx")[0] == info
