"""Evaluation throughput of a converted SNN against two baselines measured in the same run.

1. the float ANN in PyTorch (the same network with ReLU sites, eval mode);
2. SpikingJelly 2.0's multi-step simulation of a rate-coded SNN of the same network at the same T
   (IFNode with soft reset at every site, the input repeated every step, time folded into the
   batch for the stateless layers as SeqToANNContainer does);
and ann2snn's SNN run by `evaluate` (time-folded; the fused neuron in Triton on CUDA, in C on the CPU)
and `simulate`.
On the CPU it also times evaluate with the neuron's PyTorch reference instead of its C kernel.
Targets (issue 6): on a GPU, evaluate >= 0.9x the float ANN and >= 5x SpikingJelly; on the CPU,
evaluate >= 0.7x the float ANN. Every network runs with IEEE float32 convolutions
(`ann2snn.runtime.snn.ieee_float32`, which the SNN needs to stay exact; cuDNN's default would be TF32).

With --weight-bits 8 it times the integer SNN instead (issue 27): the network prepared with int8
weights, exported as full QDQ and converted (ann2snn.convert_onnx, backend "integer"), against the
float ANN in NCHW and channels_last, the same SNN on its float backend, and onnxruntime running the
float file and the QDQ file (its default session: int8 kernels). The peer a CPU user would pick is
onnxruntime on the float file quantized by its own quantize_static (after quant_pre_process,
default arguments: uint8 activations, so T = 8): that file is timed in onnxruntime and as ann2snn's
integer SNN too. Targets: the integer SNN >= 1.5x the faster float ANN (CPU, resnet20, batch 64,
T = 4, --threads 2); on CUDA (no onnxruntime rows), >= 1.5x the bf16 channels_last ANN (resnet34 at
224, batch 128).

    python bench/eval_throughput.py [--model resnet20] [--batch-size 64] [--device cpu|cuda] [-T 4]
                                    [--weight-bits 8] [--threads N] [--json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from typing import Callable

import torch
from torch import nn

import ann2snn
from ann2snn import models
from ann2snn.runtime.cuda_graph import CudaGraphRunner
from ann2snn.runtime.quant import QuantClippedActivation
from ann2snn.runtime.snn import ieee_float32

INPUTS = {"digits-cnn": (1, 8, 8), "resnet20": (3, 32, 32)}


class FoldedTime(nn.Module):
    """A SpikingJelly multi-step neuron inside a network whose other layers see [T * N, ...]."""

    def __init__(self, node: nn.Module, timesteps: int) -> None:
        super().__init__()
        self.node, self.timesteps = node, timesteps

    def forward(self, x):
        return self.node(x.unflatten(0, (self.timesteps, -1))).flatten(0, 1)


def spikingjelly_snn(float_model: nn.Module, timesteps: int) -> nn.Module:
    from spikingjelly.activation_based import neuron

    snn = ann2snn.compile.trace(float_model)
    for name, module in list(snn.named_modules()):
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            node = neuron.IFNode(v_reset=None, step_mode="m")  # soft reset, rate coding
            ann2snn.runtime.graph.set_module(snn, name, FoldedTime(node, timesteps))
    return snn


def without_native_neuron(run: Callable) -> Callable:
    """`run` with the C neuron switched off (ANN2SNN_NATIVE=0): fire_fused takes its reference."""
    def reference_run(x: torch.Tensor):
        before = os.environ.get("ANN2SNN_NATIVE")
        os.environ["ANN2SNN_NATIVE"] = "0"
        try:
            return run(x)
        finally:
            if before is None:
                del os.environ["ANN2SNN_NATIVE"]
            else:
                os.environ["ANN2SNN_NATIVE"] = before
    return reference_run


def throughput(runs: dict[str, Callable], x: torch.Tensor, device: torch.device, seconds: float = 3.0,
               rounds: int = 5) -> dict[str, float]:
    """Images per second of each `run(x)`: after a warm-up, `rounds` rounds that time every run in
    turn for seconds / rounds each (synchronized on CUDA); the median round per run. Interleaving
    spreads a noisy machine's slow spells over all runs instead of one."""
    def timed(run: Callable, budget: float) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        count, start = 0, time.perf_counter()
        while count == 0 or time.perf_counter() - start < budget:
            run(x)
            count += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return count * x.shape[0] / (time.perf_counter() - start)

    with torch.no_grad():
        for run in runs.values():
            for _ in range(2):
                run(x)
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                samples[name].append(timed(run, seconds / rounds))
    return {name: statistics.median(values) for name, values in samples.items()}


