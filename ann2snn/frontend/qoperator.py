"""onnxruntime's QOperator format, rewritten into the QDQ form that the importer reads.

`quantize_static(..., quant_format=QuantFormat.QOperator)` writes integer ops (QLinearConv,
QLinearMatMul, and in the com.microsoft domain QGemm, QLinearAdd, QLinearAveragePool,
QLinearGlobalAveragePool, QLinearConcat) and runs MaxPool, Reshape, Flatten, ... directly on the
uint8 / int8 tensors between them, with QuantizeLinear / DequantizeLinear only at the edges. Each
such node is replaced by what it means, written in QDQ (ONNX-to-ONNX, before import):

    DequantizeLinear of each quantized input -> the float op -> QuantizeLinear(y_scale, y_zero_point)

An int32 bias is dequantized with scale x_scale * w_scale (QGemm: alpha * a_scale * b_scale) and
zero point 0, as the ops define it. An op that only moves values (MaxPool, Reshape, ...) is wrapped
with its input's own scale and zero point, which is exact. Every QuantizeLinear keeps the
QOperator node's name and output tensor, so a site is named and read back (ort_check) by what
onnxruntime computes in the original file. Whatever quantized tensor cannot be expressed so is
refused in one line. A Clip of the integers between QuantizeLinear and DequantizeLinear (QCDQ,
Brevitas' export of fewer bits) stays as well: the importer reads it as a narrower range.

Each op is one small function in a table (`_op`), with the bound on how far onnxruntime's own
kernel for it may round away from that meaning (`KernelError`, used by ann2snn/verify/ort_check.py). The
nodes each function writes, and the graph it writes them for, are qoperator_rewrite.py's.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UnsupportedModelError
from .qoperator_rewrite import Refused, Rewrite, op_attributes, optional_input
from .registry import GraphView, find_converter, node_problem, op_label, support_problem

MS = "com.microsoft"
PASS = "qoperator_to_qdq"


class KernelError(NamedTuple):
    """How far onnxruntime's kernel (x86 MLAS) may put the value it rounds from the op's exact value,
    in output levels and in units of u = 2^-24: per_magnitude * m + constant, where m is |f|(|x|)
    (the float op on the absolute values of its inputs and weights) over the output scale."""

    per_magnitude: float
    constant: float


# Exact int32 accumulation, then float32: float(acc), a multiplier of at most three rounded factors
# (QGemm: alpha * a_scale * b_scale / y_scale), the product; (1 + u)^5 - 1 < 6u of |v| <= m. The
# same holds for QLinearGlobalAveragePool (scale = x_scale / (y_scale * size), two roundings) and
# QLinearConcat (a table built by a float32 dequantize and quantize, two roundings).
_REQUANTIZED = KernelError(6.0, 0.0)
_EXACT = KernelError(0.0, 0.0)  # integers moved or compared, never rounded


@dataclass
class _Op:
    expand: Callable[[Rewrite, onnx.NodeProto], None]
    kernel: Callable[[onnx.NodeProto, Rewrite], KernelError]


_OPS: dict[tuple[str, str], _Op] = {}


def _op(op_type: str, domain: str = "", kernel: KernelError | Callable = _REQUANTIZED):
    """Register the decorated function as the expansion of `op_type` (in `domain`)."""
    def register(expand):
        _OPS[(domain, op_type)] = _Op(expand, kernel if callable(kernel) else (lambda node, rw, k=kernel: k))
        return expand

    return register


def _key(node: onnx.NodeProto) -> tuple[str, str]:
    return ("" if node.domain == "ai.onnx" else node.domain, node.op_type)


def _bias_scale(rw: Rewrite, scales: list[np.ndarray], base: str) -> str:
    """The int32 bias's scale, the product of `scales` in float32 (as onnxruntime multiplies them)."""
    product = np.float32(1.0)
    for scale in scales:
        product = np.asarray(product * scale.astype(np.float32).reshape(-1), dtype=np.float32)
    return rw.initializer(product.reshape(()) if product.size == 1 else product, f"{base}_bias_scale")


@_op("QLinearConv")
def _qlinear_conv(rw: Rewrite, node: onnx.NodeProto) -> None:
    x, xs, xz, w, ws, wz, ys, yz = node.input[:8]
    attributes = op_attributes(node)
    inputs = [rw.dequantize(node, x, xs, xz), rw.dequantize(node, w, ws, wz, axis=0)]
    if optional_input(node, 8):
        scale = _bias_scale(rw, [rw.constant(node, 1, "x_scale"), rw.constant(node, 4, "w_scale")], node.input[8])
        inputs.append(rw.dequantize(node, node.input[8], scale, None, axis=0))
    rw.quantize(node, rw.float_op(node, "Conv", inputs, **attributes)[0], ys, yz, node.output[0])


