"""Integer thresholds (ann2snn.runtime.integer) against onnxruntime's own requantization.

A 1x1 Conv over three input channels with int8 weights (1, 127, -128) in every output channel
reaches any accumulator A in [-32640, 32640] + bias: each test feeds, for every channel and every
threshold t in that range, the inputs whose accumulator is t and t - 1, runs onnxruntime, and
checks that counting thresholds gives its output level for level, in every channel. Two files:
- QLinearConv (onnxruntime's integer kernel in both sessions), uint8 and int8 in and out;
- DequantizeLinear -> Conv -> QuantizeLinear, which the default session fuses into the integer
  kernel (`requantize_qlinear`) and ann2snn's onnxruntime_session runs as written
  (`requantize_qdq`; power-of-two input and weight scales, where that model is exact).
A threshold moved by one, and a multiplier that is not positive, fail.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper, save

from ann2snn.errors import Ann2SnnError
from ann2snn.frontend.reader import onnxruntime_session
from ann2snn.runtime.integer import (integer_thresholds, levels_from_thresholds, qlinear_multiplier,
                                     requantize_qdq, requantize_qlinear)

TAPS = torch.tensor([1, 127, -128])          # the weights of each output channel over the 3 inputs
REACH = 32640                                # every A - bias in [-REACH, REACH] has inputs in [0, 255]
BIAS = torch.tensor([17, -250, 1001], dtype=torch.int32)
Y_SCALE, Y_ZERO = 0.05, 128
# a QDQ output scale where the fused kernel's A * (S / s_y) and the graph's (A * S) / s_y round
# a few reachable boundaries differently (found by scanning scales; the test asserts it)
QDQ_Y_SCALE = 0.07336927205324173


def inputs_for(accumulator: torch.Tensor, bias: int) -> torch.Tensor:
    """uint8 (q0, q1, q2) with q0 + 127 q1 - 128 q2 + bias = accumulator, per value [n] -> [n, 3]."""
    d = accumulator.long() - bias
    assert bool((d.abs() <= REACH).all())
    q2 = torch.where(d < 0, torch.div(-d + 127, 128, rounding_mode="floor"), 0)
    rest = d + 128 * q2
    q1 = torch.clamp(torch.div(rest, 127, rounding_mode="floor"), max=255)
    q0 = rest - 127 * q1
    q = torch.stack([q0, q1, q2], 1)
    assert bool(((q >= 0) & (q <= 255)).all()) and torch.equal(q @ TAPS + bias, accumulator.long())
    return q.to(torch.uint8)


def boundary_inputs(thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [1, 3, 1, n] uint8 whose accumulators hit every reachable t and t - 1 of every channel, and
    those accumulators [1, C, 1, n]."""
    rows = []
    for c in range(thresholds.shape[0]):
        t = thresholds[c]
        t = t[(t - 1 - BIAS[c] >= -REACH) & (t - BIAS[c] <= REACH)]
        rows.append(inputs_for(torch.cat([t, t - 1]), int(BIAS[c])))
    q = torch.cat(rows)
    accumulators = (q.long() @ TAPS)[None, :] + BIAS.long()[:, None]     # [C, n]
    return q.t()[None, :, None, :].contiguous(), accumulators[None, :, None, :]


def _weight() -> np.ndarray:
    return np.tile(TAPS.numpy().astype(np.int8)[None, :, None, None], (len(BIAS), 1, 1, 1))


def _save(tmp_path: Path, nodes, initializers, name: str, signed: bool = False) -> Path:
    kind = TensorProto.INT8 if signed else TensorProto.UINT8
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", kind, None)],
                              [helper.make_tensor_value_info("y", kind, None)], initializers)
    path = tmp_path / f"{name}.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _scalars(signed: bool = False, **values) -> list:
    out = []
    for name, value in values.items():
        kind = (np.int8 if signed else np.uint8) if name.endswith("zero") else np.float32
        out.append(numpy_helper.from_array(np.asarray(value, dtype=kind), name))
    return out


def qlinear_conv_file(tmp_path: Path, x_scale: float, w_scale: np.ndarray, y_scale: float = Y_SCALE,
                      signed: bool = False) -> Path:
    """A QLinearConv file: uint8 in and out (zero points 0 and Y_ZERO), or int8 (-128 and 0)."""
    node = helper.make_node("QLinearConv", ["x", "x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale",
                                            "y_zero", "b"], ["y"])
    zeros = dict(x_zero=-128, y_zero=0) if signed else dict(x_zero=0, y_zero=Y_ZERO)
    initializers = _scalars(signed, x_scale=x_scale, y_scale=y_scale, **zeros) + [
        numpy_helper.from_array(_weight(), "w"), numpy_helper.from_array(w_scale.astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(len(BIAS), np.int8), "w_zero"),
        numpy_helper.from_array(BIAS.numpy(), "b")]
    return _save(tmp_path, [node], initializers, "qlinearconv", signed)


