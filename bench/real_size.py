"""Peak memory and time of each stage on a full-size model, for several numbers of samples.

Builds the zoo's VGG16 (138 M parameters, ImageNet head, random weights: no download) at
--image-size, exports it to a float ONNX file with torch.onnx.export, writes N random images as an
uncompressed .npz, and runs each stage as the CLI does, in a fresh process, measuring its peak
resident memory (the child's ru_maxrss) and wall time:
  calibrate  `ann2snn convert vgg16.onnx -T 8 --calib data.npz --calib-samples N --no-verify`
  verify     `ann2snn verify vgg16.snn --against vgg16.onnx --data data.npz --samples N`
  eval       `ann2snn eval vgg16.snn --data data.npz` (all N images)
  energy     `ann2snn energy vgg16.snn --data data.npz` (all N images)
Target (issue 25): each command's peak memory <= 4 GiB, flat in N; time roughly linear in N.

    python bench/real_size.py [--samples 64,256,1024] [--image-size 224] [--stages calibrate,verify,eval,energy]
                              [--json FILE] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

STAGES = ("calibrate", "verify", "eval", "energy")


def build_vgg16(folder: Path, image_size: int, classes: int) -> Path:
    from ann2snn import models

    torch.manual_seed(0)
    model = models.build_model("vgg16", num_classes=classes).eval()
    path = folder / "vgg16.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, image_size, image_size),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def write_images(path: Path, samples: int, image_size: int, classes: int) -> None:
    rng = np.random.default_rng(samples)
    np.savez(path, x=rng.random((samples, 3, image_size, image_size), dtype=np.float32),
             y=rng.integers(0, classes, samples))


def measured(command: list[str]) -> tuple[float, float]:
    """(seconds, peak resident GiB) of `command` in a fresh process; refused unless it succeeds."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)   # reaped here, with the child's own rusage
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if process.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"{' '.join(command)} failed ({process.returncode}): {errors.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / (1 << 20)   # ru_maxrss is in KiB on Linux


def stage_commands(stage: str, folder: Path, model: Path, data: Path, samples: int) -> list[str]:
    cli = [sys.executable, "-m", "ann2snn"]
    snn = folder / "vgg16.snn"
    return {
        "calibrate": [*cli, "convert", str(model), "-T", "8", "--calib", str(data), "--calib-samples", str(samples),
                      "--no-verify", "-o", str(snn), "--json"],
        "verify": [*cli, "verify", str(snn), "--against", str(model), "--data", str(data), "--samples", str(samples),
                   "--json"],
        "eval": [*cli, "eval", str(snn), "--data", str(data), "--json"],
        "energy": [*cli, "energy", str(snn), "--data", str(data), "--json"],
    }[stage]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="64,256,1024", help="Numbers of samples N, comma-separated.")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"Stages to run, of {', '.join(STAGES)}.")
    parser.add_argument("--json", default=None, help="Write the results here as JSON.")
    parser.add_argument("--quick", action="store_true", help="A smoke run: 32x32 images, N = 2 and 4.")
    args = parser.parse_args()
    sizes = [2, 4] if args.quick else [int(n) for n in args.samples.split(",")]
    image_size = 32 if args.quick else args.image_size
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; valid: {', '.join(STAGES)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = build_vgg16(folder, image_size, args.classes)
        for samples in sizes:
            data = folder / f"images_{samples}.npz"
            write_images(data, samples, image_size, args.classes)
            if "calibrate" not in stages and not (folder / "vgg16.snn").exists():
                measured(stage_commands("calibrate", folder, model, data, samples))
            row = {"samples": samples}
            for stage in stages:
                seconds, peak = measured(stage_commands(stage, folder, model, data, samples))
                row[f"{stage} s"], row[f"{stage} peak GiB"] = round(seconds, 1), round(peak, 2)
                print(f"N = {samples}: {stage} {seconds:.1f} s, peak {peak:.2f} GiB", file=sys.stderr, flush=True)
            rows.append(row)
            data.unlink()
    peaks = [v for row in rows for k, v in row.items() if k.endswith("peak GiB")]
    result = {"benchmark": "real_size", "model": "vgg16", "parameters": 138_365_992 if args.classes == 1000 else None,
              "image_size": image_size, "timesteps": 8, "rows": rows, "max_peak_gib": max(peaks),
              "target_met": max(peaks) <= 4.0}
    columns = ["samples"] + [f"{s} {unit}" for s in stages for unit in ("s", "peak GiB")]
    print(f"VGG16 at {image_size}x{image_size}, T = 8, float ONNX calibrated in the run; one fresh process a stage")
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    print(f"largest peak {max(peaks):.2f} GiB: target <= 4 GiB {'met' if result['target_met'] else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
