"""Full QDQ in an exported ONNX graph: int8 weights and int32 biases behind DequantizeLinear.

    W (float, on the grid q * s)   ->  W_quantized (INT8) -> DequantizeLinear(W_scale, 0, axis=0) -> W
    B (float)                      ->  B_quantized (INT32) -> DequantizeLinear(s_in * W_scale, 0, axis=0) -> B

The bias becomes int32 only where the layer's input is a QDQ site with one scale s_in (reached
through ops that keep the scale: MaxPool, Flatten, Reshape): that is where onnxruntime's integer
kernels (QLinearConv, QGemm) expect one, B_int = round(B / (s_in * s_c)). The first layer, fed
by the float image, keeps its float bias.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import Tensor

from ..errors import Ann2SnnError

# The layers whose weight becomes int8, and the ops between a DequantizeLinear and a layer that
# leave the dequantized values on the same grid (so the layer's input scale is the DQ's scale).
_WEIGHTED_OPS = frozenset({"Conv", "Gemm"})
_SCALE_KEEPING_OPS = frozenset({"MaxPool", "Flatten", "Reshape"})
_DEQUANTIZE = "DequantizeLinear"
_CONSTANT = "Constant"


def dequantize_weights(graph: onnx.GraphProto, weights: dict[str, tuple[Tensor, Tensor]]) -> list[str]:
    """Rewrite every Conv / Gemm whose weight initializer is named in `weights` (name -> (int8 levels,
    per-output-channel scales)) into full QDQ, in place. Returns the rewritten weights' names."""
    initializers = {t.name: t for t in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    created: list[onnx.NodeProto] = []
    rewritten = []
    for node in graph.node:
        if node.op_type not in _WEIGHTED_OPS or len(node.input) < 2 or node.input[1] not in weights:
            continue
        name = node.input[1]
        levels, scale = (t.detach().cpu().numpy() for t in weights[name])
        stored = numpy_helper.to_array(initializers[name])
        if stored.shape != levels.shape:  # e.g. a Gemm with transB = 0: axis 0 would not be the output channel
            raise Ann2SnnError(f"node {node.name} ({node.op_type}): weight {name} has shape {stored.shape}, "
                               f"expected the layer's {levels.shape} (output channels first)")
        scale = scale.astype(np.float32)
        created.append(_behind_dequantize(graph, initializers, name, levels.astype(np.int8), scale))
        input_scale = _input_scale(node.input[0], producers, initializers)
        if input_scale is not None and len(node.input) > 2 and node.input[2] in initializers:
            bias_scale = (input_scale * scale).astype(np.float32)   # float32, as onnxruntime multiplies them
            bias = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
            info = np.iinfo(np.int32)
            bias_levels = np.clip(np.round(bias / bias_scale), info.min, info.max).astype(np.int32)
            created.append(_behind_dequantize(graph, initializers, node.input[2], bias_levels, bias_scale))
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


def _input_scale(value: str, producers: dict[str, onnx.NodeProto],
                 initializers: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The one (per-tensor) scale of the DequantizeLinear that `value` comes from through scale-keeping
    ops; None for a float input or a per-channel scale."""
    node = producers.get(value)
    while node is not None and node.op_type in _SCALE_KEEPING_OPS:
        node = producers.get(node.input[0])
    if node is None or node.op_type != _DEQUANTIZE:
        return None
    scale = _constant(node.input[1], producers, initializers)
    if scale is None:
        return None
    return scale.astype(np.float32).reshape(()) if scale.size == 1 else None


def _constant(value: str, producers: dict[str, onnx.NodeProto],
              initializers: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's tensor (torch.onnx writes QDQ scales as Constants)."""
    if value in initializers:
        return numpy_helper.to_array(initializers[value])
    node = producers.get(value)
    if node is None or node.op_type != _CONSTANT:
        return None
    tensor = next((a.t for a in node.attribute if a.name == "value"), None)
    return None if tensor is None else numpy_helper.to_array(tensor)
