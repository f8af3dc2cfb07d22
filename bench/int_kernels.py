"""Throughput of the integer layers (kernels/int_layers.py) against float32 torch, in one run.

Every Conv2d and Linear of resnet20 at its own input shape, batch 64, torch.set_num_threads(2):
- fp32: F.conv2d / F.linear on float32, NCHW and channels_last;
- int: int8 weights x uint8 levels -> exact int32 accumulator, IntConv2d (oneDNN u8 x s8 on the
  CPU) and IntConv2d(engine="im2col") (im2col + torch._int_mm), int_linear (torch._int_mm);
- int + thresholds: the int layer followed by levels_from_thresholds (ann2snn.runtime.integer)
  with 2^T - 1 thresholds per channel, the integer-only neuron of the time-folded evaluator;
- int + fused levels: the int layer followed by levels_fused (ann2snn.kernels: the same levels and
  the spikes per sample in one pass of a C kernel, kernels/int_levels_cpu.c);
- int + requantize: the int layer followed by requantize_qlinear, onnxruntime's float32
  requantization of the accumulator, which gives the same levels elementwise;
- int step: the whole per-layer step as the integer SNN calls it, IntegerLayer (ann2snn.kernels:
  layer and levels with the spikes per sample, bias folded into the thresholds, oneDNN's float32
  output read by the C levels pass as it is), and its two parts: "int step: layer" (the raw
  accumulator alone) and "int step: levels" (IntegerLevels on that accumulator, computed beforehand);
- int step, expression: IntegerLayer with its requantization given (kernels/requantize.py), which
  the integer SNN runs on the CPU: the C pass evaluates the QDQ expression instead of counting
  thresholds.
Each layer is timed in --repeats interleaved rounds (fastest and median); a network's time is
the sum over its layers, so the ratios say how fast the integer SNN's layers can be against the
fp32 ANN's (the best of NCHW and channels_last), before the rest of the network (adds, pooling,
the neuron's spike code).

    python bench/int_kernels.py [--batch-size 64] [--threads 2] [-T 4] [--repeats 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ann2snn import models
from ann2snn.kernels import (IntConv2d, IntegerLayer, IntegerLevels, Requantization, int8_gemm, int_linear,
                             levels_fused)
from ann2snn.kernels.int_layers import SHIFT, shifted
from ann2snn.runtime.integer import levels_from_thresholds, requantize_qlinear


def layer_inputs(model: nn.Module, batch: int) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """Each Conv2d / Linear of the model with the shape of its input at this batch size."""
    seen: list[tuple[nn.Module, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append((m, tuple(args[0].shape))))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(batch, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    return seen


def layer_seconds(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """(fastest, median) time of each variant, timed in interleaved rounds so that load from other
    processes falls on all of them alike; on a shared machine the fastest is the less disturbed."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats + 2):          # two warm-up rounds
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: (min(values), statistics.median(values)) for name, values in times.items()}


