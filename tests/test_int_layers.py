"""The integer layers of kernels/int_layers.py against their int64 reference, bit for bit.

- int_linear (torch._int_mm on the CPU): batch 1, odd K and O, K not a multiple of 8, uint8
  levels at 0 and 255, wider int16/int32 levels, with and without bias.
- int_conv2d / IntConv2d: groups, depthwise, 1x1, strides, dilation, padding, odd sizes, batch
  1, K not a multiple of 8; on the CPU through oneDNN with 8-bit digits, with narrower digits
  where 8 could round in float32, and through im2col + _int_mm where even 1-bit digits could.
- the Triton GEMM under TRITON_INTERPRET=1 (and compiled on CUDA when present), alone and as the
  GEMM of both layers; without CUDA it is still compiled for sm_90 (in a fresh process).
Wrong dtypes are refused.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ann2snn.kernels import IntConv2d, int8_gemm_triton, int_conv2d, int_linear, use_triton
from ann2snn.kernels.int_layers_reference import int_conv2d_reference, int_linear_reference

TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()


def random_levels(shape, dtype=torch.uint8, high: int = 256, generator=None) -> torch.Tensor:
    levels = torch.randint(0, high, shape, generator=generator, dtype=torch.int64)
    levels.view(-1)[:2] = torch.tensor([0, high - 1])[:levels.numel()]      # both ends of the range
    return levels.to(dtype)


def random_weight(shape, generator=None) -> torch.Tensor:
    weight = torch.randint(-128, 128, shape, generator=generator, dtype=torch.int64)
    weight.view(-1)[:2] = torch.tensor([-128, 127])[:weight.numel()]
    return weight.to(torch.int8)


def random_bias(channels: int, generator=None) -> torch.Tensor:
    return torch.randint(-2 ** 20, 2 ** 20, (channels,), generator=generator, dtype=torch.int32)


LINEAR_SHAPES = [(1, 1, 1), (1, 37, 11), (5, 8, 8), (17, 100, 3), (64, 576, 10)]


@pytest.mark.parametrize("n,k,o", LINEAR_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_int_linear_equals_reference(n: int, k: int, o: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(n * 1000 + k + o)
    levels, weight = random_levels((n, k), generator=g), random_weight((o, k), generator=g)
    bias = random_bias(o, g) if with_bias else None
    out = int_linear(levels, weight, bias)
    assert out.dtype == torch.int32 and out.shape == (n, o)
    assert torch.equal(out.long(), int_linear_reference(levels, weight, bias))


@pytest.mark.parametrize("dtype,high", [(torch.int16, 2 ** 15), (torch.int32, 2 ** 16)])
def test_wide_levels(dtype: torch.dtype, high: int) -> None:
    g = torch.Generator().manual_seed(3)
    levels, weight = random_levels((7, 19), dtype, high, g), random_weight((5, 19), g)
    assert torch.equal(int_linear(levels, weight).long(), int_linear_reference(levels, weight))
    images, kernel = random_levels((2, 3, 6, 5), dtype, high, g), random_weight((4, 3, 3, 3), g)
    assert torch.equal(int_conv2d(images, kernel, None, 1, 1).long(), int_conv2d_reference(images, kernel, None, 1, 1))


# (batch, in, out, size (h, w), kernel, stride, padding, dilation, groups)
CONV_CASES = [
    (1, 3, 8, (9, 7), 3, 1, 1, 1, 1),
    (4, 16, 16, (8, 8), 3, 1, 1, 1, 1),       # resnet20's first stage
    (2, 16, 32, (9, 9), 3, 2, 1, 1, 1),       # a downsampling block, odd size
    (2, 16, 32, (8, 8), 1, 2, 0, 1, 1),       # its 1x1 shortcut
    (3, 4, 6, (7, 10), 3, 1, 2, 2, 2),        # groups and dilation
    (2, 8, 8, (6, 6), 3, 1, 1, 1, 8),         # depthwise
    (1, 5, 3, (11, 4), (3, 2), (3, 1), (1, 0), 1, 1),   # rectangular, K = 30 not a multiple of 8
]


def conv_case(case, generator=None):
    n, cin, cout, (h, w), kernel, stride, padding, dilation, groups = case
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    levels = random_levels((n, cin, h, w), generator=generator)
    weight = random_weight((cout, cin // groups, kh, kw), generator=generator)
    return levels, weight, random_bias(cout, generator), (stride, padding, dilation, groups)


@pytest.mark.parametrize("case", CONV_CASES)
def test_int_conv2d_equals_reference(case) -> None:
    levels, weight, bias, options = conv_case(case, torch.Generator().manual_seed(len(str(case))))
    out = int_conv2d(levels, weight, bias, *options)
    expected = int_conv2d_reference(levels, weight, bias, *options)
    assert out.dtype == torch.int32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.long(), expected)
    for engine in ("auto", "im2col"):       # packed once, run on other batches
        layer = IntConv2d(weight, bias, *options, engine=engine)
        for batch in (1, 3):
            more = random_levels((batch, *levels.shape[1:]))
            assert torch.equal(layer(more).long(), int_conv2d_reference(more, weight, bias, *options))


@pytest.mark.parametrize("channels,kernel,bits", [(16, 3, 8), (64, 3, 4), (2 ** 17 + 2 ** 13, 1, None)])
def test_int_conv2d_keeps_onednn_float32_output_exact(channels: int, kernel: int, bits: int | None) -> None:
    """Levels 255 times weights of magnitude 127-128: near the largest accumulators a layer can
    have, odd, so that float32 cannot hold them past 2^24. Where (2^8 - 1) sum|w| reaches 2^24
    the digits narrow, and where even sum|w| does the im2col path takes over."""
    g = torch.Generator().manual_seed(channels)
    weight = torch.full((2, channels, kernel, kernel), -128, dtype=torch.int8)
    weight[0, 0, 0, 0] = -127                      # an odd accumulator
    weight[1] = random_weight((channels, kernel, kernel), g).clamp(min=127).to(torch.int8)
    high = 256 if bits else 4                      # the largest that keeps the accumulator in int32
    levels = torch.full((1, channels, 3, 3), high - 1, dtype=torch.uint8)
    layer = IntConv2d(weight, None, 1, kernel // 2)
    assert layer._onednn_bits == bits
    expected = int_conv2d_reference(levels, weight, None, 1, kernel // 2)
    assert bits != 4 or int(expected.abs().max()) > 2 ** 24     # where 8-bit digits would round
    assert torch.equal(layer(levels).long(), expected)


def test_the_float32_accumulator_with_its_bias_is_the_rounded_sum() -> None:
    """float_accumulator(plus_bias=True) is float32(W q + b) for biases up to 2^24 - 1 (sums past
    2^24 rounded once, as float32(A) rounds), and None for a bias float32 cannot hold."""
    g = torch.Generator().manual_seed(3)
    weight, levels = random_weight((4, 8, 3, 3), g), random_levels((2, 8, 6, 6), generator=g)
    bias = torch.tensor([2 ** 24 - 1, -(2 ** 24) + 1, 12345, -7], dtype=torch.int32)
    raw = IntConv2d(weight, bias, 1, 1).float_accumulator(levels, plus_bias=True)
    expected = int_conv2d_reference(levels, weight, bias, 1, 1)
    assert int(expected.abs().max()) > 2 ** 24
    assert torch.equal(raw, expected.to(torch.float32))
    assert IntConv2d(weight, bias + torch.tensor([1, 0, 0, 0], dtype=torch.int32), 1, 1).float_accumulator(
        levels, plus_bias=True) is None


def test_wrong_dtypes_are_refused() -> None:
    weight = random_weight((4, 3, 3, 3))
    with pytest.raises(TypeError, match="levels as"):
        int_conv2d(torch.zeros(1, 3, 5, 5), weight)
    with pytest.raises(TypeError, match="levels as"):
        int_linear(torch.zeros(2, 3, dtype=torch.int8), random_weight((4, 3)))
    with pytest.raises(TypeError, match="int8 weights"):
        IntConv2d(weight.float())
    with pytest.raises(ValueError, match="engine must be one of"):
        IntConv2d(weight, engine="fbgemm")


TRITON_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not TRITON, reason="triton is not installed")),
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA or not TRITON, reason="no CUDA device")),
]


@pytest.fixture(params=TRITON_DEVICES)
def triton_device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """The device the Triton GEMM runs on; the CPU runs it in Triton's interpreter."""
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    device = torch.device(request.param)
    assert use_triton(torch.empty(0, device=device)), "the Triton path must be the one under test"
    return device


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (17, 40, 9), (70, 33, 65)])
def test_triton_gemm_equals_reference(triton_device: torch.device, m: int, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(m + k + n)
    a, b = random_weight((m, k), g), random_weight((k, n), g)
    out = int8_gemm_triton(a.to(triton_device), b.to(triton_device)).cpu()
    assert out.dtype == torch.int32 and torch.equal(out.long(), a.long() @ b.long())


def test_triton_layers_equal_reference(triton_device: torch.device) -> None:
    g = torch.Generator().manual_seed(5)
    levels, weight, bias = random_levels((3, 20), generator=g), random_weight((6, 20), g), random_bias(6, g)
    out = int_linear(levels.to(triton_device), weight.to(triton_device), bias.to(triton_device)).cpu()
    assert torch.equal(out.long(), int_linear_reference(levels, weight, bias))
    for case in (CONV_CASES[0], CONV_CASES[4], CONV_CASES[5]):
        levels, weight, bias, options = conv_case(case, g)
        device_args = [t.to(triton_device) for t in (levels, weight, bias)]
        out = int_conv2d(*device_args, *options).cpu()
        assert torch.equal(out.long(), int_conv2d_reference(levels, weight, bias, *options))


_COMPILE_GEMM_FOR_SM90 = textwrap.dedent("""
    import os
    import torch
    os.environ["TRITON_INTERPRET"] = "1"
    from ann2snn.kernels import int8_gemm_triton
    int8_gemm_triton(torch.ones(2, 3, dtype=torch.int8), torch.ones(3, 2, dtype=torch.int8))   # interpreted
    del os.environ["TRITON_INTERPRET"]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ann2snn.kernels.int_layers import _int8_gemm_kernel

    sizes = ("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn")
    signature = {"a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": "*i32", **{name: "i32" for name in sizes},
                 "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    source = ASTSource(fn=_int8_gemm_kernel.in_mode(False), signature=signature,
                       constexprs={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert compiled.asm["cubin"]
    print("compiled")
""")


def _ptxas() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(CUDA, reason="the CUDA tests above compile and run the GEMM")
@pytest.mark.skipif(not TRITON or not _ptxas(), reason="triton's ptxas is not installed")
def test_triton_gemm_compiles_for_sm90() -> None:
    """The interpreter does not compile: build the GEMM to an H100 cubin, as a GPU run would."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_GEMM_FOR_SM90], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-4000:]
