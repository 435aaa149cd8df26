"""Static int8 quantisation of an exported model, calibrated on real radiographs.

QDQ format (ONNX Runtime fuses QuantizeLinear/DequantizeLinear pairs into int8 kernels that
use AVX-512 VNNI here), unsigned 8-bit activations with signed 8-bit per-channel weights
(the x86 "U8S8" layout ONNX Runtime recommends). The model first goes through
`quant_pre_process` (shape inference and graph fusion, so batch norm is folded into the
convolutions before their weights are quantised).

Choices measured on a briefly fine-tuned EfficientNet-Lite0 (AUC 0.954 on 349 validation
radiographs, 200 calibration radiographs from the training split): keeping the final linear
layer in float matters most (MinMax: AUC change -0.049 with it quantised, -0.003 without;
quantising its input, the pooled features, costs precision that the single output cannot
average away), while also keeping the first convolution float made things worse (-0.006).
Percentile calibration (99.999th) was the best of the three methods (AUC -0.0023, 17 of 349
labels flipped; MinMax -0.0026 / 19; Entropy -0.0036 / 21), at 3-4 times MinMax's
calibration time.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from covid_cxr.errors import ModelError
from covid_cxr.fileio import atomic_path
from covid_cxr.inference.metadata import INPUT, read_metadata, set_metadata

CalibrationMethod = Literal["minmax", "percentile", "entropy"]
CALIBRATION_METHODS: tuple[CalibrationMethod, ...] = ("minmax", "percentile", "entropy")
DEFAULT_METHOD: CalibrationMethod = "percentile"


def _reader(inputs: np.ndarray, batch_size: int) -> object:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Feeds the preprocessed calibration radiographs, `batch_size` at a time."""

        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray] = iter(())
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {INPUT: batch}

        def rewind(self) -> None:
            self._batches = (inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size))

    return Reader()


def head_nodes(model: Any) -> list[str]:
    """The last Gemm/MatMul: the linear head that stays float."""
    heads = [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    return heads[-1:]


def quantize_int8(
    fp32_path: str | Path,
    out: str | Path,
    calibration: np.ndarray,
    *,
    method: CalibrationMethod = DEFAULT_METHOD,
    float_head: bool = True,
) -> Path:
    """Write the int8 model to `out`; `calibration` is (N, 1, S, S) preprocessed radiographs."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ModelError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if calibration.ndim != 4 or len(calibration) == 0:
        raise ModelError(f"calibration needs (N, 1, S, S) images, got shape {calibration.shape}")
    info, cam_head = read_metadata(fp32_path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    with tempfile.TemporaryDirectory(prefix="covid-cxr-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                quant_pre_process(str(fp32_path), str(prepared))
                excluded = head_nodes(onnx.load(str(prepared))) if float_head else []
                quantize_static(
                    str(prepared),
                    str(Path(tmp) / "int8.onnx"),
                    _reader(calibration.astype(np.float32, copy=False), batch_size=8),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=methods[method],
                    nodes_to_exclude=excluded,
                    extra_options={"CalibMaxIntermediateOutputs": 8},
                )
        except Exception as exc:
            raise ModelError(f"int8 quantisation failed: {exc}\n{log.getvalue()[-2000:]}") from exc
        proto = onnx.load(str(Path(tmp) / "int8.onnx"))
    export = dict(info.metadata.get("export", {}))
    export.update(
        precision="int8",
        calibration={"method": method, "images": len(calibration), "float_nodes": excluded},
    )
    info.metadata = {**info.metadata, "export": export}
    set_metadata(proto, info, cam_head)
    with atomic_path(out) as tmp_out:
        onnx.save(proto, str(tmp_out))
    return out
