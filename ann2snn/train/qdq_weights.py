"""Full QDQ in an exported ONNX graph: int8 weights and int32 biases behind DequantizeLinear.

    W (float, on the grid q * s)             ->  W_quantized (INT8)  -> DequantizeLinear(W_scale, 0, axis=0) -> W
    B (float, on the grid k * theta_in / n * s)  ->  B_quantized (INT32) -> DequantizeLinear(B_scale, 0, axis=0) -> B

The levels and scales come from the trained model (weight_quant.integer_tensors), so the file
holds the integers training used. A bias is int32 where its layer's input is a QDQ site (the
layers weight_quant gives a BiasFakeQuant): that is where onnxruntime's integer kernels
(QLinearConv, QGemm) expect one, with n = 1; behind average pools of n values a window, the
integer SNN's grid. The first layer, fed by the float image, keeps a float bias.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import Tensor

from ..errors import Ann2SnnError

# The layers whose weight (input 1) and bias (input 2) become integers.
_WEIGHTED_OPS = frozenset({"Conv", "Gemm"})
_DEQUANTIZE = "DequantizeLinear"


def dequantize_weights(graph: onnx.GraphProto, tensors: dict[str, tuple[Tensor, Tensor]]) -> list[str]:
    """Put every weight and bias initializer of a Conv / Gemm that `tensors` names (name -> (integer
    levels, per-output-channel scales)) behind a DequantizeLinear, in place. Returns the names rewritten."""
    initializers = {t.name: t for t in graph.initializer}
    created: list[onnx.NodeProto] = []
    rewritten = []
    for node in graph.node:
        if node.op_type not in _WEIGHTED_OPS:
            continue
        for name in node.input[1:3]:
            if name not in tensors or name not in initializers:
                continue
            levels, scale = (t.detach().cpu().numpy() for t in tensors[name])
            stored = numpy_helper.to_array(initializers[name])
            if stored.shape != levels.shape:  # e.g. a Gemm with transB = 0: axis 0 would not be the output channel
                raise Ann2SnnError(f"node {node.name} ({node.op_type}): {name} has shape {stored.shape}, "
                                   f"expected the layer's {levels.shape} (output channels first)")
            created.append(_behind_dequantize(graph, initializers, name, levels, scale.astype(np.float32)))
            rewritten.append(name)
    for dq in reversed(created):   # their inputs are initializers: first in the topological order
        graph.node.insert(0, dq)
    return rewritten


def _behind_dequantize(graph: onnx.GraphProto, initializers: dict[str, onnx.TensorProto], name: str,
                       levels: np.ndarray, scale: np.ndarray) -> onnx.NodeProto:
    """Replace the initializer `name` by `name`_quantized and a DequantizeLinear (axis 0) that outputs `name`."""
    graph.initializer.remove(initializers.pop(name))
    tensors = {f"{name}_quantized": levels, f"{name}_scale": scale,
               f"{name}_zero_point": np.zeros(scale.shape, dtype=levels.dtype)}
    for tensor_name, value in tensors.items():
        graph.initializer.append(numpy_helper.from_array(value, tensor_name))
    return helper.make_node(_DEQUANTIZE, list(tensors), [name], name=f"{name}_DequantizeLinear", axis=0)