def qdq_conv_file(tmp_path: Path, x_scale: float, w_scale: np.ndarray, y_scale: float = Y_SCALE) -> Path:
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zero"], ["xf"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wf"], axis=0),
        helper.make_node("DequantizeLinear", ["b", "b_scale", "b_zero"], ["bf"], axis=0),
        helper.make_node("Conv", ["xf", "wf", "bf"], ["z"]),
        helper.make_node("QuantizeLinear", ["z", "y_scale", "y_zero"], ["y"]),
    ]
    initializers = _scalars(x_scale=x_scale, x_zero=0, y_scale=y_scale, y_zero=Y_ZERO) + [
        numpy_helper.from_array(_weight(), "w"), numpy_helper.from_array(w_scale.astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(len(BIAS), np.int8), "w_zero"),
        numpy_helper.from_array(BIAS.numpy(), "b"),
        numpy_helper.from_array((np.float32(x_scale) * w_scale.astype(np.float32)).astype(np.float32), "b_scale"),
        numpy_helper.from_array(np.zeros(len(BIAS), np.int32), "b_zero")]
    return _save(tmp_path, nodes, initializers, "qdqconv")


def default_session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(session: onnxruntime.InferenceSession, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0].astype(np.int64))


def thresholds_of(requantize) -> torch.Tensor:
    return integer_thresholds(requantize, len(BIAS), 0, 255)


def qlinear_thresholds(x_scale: float, w_scale: np.ndarray, y_scale: float = Y_SCALE) -> torch.Tensor:
    multiplier = qlinear_multiplier(x_scale, w_scale, y_scale)
    return thresholds_of(lambda a: requantize_qlinear(a, multiplier, Y_ZERO, 0, 255))


def qdq_thresholds(x_scale: float, w_scale: np.ndarray, y_scale: float) -> torch.Tensor:
    product = torch.tensor(np.float32(x_scale) * w_scale.astype(np.float32))
    return thresholds_of(lambda a: requantize_qdq(a, product, y_scale, Y_ZERO, 0, 255))


def levels_match(thresholds: torch.Tensor, session: onnxruntime.InferenceSession,
                 boundaries: torch.Tensor | None = None) -> bool:
    """Whether counting `thresholds` gives the session's levels on the boundaries (t, t - 1) of
    `boundaries` (default: the thresholds themselves)."""
    x, accumulators = boundary_inputs(thresholds if boundaries is None else boundaries)
    assert x.shape[-1] > 3 * 200     # most levels of every channel are checked on both sides
    return torch.equal(levels_from_thresholds(accumulators, thresholds, 0), run(session, x))


QLINEAR_W = np.array([0.0131, 0.0247, 0.0519])          # arbitrary: the multiplier is rounded
POWER_OF_TWO_W = np.array([2.0 ** -7, 2.0 ** -6, 2.0 ** -5])


@pytest.mark.parametrize("session_of", [default_session, onnxruntime_session], ids=["default", "as_written"])
def test_qlinear_conv_thresholds_reproduce_onnxruntime(tmp_path: Path, session_of) -> None:
    thresholds = qlinear_thresholds(0.0173, QLINEAR_W)
    assert levels_match(thresholds, session_of(qlinear_conv_file(tmp_path, 0.0173, QLINEAR_W)))


def test_qdq_conv_thresholds_reproduce_both_sessions(tmp_path: Path) -> None:
    path = qdq_conv_file(tmp_path, 2.0 ** -6, POWER_OF_TWO_W, QDQ_Y_SCALE)
    fused = qlinear_thresholds(2.0 ** -6, POWER_OF_TWO_W, QDQ_Y_SCALE)
    as_written = qdq_thresholds(2.0 ** -6, POWER_OF_TWO_W, QDQ_Y_SCALE)
    assert bool((fused != as_written).any())
    both = torch.cat([fused, as_written], 1).sort(1).values   # every boundary of either model
    fused_session, as_written_session = default_session(path), onnxruntime_session(path)
    assert levels_match(fused, fused_session, both) and levels_match(as_written, as_written_session, both)
    # each session's rounding is told apart from the other's there
    assert not levels_match(as_written, fused_session, both)
    assert not levels_match(fused, as_written_session, both)


