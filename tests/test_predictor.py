"""covid_cxr.Predictor: same numbers as the pipeline done by hand, any format, any thread."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import covid_cxr
from covid_cxr.errors import ModelError, NotAnImageError
from covid_cxr.imaging import read_radiograph
from covid_cxr.inference import predictor as predictor_module
from covid_cxr.inference.predictor import Predictor
from imaging_helpers import make_dicom
from inference_helpers import build, model_inputs, real_radiographs, torch_probabilities


@pytest.fixture(scope="module")
def effnet(tmp_path_factory: pytest.TempPathFactory):
    return build("efficientnet-lite0", tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory):
    return build("seed-cnn", tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def files(datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real PNG and JPEG radiographs plus a DICOM made from a real radiograph's pixels."""
    real = real_radiographs(datasets)
    pixels = np.asarray(Image.open(real["png"][0]).convert("L"))
    dicom = tmp_path_factory.mktemp("dicom") / "from-png.dcm"
    dicom.write_bytes(make_dicom(pixels))
    return [real["png"][1], real["png"][7], real["jpeg"][0], real["jpeg"][7], dicom]


def test_lazy_export_from_the_package() -> None:
    assert covid_cxr.Predictor is Predictor


@pytest.mark.parametrize("runtime", ["checkpoint", "onnx"])
def test_probability_equals_the_pipeline_by_hand_for_png_jpeg_and_dicom(
    effnet, files: list[Path], runtime: str
) -> None:
    predictor = Predictor(effnet.checkpoint if runtime == "checkpoint" else effnet.onnx)
    expected = torch_probabilities(effnet.model, model_inputs(files, effnet.info.preprocess))
    results = [predictor.predict(f) for f in files]
    assert [r.radiograph.format for r in results] == ["PNG", "PNG", "JPEG", "JPEG", "DICOM"]
    got = np.array([r.probability for r in results])
    np.testing.assert_allclose(got, expected, atol=1e-5 if runtime == "checkpoint" else 2e-5)
    assert np.ptp(got) > 0.05  # the images differ to the model, so equality means something
    for result in results:
        assert result.label == ("COVID-19" if result.probability >= 0.5 else "non-COVID")
        assert result.positive == (result.label == "COVID-19")
        assert (result.threshold, result.model_version) == (0.5, "test-efficientnet-lite0")
        assert set(result.timings_ms) == {"read", "gate", "preprocess", "model", "cam", "total"}
        parts = sum(v for k, v in result.timings_ms.items() if k != "total")
        assert result.timings_ms["total"] == pytest.approx(parts)
        assert result.cam is None


def test_bytes_and_decoded_radiographs_give_the_same_answer(effnet, files: list[Path]) -> None:
    predictor = Predictor(effnet.onnx)
    by_path = predictor.predict(files[2])
    by_bytes = predictor.predict(files[2].read_bytes(), name="upload.jpg")
    by_radiograph = predictor.predict(read_radiograph(files[2]))
    assert by_bytes.source == "upload.jpg"
    assert by_bytes.probability == by_path.probability == by_radiograph.probability
    assert by_radiograph.timings_ms["read"] == 0.0
    with pytest.raises(NotAnImageError, match=r"notes\.png"):
        predictor.predict(b"not an image at all, just text", name="notes.png")


def test_batches_equal_single_predictions_in_order(effnet, files: list[Path]) -> None:
    predictor = Predictor(effnet.onnx)
    single = [predictor.predict(f).probability for f in files]
    batched = predictor.predict_batch(files, batch_size=2)
    assert [r.source for r in batched] == [str(f) for f in files]
    np.testing.assert_allclose([r.probability for r in batched], single, atol=1e-5)


def test_concurrent_predictions_equal_sequential_ones(effnet, files: list[Path]) -> None:
    """8 threads share one Predictor per runtime; PyTorch mixes Grad-CAM and plain calls."""
    for model in (effnet.onnx, effnet.checkpoint):
        predictor = Predictor(model)
        jobs = [(f, cam) for f in files for cam in (False, True)]
        expected = {job: predictor.predict(job[0], cam=job[1]) for job in jobs}
        mismatches = _hammer(predictor, jobs, expected, threads=8, calls=12)
        assert mismatches == [], f"{model.suffix}: {mismatches[:5]}"


