"""`ann2snn demo`: train a digits CNN, convert it at several T, compare ANN and SNN accuracy."""
from __future__ import annotations

from pathlib import Path

import torch

from ..compile.compiler import convert
from ..data.sets import load_dataset
from .config import TrainConfig
from .loop import train


def run_demo(timesteps: tuple[int, ...] = (2, 3, 4), output_dir: str | Path = "runs/demo",
             float_epochs: int = 30, qat_epochs: int = 30, progress: bool = True) -> list[dict]:
    """Float training, then quantization-aware fine-tuning and conversion for each T.

    Returns one row per T: float ANN, quantized ANN and SNN test accuracy as fractions (the SNN simulated
    time step by time step), how many test images get the same prediction from the quantized ANN
    and the SNN, and the SNN's spikes per image. Writes the weights, the QDQ ONNX export and the
    .snn of every T to `output_dir`.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    float_weights = out / "digits_float.safetensors"
    float_run = train(TrainConfig(model="digits-cnn", data="digits", float_only=True, epochs=float_epochs,
                                  output=str(float_weights)), progress=progress)
    test = load_dataset("digits", split="test")
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([int(test[i][1]) for i in range(len(test))])
    rows = []
    for steps in timesteps:
        run = train(TrainConfig(model="digits-cnn", data="digits", timesteps=steps, epochs=qat_epochs,
                                init=str(float_weights), output=str(out / f"digits_T{steps}.safetensors"),
                                onnx=str(out / f"digits_T{steps}.onnx")), progress=progress)
        model = run.model.cpu().eval()
        with torch.no_grad():
            ann_prediction = model(x).argmax(1)
        snn = convert(model, T=steps, source={"model": "digits-cnn", "trained_by": "ann2snn demo"})
        snn.save(out / f"digits_T{steps}.snn")
        simulated = snn.simulate(x)
        snn_prediction = simulated.logits.argmax(1)
        rows.append({
            "T": steps,
            "float ANN": float_run.test_accuracy,
            "quantized ANN": (ann_prediction == y).double().mean().item(),
            "SNN": (snn_prediction == y).double().mean().item(),
            "same prediction": f"{int((snn_prediction == ann_prediction).sum())}/{len(y)}",
            "spikes/img": sum(c.sum().item() for c in simulated.spikes.values()) / len(y),
        })
    return rows