def test_signed_qlinear_conv_thresholds_reproduce_onnxruntime(tmp_path: Path) -> None:
    """int8 in and out: input zero point -128 (the same accumulators), levels in [-128, 127]."""
    multiplier = qlinear_multiplier(0.0173, QLINEAR_W, Y_SCALE)
    thresholds = integer_thresholds(lambda a: requantize_qlinear(a, multiplier, 0, -128, 127), len(BIAS), -128, 127)
    x, accumulators = boundary_inputs(thresholds)
    session = default_session(qlinear_conv_file(tmp_path, 0.0173, QLINEAR_W, signed=True))
    signed_x = (x.to(torch.int16) - 128).to(torch.int8)
    assert torch.equal(levels_from_thresholds(accumulators, thresholds, -128), run(session, signed_x))
    assert not torch.equal(levels_from_thresholds(accumulators, thresholds, -127), run(session, signed_x))


@pytest.mark.parametrize("shift", [1, -1])
def test_a_threshold_moved_by_one_fails(tmp_path: Path, shift: int) -> None:
    thresholds = qlinear_thresholds(0.0173, QLINEAR_W)
    session = default_session(qlinear_conv_file(tmp_path, 0.0173, QLINEAR_W))
    moved = thresholds.clone()
    moved[1, 100] += shift
    assert levels_match(thresholds, session, thresholds)
    assert not levels_match(moved, session, thresholds)


def test_thresholds_equal_the_requantization_everywhere() -> None:
    multiplier = qlinear_multiplier(0.0173, QLINEAR_W, Y_SCALE)
    thresholds = qlinear_thresholds(0.0173, QLINEAR_W)
    accumulators = torch.arange(-40000, 40000).expand(1, 3, 80000)[..., None]
    direct = requantize_qlinear(accumulators[0], multiplier, Y_ZERO, 0, 255)[None]
    assert torch.equal(levels_from_thresholds(accumulators, thresholds, 0), direct)
    assert bool((thresholds[:, 1:] > thresholds[:, :-1]).all())


@pytest.mark.parametrize("layout", ["linear", "nchw", "channels_last"])
def test_levels_from_thresholds_in_every_layout(layout: str) -> None:
    multiplier = qlinear_multiplier(0.0173, QLINEAR_W, Y_SCALE)
    thresholds = qlinear_thresholds(0.0173, QLINEAR_W)
    shape = (50, 3) if layout == "linear" else (4, 3, 5, 6)
    accumulators = torch.randint(-40000, 40000, shape, dtype=torch.int32)
    if layout == "channels_last":
        accumulators = accumulators.contiguous(memory_format=torch.channels_last)
    direct = requantize_qlinear(accumulators.movedim(1, 0), multiplier, Y_ZERO, 0, 255).movedim(0, 1)
    assert torch.equal(levels_from_thresholds(accumulators, thresholds, 0), direct)


def test_unreachable_levels_and_the_int32_ends() -> None:
    tiny = torch.tensor([1e-12])        # no int32 accumulator leaves level zp
    thresholds = integer_thresholds(lambda a: requantize_qlinear(a, tiny, 5, 0, 9), 1, 0, 9)
    assert thresholds[0, :5].eq(-(2 ** 31)).all() and thresholds[0, 5:].eq(2 ** 31).all()


@pytest.mark.parametrize("multiplier", [-0.01, 0.0, float("nan"), float("inf")])
def test_a_scale_that_is_not_positive_is_refused(multiplier: float) -> None:
    m = torch.tensor([0.01, multiplier])
    with pytest.raises(Ann2SnnError, match=r"multiplier must be finite and > 0"):
        integer_thresholds(lambda a: requantize_qlinear(a, m, 128, 0, 255), 2, 0, 255)
    with pytest.raises(Ann2SnnError, match=r"output scale must be finite and > 0"):
        integer_thresholds(lambda a: requantize_qdq(a, torch.tensor([0.01, 0.02]), multiplier, 128, 0, 255), 2, 0, 255)


def test_a_requantization_that_is_not_monotone_is_refused() -> None:
    m = torch.tensor([0.01])
    with pytest.raises(Ann2SnnError, match="not monotone"):
        integer_thresholds(lambda a: 255 - requantize_qlinear(a, m, 128, 0, 255), 1, 0, 255)