def layer_variants(layer: nn.Module, shape: tuple[int, ...], timesteps: int) -> dict[str, Callable[[], object]]:
    """The float and integer versions of one layer on inputs of `shape`, ready to time."""
    generator = torch.Generator().manual_seed(0)
    top = 2 ** timesteps - 1
    levels = torch.randint(0, top + 1, shape, generator=generator, dtype=torch.uint8)
    x = levels.float()
    out_channels = layer.weight.shape[0]
    weight = torch.randint(-128, 128, layer.weight.shape, generator=generator, dtype=torch.int8)
    bias = torch.randint(-1000, 1000, (out_channels,), generator=generator, dtype=torch.int32)
    w, b = weight.float(), bias.float()
    thresholds = torch.sort(torch.randint(-20000, 20000, (out_channels, top), generator=generator), 1).values
    multiplier = torch.rand(out_channels, generator=generator) * 1e-3 + 1e-4
    requantize = (multiplier, Requantization(torch.ones(1), 0, top))

    def requantized(accumulator: torch.Tensor) -> torch.Tensor:
        return requantize_qlinear(accumulator.movedim(1, 0), multiplier, 0, 0, top).movedim(0, 1)
    if isinstance(layer, nn.Linear):
        step = IntegerLayer(weight, bias, thresholds, 0)
        by_expression = IntegerLayer(weight, bias, thresholds, 0, requantize=requantize)
        raw_neuron = IntegerLevels(thresholds, 0, bias + SHIFT * weight.sum(1, dtype=torch.int32))
        raw = int8_gemm(shifted(levels), weight.t())
        return {"fp32 NCHW": lambda: F.linear(x, w, b), "fp32 channels_last": lambda: F.linear(x, w, b),
                "int": lambda: int_linear(levels, weight, bias), "int im2col": lambda: int_linear(levels, weight, bias),
                "int + thresholds": lambda: levels_from_thresholds(int_linear(levels, weight, bias), thresholds, 0),
                "int + fused levels": lambda: levels_fused(int_linear(levels, weight, bias), thresholds, 0,
                                                           sample_spikes=True),
                "int + requantize": lambda: requantized(int_linear(levels, weight, bias)),
                "int step": lambda: step(levels, sample_spikes=True),
                "int step, expression": lambda: by_expression(levels, sample_spikes=True),
                "int step: layer": lambda: int8_gemm(shifted(levels), weight.t()),
                "int step: levels": lambda: raw_neuron(raw, sample_spikes=True)}
    options = (layer.stride, layer.padding, layer.dilation, layer.groups)
    x_cl, w_cl = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    levels_cl = levels.contiguous(memory_format=torch.channels_last)
    conv, im2col = IntConv2d(weight, bias, *options), IntConv2d(weight, bias, *options, engine="im2col")
    step, raw_neuron = IntegerLayer(weight, bias, thresholds, 0, *options), IntegerLevels(thresholds, 0, bias)
    raw = step.conv.float_accumulator(levels_cl)
    by_expression = IntegerLayer(weight, bias, thresholds, 0, *options, requantize=requantize)
    return {"fp32 NCHW": lambda: F.conv2d(x, w, b, *options),
            "fp32 channels_last": lambda: F.conv2d(x_cl, w_cl, b, *options),
            "int": lambda: conv(levels_cl), "int im2col": lambda: im2col(levels_cl),
            "int + thresholds": lambda: levels_from_thresholds(conv(levels_cl), thresholds, 0),
            "int + fused levels": lambda: levels_fused(conv(levels_cl), thresholds, 0, sample_spikes=True),
            "int + requantize": lambda: requantized(conv(levels_cl)),
            "int step": lambda: step(levels_cl, sample_spikes=True),
            "int step, expression": lambda: by_expression(levels_cl, sample_spikes=True),
            "int step: layer": lambda: step.conv.float_accumulator(levels_cl),
            "int step: levels": lambda: raw_neuron.run(raw, True, exact_float=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-T", "--timesteps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = models.build_model("resnet20", 10).eval()
    totals = {"fastest": {}, "median": {}}
    rows = []
    print(f"resnet20, batch {args.batch_size}, {args.threads} threads, T = {args.timesteps} "
          f"(levels 0..{2 ** args.timesteps - 1}); fastest / median ms per layer of {args.repeats} rounds; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for layer, shape in layer_inputs(model, args.batch_size):
        times = layer_seconds(layer_variants(layer, shape, args.timesteps), args.repeats)
        for name, (fastest, median) in times.items():
            totals["fastest"][name] = totals["fastest"].get(name, 0.0) + fastest
            totals["median"][name] = totals["median"].get(name, 0.0) + median
        rows.append({"layer": repr(layer), "input": list(shape),
                     "ms": {k: [v * 1e3 for v in pair] for k, pair in times.items()}})
        cells = " | ".join(f"{k} {a * 1e3:.2f}/{b * 1e3:.2f}" for k, (a, b) in times.items())
        print(f"  {str(list(shape)):>16} {repr(layer)[:44]:44} {cells}")
    print(f"network (sum of layers): images/s and ratio to the best fp32; load average {os.getloadavg()[0]:.1f}")
    summary = {}
    for statistic, total in totals.items():
        fp32 = min(total["fp32 NCHW"], total["fp32 channels_last"])
        summary[statistic] = {name: {"images_per_s": args.batch_size / seconds, "ratio_to_fp32": fp32 / seconds}
                              for name, seconds in total.items()}
        print(f"  {statistic}: " + " | ".join(f"{name} {args.batch_size / seconds:.0f} img/s {fp32 / seconds:.2f}x"
                                             for name, seconds in total.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "int_kernels", "model": "resnet20", "batch_size": args.batch_size,
                       "threads": args.threads, "timesteps": args.timesteps, "rows": rows, "network": summary}, f,
                      indent=1)


if __name__ == "__main__":
    main()
