"""Memory bandwidth of the fused neuron (kernels.fire_fused) against a plain copy of the same size.

The neuron is memory-bound: it reads the potential V once and writes q * theta (and, on request,
the spike code: uint8 up to T = 8, uint16 above); the spike counts are a few bytes. Each case asks
for what the evaluator asks for (spikes per sample), one also for spikes per channel. Its useful
bandwidth is those bytes per second; the ceiling is what the device reaches copying a tensor of the
same size (`y.copy_(x)`, which reads and writes it once). The ratio should be at least 0.7 on a GPU.
On a GPU both are timed as replays of a CUDA graph of 20 calls, the device's own time, as the
evaluator runs them; "eager ms" is one call launched from Python, the host's launch included
(which bounds small tensors).

On a machine without CUDA the Triton kernel cannot run compiled (the interpreter is for tests,
not for timing), so the script times what `fire_fused` runs on the CPU against a CPU copy: the C
kernel (kernels/native.py) for float32, the pure-PyTorch reference for the other dtypes.

    python bench/neuron_bandwidth.py            # a table
    python bench/neuron_bandwidth.py --json     # one JSON object
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from ann2snn.levels import spike_code_dtype
from ann2snn.kernels import fire_fused, fire_fused_triton  # noqa: E402
from ann2snn.kernels.native import native_neuron_available  # noqa: E402

TARGET_RATIO = 0.7


@dataclass(frozen=True)
class Case:
    """One benchmarked activation tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool
    want_levels: bool
    channel_counts: bool = False   # the evaluator asks for spikes per sample only


@dataclass
class Result:
    case: str
    shape: list[int]
    dtype: str
    layout: str
    levels_out: bool
    implementation: str
    neuron_ms: float
    eager_ms: float | None   # CUDA: one call launched from Python, the host's launch included
    neuron_gbps: float
    copy_gbps: float
    ratio: float


def cases(device: torch.device) -> list[Case]:
    """ResNet-like activation sites; a batch of 16 instead of 256 on the CPU."""
    batch = 256 if device.type == "cuda" else 16
    return [
        Case("conv 56x56", (batch, 64, 56, 56), torch.float32, False, False),
        Case("conv 56x56 +levels", (batch, 64, 56, 56), torch.float32, False, True),
        Case("conv 56x56 +per-channel", (batch, 64, 56, 56), torch.float32, False, False, True),
        Case("conv 56x56 NHWC", (batch, 64, 56, 56), torch.float32, True, False),
        Case("conv 7x7", (batch, 512, 7, 7), torch.float32, False, False),
        Case("conv 28x28 fp16", (batch, 128, 28, 28), torch.float16, False, False),
        Case("conv 28x28 bf16 NHWC", (batch, 128, 28, 28), torch.bfloat16, True, False),
        Case("linear", (batch * 16, 4096), torch.float32, False, False),
    ]


GRAPHED_CALLS = 20   # calls per CUDA graph replay: the device's time without the host's launches


def _graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """GRAPHED_CALLS calls of fn captured in one CUDA graph (warmed up on a side stream first, so
    Triton compiles outside the capture): a replay times the device alone. The evaluator runs
    its network in such a graph (`SNN.evaluate(cuda_graph=True)`)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPHED_CALLS):
            fn()
    return graph.replay


def _time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int, calls: int = 1) -> float:
    """Median milliseconds of one of `calls` calls made by fn: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples) / calls


def run_case(case: Case, device: torch.device, timesteps: int, warmup: int, repeat: int) -> Result:
    gen = torch.Generator(device=device).manual_seed(0)
    channels = case.shape[1]
    theta = torch.rand(channels, device=device, generator=gen) * 0.1 + 0.01
    v = torch.randn(case.shape, device=device, generator=gen).to(case.dtype)
    if case.channels_last:
        v = v.contiguous(memory_format=torch.channels_last)
    offset = theta / 2
    levels = 2**timesteps - 1
    fire = fire_fused_triton if device.type == "cuda" else fire_fused
    if device.type == "cuda":
        implementation = "triton"
    else:
        implementation = "C" if case.dtype == torch.float32 and native_neuron_available() else "torch reference"

    def neuron() -> object:
        return fire(v, theta, offset, levels, timesteps, want_levels=case.want_levels,
                    per_channel_counts=case.channel_counts)

    copy_dst = torch.empty_like(v)

    def copy() -> object:
        return copy_dst.copy_(v)

    eager_ms = None
    if device.type == "cuda":
        eager_ms = round(_time_ms(neuron, device, warmup, repeat), 4)
        neuron_ms = _time_ms(_graphed(neuron), device, warmup, repeat, GRAPHED_CALLS)
        copy_ms = _time_ms(_graphed(copy), device, warmup, repeat, GRAPHED_CALLS)
    else:
        neuron_ms = _time_ms(neuron, device, warmup, repeat)
        copy_ms = _time_ms(copy, device, warmup, repeat)

    element = v.element_size()
    code = spike_code_dtype(timesteps).itemsize if case.want_levels else 0
    neuron_bytes = v.numel() * (2 * element + code)                             # read V, write value (+ code)
    copy_bytes = v.numel() * 2 * element                                        # read and write once
    neuron_gbps = neuron_bytes / neuron_ms / 1e6
    copy_gbps = copy_bytes / copy_ms / 1e6
    return Result(case.name, list(case.shape), str(case.dtype).removeprefix("torch."),
                  "NHWC" if case.channels_last else "NCHW", case.want_levels,
                  implementation,
                  round(neuron_ms, 4), eager_ms, round(neuron_gbps, 3), round(copy_gbps, 3), round(neuron_gbps / copy_gbps, 3))


def print_table(results: list[Result], device_name: str) -> None:
    print(f"fused neuron bandwidth on {device_name}; "
          f"ratio = neuron GB/s / copy GB/s, target >= {TARGET_RATIO} on a GPU")
    header = (f"{'case':<24} {'shape':<20} {'dtype':<9} {'kernel':<15} {'ms':>9} {'eager ms':>9} {'neuron GB/s':>12} "
              f"{'copy GB/s':>10} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for r in results:
        shape = "x".join(map(str, r.shape))
        eager = "-" if r.eager_ms is None else f"{r.eager_ms:.3f}"
        print(f"{r.case:<24} {shape:<20} {r.dtype:<9} {r.implementation:<15} {r.neuron_ms:>9.3f} {eager:>9} {r.neuron_gbps:>12.2f} "
              f"{r.copy_gbps:>10.2f} {r.ratio:>6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--timesteps", type=int, default=8, help="T of the neuron (1..16)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    note = None
    if device.type != "cuda":
        note = "no CUDA device: the Triton kernel needs a GPU; timing the CPU neuron against a CPU copy"
        if not args.json:
            print(note)
    with torch.no_grad():
        results = [run_case(case, device, args.timesteps, args.warmup, args.repeat) for case in cases(device)]
    if args.json:
        print(json.dumps({"device": device_name, "timesteps": args.timesteps, "target_ratio": TARGET_RATIO,
                          "note": note, "results": [asdict(r) for r in results]}, indent=2))
    else:
        print_table(results, device_name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
