"""Write the adapted model: the base ONNX graph with its final linear layer replaced.

The graph ends `features -> ReduceMean -> Gemm -> Squeeze -> logit`; adapt rewrites the
Gemm's weight and bias initializers, the `covid_cxr_info` metadata (ModelInfo) and the CAM head,
so inputs, outputs, Grad-CAM and every consumer of the model stay as they were. This needs the
`onnx` package (in the base install: `covid-cxr evaluate --store-thresholds` uses it too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from covid_cxr.adaptation.head import LinearHead
from covid_cxr.errors import ModelError
from covid_cxr.fileio import atomic_path
from covid_cxr.inference.metadata import FEATURES, CamHead, set_metadata
from covid_cxr.models.info import ModelInfo


def _head_gemm(proto: Any, source: Path) -> Any:
    """The Gemm applied to the spatial mean of `features`."""
    pooled = {
        n.output[0]
        for n in proto.graph.node
        if n.op_type == "ReduceMean" and n.input[0] == FEATURES
    }
    for node in proto.graph.node:
        if node.op_type == "Gemm" and node.input[0] in pooled and len(node.input) == 3:
            return node
    raise ModelError(
        f"{source}: no `features -> ReduceMean -> Gemm` head found in the graph; "
        "adapt needs a model exported by `covid-cxr export`"
    )


def _replace(proto: Any, name: str, array: np.ndarray, source: Path) -> None:
    from onnx import numpy_helper

    for index, tensor in enumerate(proto.graph.initializer):
        if tensor.name == name:
            old = numpy_helper.to_array(tensor)
            if old.size != array.size:
                raise ModelError(
                    f"{source}: head tensor {name} has {old.size} values, not {array.size}"
                )
            new = numpy_helper.from_array(array.reshape(old.shape).astype(old.dtype), name)
            proto.graph.initializer[index].CopyFrom(new)
            return
    raise ModelError(f"{source}: head tensor {name} is not an initializer of the graph")


def write_adapted(base: Path, out: Path, head: LinearHead, info: ModelInfo) -> None:
    """Copy `base` to `out` (atomically) with `head` as its final layer and `info` as ModelInfo."""
    import onnx

    proto = onnx.load(str(base))
    gemm = _head_gemm(proto, base)
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    if attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
        raise ModelError(f"{base}: the head Gemm scales its inputs (alpha/beta); cannot rewrite it")
    weight = head.weight.astype(np.float32)
    _replace(proto, gemm.input[1], weight, base)
    _replace(proto, gemm.input[2], np.array([head.bias], np.float32), base)
    set_metadata(proto, info, CamHead(weight, float(np.float32(head.bias))))
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