@_op("QLinearMatMul")
def _qlinear_matmul(rw: Rewrite, node: onnx.NodeProto) -> None:
    a, as_, az, b, bs, bz, ys, yz = node.input[:8]
    if rw.constant(node, 1, "a_scale").size != 1:
        raise Refused("a per-row a_scale is not supported")
    if rw.constant(node, 4, "b_scale").size != 1 and rw.constant(node, 3, "b").ndim != 2:
        raise Refused("a per-column b_scale needs a 2-D b")
    inputs = [rw.dequantize(node, a, as_, az), rw.dequantize(node, b, bs, bz, axis=1)]
    rw.quantize(node, rw.float_op(node, "MatMul", inputs)[0], ys, yz, node.output[0])


@_op("QGemm", MS)
def _qgemm(rw: Rewrite, node: onnx.NodeProto) -> None:
    a, as_, az, b, bs, bz = node.input[:6]
    attributes = op_attributes(node)
    alpha = float(attributes.get("alpha", 1.0))
    inputs = [rw.dequantize(node, a, as_, az),
              rw.dequantize(node, b, bs, bz, axis=0 if attributes.get("transB", 0) else 1)]
    if optional_input(node, 6):
        # C is quantized with scale alpha * a_scale * b_scale: the kernel adds it to A B before scaling
        c = rw.constant(node, 6, "C")
        scale = _bias_scale(rw, [np.float32(alpha), rw.constant(node, 1, "a_scale"), rw.constant(node, 4, "b_scale")],
                            node.input[6])
        if numpy_helper.to_array(rw.constants[scale]).size > 1 and (c.ndim == 0 or c.shape[-1] == 1):
            raise Refused("a per-column b_scale with a C that does not vary along the columns")
        inputs.append(rw.dequantize(node, node.input[6], scale, None, axis=max(c.ndim - 1, 0)))
    outputs = rw.float_op(node, "Gemm", inputs, **attributes)
    if optional_input(node, 7):
        rw.quantize(node, outputs[0], node.input[7], optional_input(node, 8), node.output[0])
    else:   # no y_scale: the float output itself
        name = rw.node_name(node.name or node.output[0])
        rw.nodes.append(helper.make_node("Identity", outputs, [node.output[0]], name))


def _add_kernel(node: onnx.NodeProto, rw: Rewrite) -> KernelError:
    """MlasQLinearAdd (x86): C = A rA + (B rB + F) by two fused multiply-adds on the raw integers A
    and B, rA = fl(A_scale / C_scale), F = fl(zC - fl(fl(rA zA) + fl(rB zB))). With a, b the exact
    ratios and P = |A| a + |B| b + |zA| a + |zB| b + |zC|, which bounds every intermediate: rA and rB
    together err by at most u P (on A - zA and B - zB), the products rA zA and rB zB by u P, and each
    of the sum, F, the two fmas (one more rounding when an operand is broadcast) by u P (1 + u)^k:
    within 8 u P of the exact value. And |A| a <= |A - zA| a + |zA| a: P <= m + 2 |zA| a + 2 |zB| b + |zC|."""
    scale_c = rw.scalar(node, 6, "C_scale")
    ratios = [rw.scalar(node, 1, "A_scale") / scale_c, rw.scalar(node, 4, "B_scale") / scale_c]
    zeros = [abs(rw.scalar(node, k, "zero point")) if optional_input(node, k) else 0.0 for k in (2, 5, 7)]
    return KernelError(8.0, 8.0 * (2 * zeros[0] * ratios[0] + 2 * zeros[1] * ratios[1] + zeros[2]))


@_op("QLinearAdd", MS, kernel=_add_kernel)
def _qlinear_add(rw: Rewrite, node: onnx.NodeProto) -> None:
    inputs = [rw.dequantize(node, node.input[0], node.input[1], optional_input(node, 2)),
              rw.dequantize(node, node.input[3], node.input[4], optional_input(node, 5))]
    rw.quantize(node, rw.float_op(node, "Add", inputs)[0], node.input[6], optional_input(node, 7), node.output[0])


