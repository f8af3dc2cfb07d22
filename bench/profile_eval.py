"""Where SNN evaluation spends its time: torch.profiler over `SNN.evaluate`, operators by self time.

    python bench/profile_eval.py [--model resnet20] [--batch-size 64] [-T 4] [--device cpu|cuda] [--json]

The SNN is converted from the zoo model with random weights (time does not depend on them). On
CUDA the table is by device time (kernels, including the fused neuron `_fire_kernel`); on the CPU
by CPU time. Issue 6 asks for kernels for whatever this shows to dominate besides the neuron.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

import ann2snn  # noqa: E402
from ann2snn import models  # noqa: E402
from ann2snn.runtime.quant import QuantClippedActivation  # noqa: E402

INPUTS = {"digits-cnn": (1, 8, 8), "resnet20": (3, 32, 32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20", choices=models.MODEL_NAMES)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("-T", "--timesteps", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="profiled calls, after 2 warm-up calls")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    classes = 10 if args.model in INPUTS else 1000
    model = models.build_model(args.model, classes,
                               activation=lambda c: QuantClippedActivation(levels=2**args.timesteps - 1))
    snn = ann2snn.convert(model.eval(), T=args.timesteps).to(device)
    if device.type == "cuda":
        snn = snn.to(memory_format=torch.channels_last)
    x = torch.rand((args.batch_size, *INPUTS.get(args.model, (3, 224, 224))), device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        snn.evaluate(x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            snn.evaluate(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events)
    rows = sorted(({"op": e.key, "share": getattr(e, key) / total, "ms_per_call": getattr(e, key) / 1e3 / args.steps}
                   for e in events), key=lambda r: -r["share"])[:args.top]
    result = {"model": args.model, "device": str(device), "timesteps": args.timesteps,
              "batch_size": args.batch_size, "time": key, "ops": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model}, batch {args.batch_size}, T = {args.timesteps}, on {device} ({key}):")
    for r in rows:
        print(f"  {100 * r['share']:5.1f}%  {r['ms_per_call']:8.2f} ms/call  {r['op']}")


if __name__ == "__main__":
    main()