def onnxruntime_run(path: str, threads: int | None) -> Callable:
    """onnxruntime's default CPU session on `path` (QDQ files: its int8 kernels), as a run(x)."""
    from ann2snn.frontend.reader import onnxruntime_session

    session = onnxruntime_session(path, integer_kernels=True, threads=threads)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.cpu().numpy()})[0]


def integer_runs(float_model: nn.Module, args, shape: tuple[int, ...], folder: str,
                 device: torch.device) -> dict[str, Callable]:
    """The runs of --weight-bits 8: the integer SNN, its float backend, the float ANN (NCHW,
    channels_last, and bf16 channels_last), and on the CPU onnxruntime on the float file, the QDQ
    file and its own quantize_static file (also as an integer SNN)."""
    example = torch.rand((32, *shape))
    float_path = os.path.join(folder, "float.onnx")
    torch.onnx.export(float_model, example[:2], float_path, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    qat = ann2snn.prepare(float_model, T=args.timesteps, example_input=example, weight_bits=args.weight_bits).eval()
    qdq_path = str(ann2snn.export_onnx(qat, os.path.join(folder, "int8.onnx"), example[:2]))
    snn = ann2snn.convert_onnx(qdq_path, verify=False, integer=True).to(device)
    float_model = float_model.to(device)
    channels_last = copy.deepcopy(float_model).to(memory_format=torch.channels_last)
    bf16 = copy.deepcopy(channels_last).to(torch.bfloat16)

    def float_backend(x):
        with snn.using_backend("float"):
            return snn.evaluate(x)

    runs = {"float ANN NCHW": float_model,
            "float ANN channels_last": lambda x: channels_last(x.contiguous(memory_format=torch.channels_last)),
            "float ANN bf16 channels_last": lambda x: bf16(x.to(torch.bfloat16, memory_format=torch.channels_last)),
            "integer SNN evaluate": snn.evaluate, "float SNN evaluate": float_backend}
    if device.type == "cpu":
        static_path = quantize_static_file(float_path, example, folder)
        static_snn = ann2snn.convert_onnx(static_path, verify=False, integer=True)
        runs.update({"onnxruntime fp32": onnxruntime_run(float_path, args.threads),
                     "onnxruntime int8 QDQ": onnxruntime_run(qdq_path, args.threads),
                     f"integer SNN, quantize_static (T = {static_snn.timesteps})": static_snn.evaluate,
                     "onnxruntime int8, quantize_static": onnxruntime_run(static_path, args.threads)})
    runs["integer SNN simulate"] = snn.simulate
    return runs


def quantize_static_file(float_path: str, example: torch.Tensor, folder: str) -> str:
    """The float file as a CPU user quantizes it for onnxruntime: quant_pre_process, then quantize_static
    with its default arguments (QDQ, uint8 activations, int8 weights), calibrated on `example`."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": example[i:i + 8].numpy()} for i in range(0, len(example), 8)])

        def get_next(self):
            return next(self.batches, None)

    processed, quantized = os.path.join(folder, "processed.onnx"), os.path.join(folder, "static.onnx")
    quant_pre_process(float_path, processed)
    quantize_static(processed, quantized, Batches())
    return quantized


def integer_ratios(rows: dict[str, float]) -> dict[str, float]:
    best = max(rows["float ANN NCHW"], rows["float ANN channels_last"])
    ratios = {"integer SNN / float ANN": rows["integer SNN evaluate"] / best,
              "integer SNN / bf16 ANN": rows["integer SNN evaluate"] / rows["float ANN bf16 channels_last"],
              "integer SNN / float SNN": rows["integer SNN evaluate"] / rows["float SNN evaluate"]}
    if "onnxruntime int8 QDQ" not in rows:   # CUDA: no onnxruntime session
        return ratios
    return {**ratios,
            "integer SNN / onnxruntime int8": rows["integer SNN evaluate"] / rows["onnxruntime int8 QDQ"],
            "quantize_static: integer SNN / onnxruntime int8":
                next(v for k, v in rows.items() if k.startswith("integer SNN, quantize_static"))
                / rows["onnxruntime int8, quantize_static"],
            "onnxruntime int8 / float ANN": rows["onnxruntime int8 QDQ"] / best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20", choices=models.MODEL_NAMES)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-T", "--timesteps", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per network")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    parser.add_argument("--weight-bits", type=int, choices=[8], default=None,
                        help="time the integer SNN of the network with int8 weights (CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from spikingjelly.activation_based import functional

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = INPUTS.get(args.model, (3, 224, 224))
    float_model = models.build_model(args.model, num_classes=10 if args.model == "digits-cnn" else 1000).eval()
    if args.weight_bits:
        with tempfile.TemporaryDirectory() as folder:
            runs = integer_runs(float_model, args, shape, folder, device)
            with ieee_float32():
                rows = throughput(runs, torch.rand((args.batch_size, *shape), device=device), device, args.seconds,
                                  args.rounds)
        report(args, device, rows, integer_ratios(rows))
        return
    quantized = models.build_model(args.model, num_classes=10 if args.model == "digits-cnn" else 1000,
                                   activation=lambda c: QuantClippedActivation(levels=2**args.timesteps - 1))
    quantized.load_state_dict(float_model.state_dict(), strict=False)
    snn = ann2snn.convert(quantized.eval(), T=args.timesteps).to(device)
    sj = spikingjelly_snn(float_model, args.timesteps).to(device)
    float_model = float_model.to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        float_model, sj = float_model.to(memory_format=torch.channels_last), sj.to(memory_format=torch.channels_last)
        snn = snn.to(memory_format=torch.channels_last)
    x = torch.rand((args.batch_size, *shape), device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def run_sj(inputs):
        functional.reset_net(sj)
        return sj(inputs.repeat(args.timesteps, *[1] * (inputs.dim() - 1))).unflatten(0, (args.timesteps, -1)).mean(0)

    runs = {"float ANN": float_model, "ann2snn evaluate": snn.evaluate}
    if device.type == "cpu":   # what the C neuron gains over its PyTorch reference
        runs["evaluate, PyTorch neuron"] = without_native_neuron(snn.evaluate)
    else:   # what the CUDA graph gains, and the float ANN replayed the same way
        runs["evaluate, no CUDA graph"] = lambda inputs: snn.evaluate(inputs, cuda_graph=False)
        runs["float ANN, CUDA graph"] = CudaGraphRunner(float_model)
    runs.update({"ann2snn simulate": snn.simulate, "SpikingJelly multi-step": run_sj})
    with ieee_float32():
        rows = throughput(runs, x, device, args.seconds, args.rounds)
    ratios = {"evaluate / float ANN": rows["ann2snn evaluate"] / rows["float ANN"],
              "evaluate / SpikingJelly": rows["ann2snn evaluate"] / rows["SpikingJelly multi-step"]}
    if device.type == "cpu":
        ratios["PyTorch neuron / float ANN"] = rows["evaluate, PyTorch neuron"] / rows["float ANN"]
    else:
        ratios["no graph / float ANN"] = rows["evaluate, no CUDA graph"] / rows["float ANN"]
        ratios["both graphed"] = rows["ann2snn evaluate"] / rows["float ANN, CUDA graph"]
    report(args, device, rows, ratios)


def report(args, device: torch.device, rows: dict[str, float], ratios: dict[str, float]) -> None:
    result = {"model": args.model, "device": str(device), "timesteps": args.timesteps, "batch_size": args.batch_size,
              "weight_bits": args.weight_bits, "threads": torch.get_num_threads(), "images_per_second": rows,
              "ratios": ratios}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model}, batch {args.batch_size}, T = {args.timesteps}, on {device}, {torch.get_num_threads()} "
          f"threads{', int8 weights' if args.weight_bits else ''}:")
    for name, value in rows.items():
        print(f"  {name:40s} {value:10.1f} img/s")
    for name, value in ratios.items():
        print(f"  {name:40s} {value:10.2f}x")


if __name__ == "__main__":
    main()