def _average_pool_kernel(node: onnx.NodeProto, rw: Rewrite) -> KernelError:
    """QLinearAveragePool dequantizes in float32 (one rounding per value), sums the k values of a
    window (k - 1 roundings of at most u sum |x|), divides by the count, then y / y_scale and
    + y_zero_point: within (k + 3) u m + u |zY| of the exact value (k + 4 and 2 |zY| leave room for
    second order terms). A window over the whole image is QLinearGlobalAveragePool's kernel, within that."""
    kernel = int(np.prod(op_attributes(node).get("kernel_shape", [1])))
    zero = abs(rw.scalar(node, 4, "y_zero_point")) if optional_input(node, 4) else 0.0
    return KernelError(kernel + 4.0, 2 * zero)


@_op("QLinearAveragePool", MS, kernel=_average_pool_kernel)
def _qlinear_average_pool(rw: Rewrite, node: onnx.NodeProto) -> None:
    x = rw.dequantize(node, node.input[0], node.input[1], optional_input(node, 2))
    rw.quantize(node, rw.float_op(node, "AveragePool", [x], **op_attributes(node))[0], node.input[3],
                optional_input(node, 4), node.output[0])


@_op("QLinearGlobalAveragePool", MS)
def _qlinear_global_average_pool(rw: Rewrite, node: onnx.NodeProto) -> None:
    op_attributes(node)
    x = rw.dequantize(node, node.input[0], node.input[1], node.input[2])
    rw.quantize(node, rw.float_op(node, "GlobalAveragePool", [x])[0], node.input[3], node.input[4], node.output[0])


@_op("QLinearConcat", MS)
def _qlinear_concat(rw: Rewrite, node: onnx.NodeProto) -> None:
    triples = node.input[2:]
    if not triples or len(triples) % 3:
        raise Refused(f"{len(triples)} inputs after Y_scale and Y_zero_point; (tensor, scale, zero point) triples "
                       "are needed")
    inputs = [rw.dequantize(node, *triples[k:k + 3]) for k in range(0, len(triples), 3)]
    rw.quantize(node, rw.float_op(node, "Concat", inputs, **op_attributes(node))[0], node.input[0], node.input[1],
                node.output[0])


# op type -> the inputs of an op on a quantized tensor that are quantized (the rest: shapes, indices)
_STRUCTURAL: dict[str, tuple[int, ...]] = {}


def _moves_values(op_type: str, quantized_inputs: tuple[int, ...] = (0,)) -> None:
    """Register `op_type` on a quantized tensor as DequantizeLinear -> op -> QuantizeLinear with the
    input's own scale and zero point: exact, since it only moves (or compares) values."""
    def expand(rw: Rewrite, node: onnx.NodeProto) -> None:
        scale, zero = rw.quantized[node.input[0]]
        if op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
            raise Refused("the Indices output is not supported")
        inputs = list(node.input)
        for k in quantized_inputs:
            if k < len(inputs) and inputs[k]:
                inputs[k] = rw.dequantize(node, inputs[k], scale, zero)
        if (op_type == "Pad" and op_attributes(node).get("mode", "constant") == "constant"
                and not optional_input(node, 2)):
            # the integer 0 it pads with is the value -zero_point * scale
            dtype = helper.tensor_dtype_to_np_dtype(rw.constants[zero].data_type) if zero else np.uint8
            pad = rw.initializer(np.zeros((), dtype), f"{node.output[0]}_pad_value")
            inputs = inputs[:2] + [rw.dequantize(node, pad, scale, zero)] + inputs[3:]
        outputs = [o for o in node.output if o]
        floats = rw.float_op(node, op_type, inputs, outputs=len(outputs), **op_attributes(node))
        for value, output in zip(floats, outputs):
            rw.quantize(node, value, scale, zero, output)

    _op(op_type, kernel=_EXACT)(expand)
    _STRUCTURAL[op_type] = quantized_inputs


for _name in ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Slice", "Gather",
              "Split"):
    _moves_values(_name)
_moves_values("Pad", (0, 2))

# QuantizeLinear / DequantizeLinear stay: the importer reads them.
_KEPT = frozenset({("", "QuantizeLinear"), ("", "DequantizeLinear")})
_DYNAMIC = "dynamic quantization (onnxruntime's quantize_dynamic) computes its scales from the data at run time; " \
           "an SNN needs fixed scales: quantize with quantize_static"


def _is_qoperator(node: onnx.NodeProto) -> bool:
    return _key(node) in _OPS and not _is_structural(node)


