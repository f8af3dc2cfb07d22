"""Fused Triton kernels of ann2snn, each beside its pure-PyTorch reference, and the neuron in C.

- `fire_fused`: the evaluator's neuron (offset, cap, MSB-first firing, q * theta, spike code and
  spike counts) in one pass; reference `fire_fused_reference`.
- `quant_act_fused`: the training activation a(z) with its spike count, forward and backward;
  reference `quant_act_fused_reference`.
- `int_linear` / `int_conv2d` / `IntConv2d`: int8 weights x unsigned levels with exact int32
  accumulation (torch._int_mm, oneDNN's u8 x s8 convolution, or `int8_gemm_triton`); reference
  `int_linear_reference` / `int_conv2d_reference` (kernels/int_layers_reference.py).
- `levels_fused`: int32 accumulators to levels by per-channel integer thresholds, with the spikes
  per sample, in one pass (C kernels/int_levels_cpu.c on the CPU, Triton on CUDA); reference
  `levels_from_thresholds` (kernels/int_levels_reference.py). `IntegerLevels` is that neuron with
  its thresholds prepared once; `IntegerLayer` a whole step of the integer SNN, int layer and neuron.
- `requantize_levels`: a neuron site's terms (one accumulator, or a residual sum's) to its levels
  as the QDQ graph computes them, with the spikes per sample, in one pass (C
  kernels/requantize_cpu.c on the CPU); reference `requantize_levels_reference`. `Requantizer` is
  that site with its constants prepared once.
- `pack_spikes` / `unpack_spikes`: the spike code (uint8 for T <= 8, uint16 up to T = 16) <-> binary
  planes [T, ...].

Each public function runs its kernel where `use_triton(tensor)` is true (a CUDA tensor with triton
installed, or any tensor under TRITON_INTERPRET=1) and its reference otherwise; `fire_fused` runs
float32 CPU potentials through `fire_fused_native`, the same neuron in C (kernels/neuron_cpu.c,
compiled at first use by kernels/native.py).
"""
from .dispatch import use_triton
from .int_layers import IntConv2d, int8_gemm, int8_gemm_triton, int_conv2d, int_linear
from .int_layers_reference import int_conv2d_reference, int_linear_reference
from .int_layer_levels import IntegerLayer
from .int_levels import IntegerLevels, IntLevels, levels_fused
from .int_levels_reference import levels_from_thresholds
from .native import fire_fused_native
from .requantize import Requantization, Requantizer, requantize_levels
from .requantize_reference import requantize_levels_reference
from .neuron import NeuronOutput, fire_fused, fire_fused_triton
from ..levels import pack_spikes, unpack_spikes
from .neuron_reference import fire_fused_reference
from .quant_act import quant_act_fused, quant_act_fused_triton
from .quant_act_reference import quant_act_fused_reference

__all__ = [
    "IntConv2d",
    "IntLevels",
    "IntegerLayer",
    "IntegerLevels",
    "NeuronOutput",
    "Requantization",
    "Requantizer",
    "fire_fused",
    "fire_fused_native",
    "fire_fused_reference",
    "fire_fused_triton",
    "int8_gemm",
    "int8_gemm_triton",
    "int_conv2d",
    "int_conv2d_reference",
    "int_linear",
    "int_linear_reference",
    "levels_fused",
    "levels_from_thresholds",
    "pack_spikes",
    "quant_act_fused",
    "quant_act_fused_reference",
    "quant_act_fused_triton",
    "requantize_levels",
    "requantize_levels_reference",
    "unpack_spikes",
    "use_triton",
]