def _hammer(predictor: Predictor, jobs: list, expected: dict, threads: int, calls: int) -> list:
    """Run `calls` jobs on each of `threads` threads; the jobs that gave a different answer."""
    mismatches: list[str] = []

    def worker(offset: int) -> None:
        for i in range(calls):
            path, cam = jobs[(offset + i) % len(jobs)]
            try:
                got = predictor.predict(path, cam=cam)
            except Exception as exc:  # a thread's exception would otherwise vanish
                mismatches.append(f"{path.name} cam={cam}: {type(exc).__name__}: {exc}")
                continue
            want = expected[(path, cam)]
            same_cam = not cam or np.allclose(got.cam, want.cam, atol=1e-5)
            if abs(got.probability - want.probability) > 1e-6 or not same_cam:
                mismatches.append(f"{path.name} cam={cam}")

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for worker_thread in workers:
        worker_thread.start()
    for worker_thread in workers:
        worker_thread.join()
    return mismatches


def test_grad_cam_is_immune_to_a_concurrent_plain_prediction(effnet, files: list[Path]) -> None:
    """The race made deterministic: a plain prediction runs while a Grad-CAM call sits between
    its forward pass (activations captured by a hook) and its backward pass. Were both on one
    model, the hook would also catch the plain call's activations and the backward would fail.
    """
    import torch

    predictor = Predictor(effnet.checkpoint)
    expected = predictor.predict(files[0], cam=True)
    head = [m for m in predictor.runtime.model.modules() if isinstance(m, torch.nn.Linear)][-1]
    cam_paused, plain_done = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def pause_the_cam_call(*_: object) -> None:
        if threading.current_thread().name == "cam":
            cam_paused.set()
            plain_done.wait(timeout=10)

    def explain() -> None:
        try:
            outcome["cam"] = predictor.predict(files[0], cam=True)
        except Exception as exc:
            outcome["cam"] = exc

    handle = head.register_forward_hook(pause_the_cam_call)
    try:
        cam_thread = threading.Thread(target=explain, name="cam")
        cam_thread.start()
        while not cam_paused.is_set() and cam_thread.is_alive():
            cam_paused.wait(timeout=0.01)
        outcome["plain"] = predictor.predict(files[1])
        plain_done.set()
        cam_thread.join(timeout=30)
    finally:
        handle.remove()
    assert not isinstance(outcome["cam"], Exception), outcome["cam"]
    np.testing.assert_allclose(outcome["cam"].cam, expected.cam, atol=1e-6)


def test_cam_from_onnx_equals_pytorch_grad_cam(effnet, files: list[Path]) -> None:
    from_torch = Predictor(effnet.checkpoint).predict_batch(files, cam=True)
    from_onnx = Predictor(effnet.onnx).predict_batch(files, cam=True)
    for a, b in zip(from_torch, from_onnx, strict=True):
        assert a.cam.shape == b.cam.shape == (4, 4)  # 128 px / 32
        assert a.cam.max() == pytest.approx(1.0)
        np.testing.assert_allclose(b.cam, a.cam, atol=1e-3)
        assert b.timings_ms["cam"] > 0 and a.timings_ms["cam"] > 0


def test_seed_cnn_onnx_refuses_cam_but_its_checkpoint_explains(seed, files: list[Path]) -> None:
    onnx_predictor = Predictor(seed.onnx)
    assert not onnx_predictor.cam_available
    assert onnx_predictor.predict(files[0]).cam is None
    with pytest.raises(ModelError, match="use its PyTorch checkpoint for Grad-CAM"):
        onnx_predictor.predict(files[0], cam=True)
    explained = Predictor(seed.checkpoint).predict(files[0], cam=True)
    assert explained.cam is not None and explained.cam.ndim == 2


def test_operating_point_and_model_resolution(
    effnet, files: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run_folder = Predictor(effnet.checkpoint.parent)  # a training run folder -> best.pt
    assert run_folder.path == effnet.checkpoint and run_folder.info == effnet.info
    youden = Predictor(effnet.onnx, operating_point="youden")
    assert youden.threshold == 0.3
    assert youden.predict(files[0]).threshold == 0.3
    with pytest.raises(ModelError, match=r"no operating point 'sens_99'.*'default', 'youden'"):
        Predictor(effnet.onnx, operating_point="sens_99")
    with pytest.raises(ModelError, match=r"has no best\.pt"):
        Predictor(tmp_path)

    monkeypatch.setenv("COVID_CXR_MODEL", str(effnet.onnx))
    assert Predictor().path == effnet.onnx
    monkeypatch.delenv("COVID_CXR_MODEL")
    monkeypatch.setattr(predictor_module, "DEFAULT_MODEL", tmp_path / "covid-cxr-default.onnx")
    with pytest.raises(ModelError) as caught:
        Predictor()
    message = str(caught.value)
    assert "the shipped default model" in message and "does not exist" in message
    assert "--model" in message and "COVID_CXR_MODEL" in message and "covid-cxr export" in message


def test_files_that_are_not_models_are_refused_clearly(tmp_path: Path) -> None:
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        Predictor(fake)
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_text("not a checkpoint")
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint"):
        Predictor(checkpoint)