def _is_structural(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in _STRUCTURAL


def _supported_list() -> str:
    qoperator = sorted(f"{d}::{o}" if d else o for d, o in _OPS if d or o not in _STRUCTURAL)
    return f"{', '.join(qoperator)}; on quantized tensors also {', '.join(sorted(_STRUCTURAL))}"


def _plan(model: onnx.ModelProto) -> tuple[list[tuple[int, onnx.NodeProto, list[onnx.NodeProto] | str]], Rewrite]:
    """Every node the rewrite concerns: its index, the node, and its replacement or why there is none."""
    rw = Rewrite(model.graph, _opset(model))
    plan = []
    for index, node in enumerate(model.graph.node):
        key = _key(node)
        if node.op_type == "DynamicQuantizeLinear" and node.domain in ("", "ai.onnx"):
            plan.append((index, node, _DYNAMIC))
            continue
        if key == ("", "QuantizeLinear") and len(node.input) > 1:
            rw.quantized[node.output[0]] = (node.input[1], optional_input(node, 2))
            continue
        if key == ("", "Clip") and node.input[0] in rw.quantized:   # QCDQ: the importer reads it as fewer levels
            rw.quantized[node.output[0]] = rw.quantized[node.input[0]]
            continue
        reads = [k for k, name in enumerate(node.input) if name in rw.quantized]
        if key in _KEPT or not (_is_qoperator(node) or reads):
            continue
        if key not in _OPS or (_is_structural(node) and (0 not in reads
                                                          or not set(reads) <= set(_STRUCTURAL[node.op_type]))):
            why = f"{op_label(node)} on the quantized (integer) tensor {node.input[reads[0]]!r} is not supported"
            plan.append((index, node, f"{why}; onnxruntime's QOperator ops that convert: {_supported_list()}"))
            continue
        rw.nodes = []
        rw.node_names.discard(node.name)  # it is replaced: its QuantizeLinear takes its name
        try:
            _OPS[key].expand(rw, node)
            plan.append((index, node, rw.nodes))
        except Refused as why:
            plan.append((index, node, str(why)))
    return plan, rw


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def expand_qoperator(model: onnx.ModelProto, where: str) -> tuple[onnx.ModelProto, dict | None]:
    """`model` with every QOperator node (and every op on a quantized tensor) replaced by its QDQ
    meaning, and the report entry that records it (None when the model has none; then `model` is
    returned as it is). A node that cannot be expressed is refused: UnsupportedModelError naming
    file, node, op and opset."""
    plan, rw = _plan(model)
    if not plan:
        return model, None
    replaced = {}
    for index, node, replacement in plan:
        if isinstance(replacement, str):
            raise UnsupportedModelError(node_problem(where, node, _opset(model), replacement))
        replaced[index] = replacement
    expanded = onnx.ModelProto()
    expanded.CopyFrom(model)
    del expanded.graph.node[:]
    for index, node in enumerate(model.graph.node):
        expanded.graph.node.extend(replaced.get(index, [node]))
    expanded.graph.initializer.extend(rw.initializers)
    counts = Counter(op_label(node) for _, node, _ in plan)
    return expanded, {"pass": PASS, "nodes": dict(sorted(counts.items()))}


def qoperator_support(model: onnx.ModelProto) -> dict[int, str | None]:
    """What `convert` makes of each node the rewrite concerns (node index -> None when it converts,
    else why not): the rewrite's own refusal, or that of a converter of what it expands to. For
    `inspect`, so that the two agree."""
    plan, rw = _plan(model)
    if not plan:
        return {}
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    graph.initializer.extend(rw.initializers)
    graph.node.extend(n for _, _, r in plan if not isinstance(r, str) for n in r)  # for the consumers
    opset = _opset(model)
    view = GraphView(graph, opset)
    support = {}
    for index, node, replacement in plan:
        if isinstance(replacement, str):
            support[index] = replacement
            continue
        support[index] = None
        for new in replacement:
            if find_converter(new.op_type, opset, new.domain) is None:
                support[index] = f"expands to {new.op_type}, which is not supported"
            else:
                support[index] = support_problem(new, view)
            if support[index] is not None:
                break
    return support


def kernel_errors(model: onnx.ModelProto) -> dict[str, KernelError]:
    """Output tensor of each QOperator node (and op on a quantized tensor) -> the error bound of
    onnxruntime's kernel for it (ann2snn/verify/ort_check.py)."""
    plan, rw = _plan(model)
    errors = {}
    for _, node, replacement in plan:
        if not isinstance(replacement, str):
            for output in node.output:
                errors[output] = _OPS[_key(node)].kernel(node, rw)
    return errors
