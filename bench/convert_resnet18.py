"""How long `ann2snn convert` takes on a ResNet-18 ONNX file (ImageNet layout, 224 x 224).

Builds ResNet-18 from models/, exports it with torch.onnx.export, quantizes it with onnxruntime's
quantize_static (QDQ, uint8 activations, int8 weights; random calibration images), then times
  1. the conversion alone (ONNX import and the compiler passes), in this process;
  2. the whole command `ann2snn convert FILE -T 8 --verify-samples N` in a fresh process;
  3. as a baseline in the same run: loading the same file into an onnxruntime session and
     running it on the same N inputs.
Target (issue 3): the conversion under 10 s on 2 CPU cores.

    python bench/convert_resnet18.py [--verify-samples 4] [--json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_qdq_resnet18(folder: Path) -> Path:
    from ann2snn import models
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    torch.manual_seed(0)
    model = models.build_model("resnet18", num_classes=1000).eval()
    float_path, qdq_path = folder / "resnet18.onnx", folder / "resnet18_qdq.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(float_path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.random((1, 3, 224, 224), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(float_path), str(qdq_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return qdq_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verify-samples", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from ann2snn import convert_onnx
    from ann2snn.frontend.reader import onnxruntime_session

    with tempfile.TemporaryDirectory() as tmp:
        path = build_qdq_resnet18(Path(tmp))
        start = time.perf_counter()
        snn = convert_onnx(path, verify=False)   # import and passes only: verification is timed with the command
        convert_seconds = time.perf_counter() - start

        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "ann2snn", "convert", str(path), "-T", "8", "--verify-samples",
                               str(args.verify_samples), "-o", str(Path(tmp) / "r18.snn"), "--json"],
                              capture_output=True, text=True)
        command_seconds = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"convert failed ({done.returncode}): {done.stderr.strip()}")
        verify = json.loads(done.stdout)["verify"]

        start = time.perf_counter()
        session = onnxruntime_session(path)
        x = np.random.default_rng(0).random((args.verify_samples, 3, 224, 224), dtype=np.float32)
        session.run(None, {session.get_inputs()[0].name: x})
        ort_seconds = time.perf_counter() - start

    result = {"sites": len(snn.report.sites), "timesteps": snn.timesteps,
              "convert_seconds": convert_seconds, "command_seconds": command_seconds,
              "onnxruntime_load_and_run_seconds": ort_seconds,
              "command_over_onnxruntime": command_seconds / ort_seconds, "verify": verify,
              "target_met": convert_seconds < 10.0}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"ResNet-18 QDQ (uint8 activations, int8 weights): {result['sites']} sites, T = {snn.timesteps}")
    print(f"conversion (import + passes):          {convert_seconds:6.2f} s   (target < 10 s: "
          f"{'met' if result['target_met'] else 'NOT met'})")
    print(f"`ann2snn convert` command, {args.verify_samples} verify inputs: {command_seconds:6.2f} s")
    print(f"onnxruntime load + run, same inputs:   {ort_seconds:6.2f} s   (command / onnxruntime = "
          f"{result['command_over_onnxruntime']:.1f}x)")
    print(f"verify: agreement {100 * verify['agreement']:.1f}%, max |logit diff| {verify['max_abs_logit_diff']:.3g}, "
          f"{'PASSED' if verify['passed'] else 'FAILED'}")


if __name__ == "__main__":
    main()
