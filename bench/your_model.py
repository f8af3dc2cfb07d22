"""Your own model through ann2snn: a small residual CNN written here in plain PyTorch, on Fashion-MNIST.

The network (not from models/): conv(1->16) + BN + nn.ReLU, conv(16->16) + BN + a residual add +
F.relu, max pooling, conv(16->32) + BN + nn.ReLU6, max pooling, flatten, linear (10 classes). It is
trained float (SGD, momentum 0.9, weight decay 5e-4, per-step cosine schedule, batch 64) on the
first `--train-limit` Fashion-MNIST training images and exported to ONNX (torch.onnx.export,
dynamic batch, dynamo=False). From that file, for each T:

    calibration only   `ann2snn convert float.onnx -T N --calib DATA --verify-data DATA`
                       (the CLI, in a subprocess): lambda of every site from 512 training images
    QAT beta = b       ann2snn.train.train(TrainConfig(model="float.onnx", ...)) with train_limit
                       (the CLI has no option for it), SGD at --lr, the last epoch kept (`ann2snn
                       train --model` fine-tunes with Adam and keeps the best epoch instead), then
                       `ann2snn convert qat.onnx --verify-data DATA`
    QAT int8 beta = b  with --weight-bits 8, beside each QAT row: the same from the same float.onnx with
                       TrainConfig.weight_bits=8 (BN folded, int8 weights from the first step:
                       float_weight_epochs 0); its .snn runs the integer backend (docs/integer.md),
                       its size against the float-weight row's of the same T and beta

Every SNN is evaluated (time-folded `SNN.evaluate`) on all test images: accuracy and spikes per
image, and how many of its predictions equal its quantized ANN's (the source graph that `ann2snn
verify` rebuilds from the .snn's recorded lambdas). SpikingJelly 2.0's `RateCodingRecipe` converts
the float network as bench/peers.py does (modes from `--sj-modes`); its F.relu and nn.ReLU6 become
nn.ReLU modules first (SpikingJelly converts only nn.ReLU; ReLU6 -> ReLU changes the network, and
its float accuracy is reported). One T_max-step run gives every T of `--sj-timesteps` as a prefix:
the output at T is the mean of the first T steps' logits (what a T-step multi-step run computes).

    python bench/your_model.py --json out.json --plot out.png
    python bench/your_model.py --timesteps 2,4 --betas 0,8e-6 --weight-bits 8 --sj-modes ""
    python bench/your_model.py --quick        # tiny settings (smoke test), int8 rows included

Targets (issue 17 item 5): the fine-tuned SNN within 0.5 points of the float model at T = 4 and
1.5 points at T = 2, each predicting what its quantized ANN predicts on every test image; the
recommended beta (fewest spikes within 0.5 points of beta = 0) with at least 40% fewer spikes.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROOT = Path(__file__).resolve().parents[1]

import ann2snn  # noqa: E402
from ann2snn.frontend.source import quantized_onnx  # noqa: E402
from ann2snn.data.sets import load_dataset, make_loader  # noqa: E402
from ann2snn.tables import format_table  # noqa: E402
from ann2snn.train import TrainConfig, train  # noqa: E402
from peers import SJ_MODES, counting_spikes, import_spikingjelly_converter  # noqa: E402
from sparsity import emit, log  # noqa: E402
from sparsity import recommend as fewest_spikes_within_drop  # noqa: E402

MAX_GAP = {4: 0.5, 2: 1.5}        # points below the float model, fine-tuned SNN
MIN_SPIKE_REDUCTION = 40.0        # %


class SmallResNet(nn.Module):
    """conv-BN-ReLU, conv-BN + residual + F.relu, pool, conv-BN-ReLU6, pool, linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2: nn.Module | None = None        # None: F.relu (SpikingJelly's copy gets an nn.ReLU)
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.relu3: nn.Module = nn.ReLU6()
        self.pool2 = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 7 * 7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(h)) + h
        h = F.relu(z) if self.relu2 is None else self.relu2(z)
        h = self.pool1(h)
        h = self.pool2(self.relu3(self.bn3(self.conv3(h))))
        return self.fc(torch.flatten(h, 1))


def spikingjelly_copy(model: SmallResNet) -> SmallResNet:
    """The same weights with nn.ReLU modules at every site (RateCodingRecipe converts only those)."""
    sj = copy.deepcopy(model)
    sj.relu2 = nn.ReLU()
    sj.relu3 = nn.ReLU()
    return sj.eval()


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def pct(pred: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (pred == y).double().mean().item()


def train_float(data: str, epochs: int, lr: float, seed: int, limit: int | None) -> SmallResNet:
    torch.manual_seed(seed)
    model = SmallResNet()
    train_set = load_dataset(data, "train", seed=seed)
    if limit is not None:
        train_set = torch.utils.data.Subset(train_set, range(min(limit, len(train_set))))
    steps = epochs * math.ceil(len(train_set) / 64)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for epoch in range(epochs):
        model.train()
        for x, y in make_loader(train_set, 64, shuffle=True, seed=seed + epoch):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def export_float(model: nn.Module, path: Path) -> None:
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)


def cli_convert(source: Path, out: Path, data: str, timesteps: int | None) -> dict[str, Any]:
    """`ann2snn convert` in a subprocess; returns its JSON (verification included)."""
    cmd = [sys.executable, "-m", "ann2snn", "convert", str(source), "-o", str(out), "--verify-data", data, "--json"]
    if timesteps is not None:
        cmd += ["-T", str(timesteps), "--calib", data]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout)
    result["command"] = "ann2snn " + " ".join(cmd[3:])
    return result


def snn_row(source: Path, snn_path: Path, conversion: dict[str, Any], x: torch.Tensor,
            y: torch.Tensor) -> dict[str, Any]:
    """The .snn on the test set, against the quantized ANN that `ann2snn verify` rebuilds."""
    snn = ann2snn.load_snn(snn_path)
    clips = {site: e["lambda"] for site, e in snn.report.sites.items() if "lambda" in e}
    graph, _ = quantized_onnx(source, snn.timesteps, clips=clips, input_shape=snn.source.input_shape)
    graph.eval()
    spikes = torch.zeros((), dtype=torch.float64)
    snn_logits = []
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            out = snn.evaluate(x[i:i + 1000])
            snn_logits.append(out.logits)
            spikes += sum(c.double().sum() for c in out.spikes.values())
        ann_pred = batched(lambda b: graph(b.to(next(graph.parameters()).dtype)), x).argmax(1)
    snn_pred = torch.cat(snn_logits).argmax(1)
    verify = conversion.get("verify", {})
    return {"accuracy": pct(snn_pred, y), "quantized_ann_accuracy": pct(ann_pred, y),
            "same_prediction": int((snn_pred == ann_pred).sum()), "images": len(y),
            "spikes_per_image": spikes.item() / len(y), "verified": bool(verify.get("passed")),
            "exact_gate": bool(verify.get("exact", {}).get("passed")),
            "unexplained_levels": (verify.get("levels") or {}).get("totals", {}).get("unexplained"),
            "backend": conversion["backend"], "integer_layers": conversion["integer_layers"],
            "integer_check": verify.get("integer"), "snn_bytes": snn_path.stat().st_size,
            "convert_command": conversion["command"]}


def qat_row(args: argparse.Namespace, float_path: Path, data: str, limit: int | None, steps: int, beta: float,
            x: torch.Tensor, y: torch.Tensor, float_weights: dict[str, Any] | None = None) -> dict[str, Any]:
    """QAT from float.onnx, then `ann2snn convert`. Given the float-weight row of the same T and beta,
    with int8 weights (args.weight_bits): BN folded and the weights quantized at once, since the
    float file's weights are trained (float_weight_epochs 0), and the .snn's size compared with that row's."""
    t0 = time.perf_counter()
    bits = None if float_weights is None else args.weight_bits
    tag = "" if bits is None else f"_int{bits}"
    qat_path = float_path.parent / f"qat_T{steps}_b{beta:g}{tag}.onnx"
    trained = train(TrainConfig(model=str(float_path), data=data, timesteps=steps, beta=beta, epochs=args.epochs,
                                lr=args.lr, seed=args.seed, train_limit=limit, weight_bits=bits,
                                float_weight_epochs=None if bits is None else 0,
                                output=str(qat_path.with_suffix(".safetensors")), onnx=str(qat_path)), progress=False)
    snn_path = qat_path.with_suffix(".snn")
    row = {"method": f"ann2snn QAT{'' if bits is None else f' int{bits}'} beta={beta:g}", "converter": "ann2snn",
           "T": steps, "beta": beta, "weight_bits": bits, "qat_test_accuracy": 100.0 * trained.test_accuracy,
           **snn_row(qat_path, snn_path, cli_convert(qat_path, snn_path, data, None), x, y)}
    if float_weights is not None:
        row["float_weight_snn_bytes"] = float_weights["snn_bytes"]
        row["size_ratio"] = float_weights["snn_bytes"] / row["snn_bytes"]
    row["seconds"] = time.perf_counter() - t0
    log(f"QAT T={steps} beta={beta:g}{tag}: SNN {row['accuracy']:.2f}%, {row['spikes_per_image']:.0f} spikes/img, "
        f"same prediction {row['same_prediction']}/{row['images']}, verified {row['verified']}, backend "
        f"{row['backend']}, {row['snn_bytes']} bytes ({row['seconds']:.0f} s)")
    return row


@torch.no_grad()
def rate_coded_prefixes(snn: nn.Module, x: torch.Tensor, y: torch.Tensor, timesteps: list[int],
                        batch: int = 500) -> dict[int, dict[str, float]]:
    """Single steps up to max(timesteps), the input current each step; at each T of `timesteps` the
    mean of the first T steps' logits and the spikes so far (a T-step multi-step run's outputs)."""
    from spikingjelly.activation_based import functional

    functional.set_step_mode(snn, "s")
    correct = {t: 0 for t in timesteps}
    spikes = {t: 0.0 for t in timesteps}
    try:
        with counting_spikes(snn) as (count, _):
            for i in range(0, len(x), batch):
                xb, yb = x[i:i + batch], y[i:i + batch]
                functional.reset_net(snn)
                count.zero_()
                total = 0
                for step in range(1, max(timesteps) + 1):
                    total = total + snn(xb)
                    if step in correct:
                        correct[step] += int(((total / step).argmax(1) == yb).sum())
                        spikes[step] += count.item()
    finally:
        functional.reset_net(snn)
    return {t: {"accuracy": 100.0 * correct[t] / len(y), "spikes_per_image": spikes[t] / len(y)} for t in timesteps}


def make_quick_data(folder: Path, train_n: int, test_n: int, seed: int = 0) -> str:
    """An .npz of Fashion-MNIST's shape for quick runs, made here so that the smoke test needs no
    data package: 10 classes of 28x28 images, each class a fixed random pattern plus noise."""
    rng = np.random.default_rng(seed)
    patterns = rng.random((10, 1, 28, 28), dtype=np.float32)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, n)
        x = np.clip(patterns[y] + 0.3 * rng.standard_normal((n, 1, 28, 28), dtype=np.float32), 0, 1)
        return x.astype(np.float32), y.astype(np.int64)

    (x_train, y_train), (x_test, y_test) = sample(train_n), sample(test_n)
    path = folder / "fashion_shaped.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    timesteps = [int(v) for v in args.timesteps.split(",")]
    betas = [float(v) for v in args.betas.split(",")]
    sj_t = [int(v) for v in args.sj_timesteps.split(",")]
    sj_modes = [m for m in args.sj_modes.split(",") if m]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ann2snn-bench-") as tmp_name:
        tmp = Path(tmp_name)
        data = make_quick_data(tmp, args.train_limit, 500) if args.quick else "fashion-mnist"
        limit = None if args.quick else args.train_limit
        test = load_dataset(data, "test")
        x, y = test.x.clone(), test.y.clone()

        t0 = time.perf_counter()
        model = train_float(data, args.float_epochs, args.float_lr, args.seed, limit)
        float_acc = pct(batched(model, x).argmax(1), y)
        sj_model = spikingjelly_copy(model)
        sj_float_acc = pct(batched(sj_model, x).argmax(1), y)
        float_path = tmp / "float.onnx"
        export_float(model, float_path)
        log(f"float ANN: {float_acc:.2f}% (SpikingJelly's copy, ReLU6 as ReLU: {sj_float_acc:.2f}%) "
            f"({time.perf_counter() - t0:.0f} s)")

        for steps in timesteps:
            t0 = time.perf_counter()
            snn_path = tmp / f"calib_T{steps}.snn"
            row = {"method": "ann2snn calibration only", "converter": "ann2snn", "T": steps, "beta": None,
                   "weight_bits": None,
                   **snn_row(float_path, snn_path, cli_convert(float_path, snn_path, data, steps), x, y),
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            log(f"calibration only T={steps}: {row['accuracy']:.2f}%, {row['spikes_per_image']:.0f} spikes/img, "
                f"same prediction {row['same_prediction']}/{row['images']} ({row['seconds']:.0f} s)")

        for steps in timesteps:
            for beta in betas:
                float_weights = qat_row(args, float_path, data, limit, steps, beta, x, y)
                rows.append(float_weights)
                if args.weight_bits:
                    rows.append(qat_row(args, float_path, data, limit, steps, beta, x, y, float_weights))

        sj_note: dict[str, Any] = {}
        if sj_modes:
            FXConverter, RateCodingRecipe, sj_note = import_spikingjelly_converter()
            calib = list(make_loader(load_dataset(data, "calib", seed=args.seed), 64, shuffle=True,
                                     seed=args.seed))[:args.sj_calib_batches]
            for label in sj_modes:
                t0 = time.perf_counter()
                kwargs = SJ_MODES[label]
                snn = FXConverter(recipe=RateCodingRecipe(dataloader=calib, **kwargs), device="cpu").convert(
                    copy.deepcopy(sj_model))
                for steps, metrics in rate_coded_prefixes(snn, x, y, sj_t).items():
                    rows.append({"method": f"SpikingJelly {label}", "converter": "spikingjelly", "mode": label,
                                 "recipe_kwargs": kwargs, "T": steps, **metrics})
                    log(f"SpikingJelly {label} T={steps}: {metrics['accuracy']:.2f}%, "
                        f"{metrics['spikes_per_image']:.0f} spikes/img")
                log(f"  ({time.perf_counter() - t0:.0f} s)")

    recommended = recommend(rows)
    recommended_int = recommend(rows, args.weight_bits) if args.weight_bits else {}
    result = {
        "benchmark": "your_model", "dataset": "fashion-mnist", "model": "SmallResNet (bench/your_model.py)",
        "accuracy_unit": "%", "quick": args.quick,
        "settings": {"train_images": args.train_limit, "test_images": len(y), "float_epochs": args.float_epochs,
                     "float_lr": args.float_lr, "qat_epochs": args.epochs, "qat_lr": args.lr, "seed": args.seed,
                     "timesteps": timesteps, "betas": betas, "sj_timesteps": sj_t, "sj_modes": sj_modes,
                     "weight_bits": args.weight_bits, "threads": args.threads},
        "float_ann_accuracy": float_acc, "spikingjelly_float_accuracy": sj_float_acc,
        "spikingjelly": sj_note, "rows": rows, "recommended": recommended,
        **({f"recommended_int{args.weight_bits}": recommended_int} if args.weight_bits else {}),
        "targets": targets(rows, recommended, float_acc), "seconds": time.perf_counter() - start,
    }
    return result


def recommend(rows: list[dict[str, Any]], weight_bits: int | None = None) -> dict[str, dict[str, Any]]:
    """Per T: the QAT row (of these weight bits) with the fewest spikes within sparsity.MAX_ACCURACY_DROP
    points of beta = 0 (bench/sparsity.py's rule), and whether it removes MIN_SPIKE_REDUCTION % of the spikes."""
    qat = [{**r, "snn_accuracy": r["accuracy"]} for r in rows
           if r["method"].startswith("ann2snn QAT") and r["weight_bits"] == weight_bits]
    return {str(steps): {"beta": c["beta"], "accuracy": c["snn_accuracy"], "spikes_per_image": c["spikes_per_image"],
                         "accuracy_drop": c["accuracy_drop"], "spike_reduction_pct": c["spike_reduction_pct"],
                         "met": c["spike_reduction_pct"] >= MIN_SPIKE_REDUCTION}
            for steps, c in fewest_spikes_within_drop(qat).items()}


def targets(rows: list[dict[str, Any]], recommended: dict[str, dict[str, Any]], float_acc: float) -> dict[str, Any]:
    out: dict[str, Any] = {"float_gap": {}, "sparsity": recommended}
    for steps, limit in MAX_GAP.items():
        for r in rows:
            if r["T"] == steps and r["converter"] == "ann2snn" and r["beta"] is not None:
                gap = float_acc - r["accuracy"]
                bits = "" if r["weight_bits"] is None else f" int{r['weight_bits']}"
                out["float_gap"][f"T={steps} beta={r['beta']:g}{bits}"] = {
                    "accuracy": r["accuracy"], "gap": gap, "limit": limit,
                    "all_predictions_equal": r["same_prediction"] == r["images"],
                    "met": gap <= limit + 1e-9 and r["same_prediction"] == r["images"]}
    return out


def report(result: dict[str, Any]) -> str:
    table = []
    for r in result["rows"]:
        ours = r["converter"] == "ann2snn"
        table.append({"method": r["method"], "T": r["T"], "acc": f"{r['accuracy']:.2f}",
                      "spikes": round(r["spikes_per_image"]),
                      "qann": f"{r['quantized_ann_accuracy']:.2f}" if ours else "",
                      "same": f"{r['same_prediction']}/{r['images']}" if ours else "",
                      "verified": ("yes" if r["verified"] else "NO") if ours else "",
                      "backend": r["backend"] if ours else "", "bytes": r["snn_bytes"] if ours else "",
                      "ratio": f"{r['size_ratio']:.2f}x" if "size_ratio" in r else ""})
    s = result["settings"]
    lines = [f"Float ANN (SmallResNet, {s['float_epochs']} epochs on {s['train_images']} training images): "
             f"{result['float_ann_accuracy']:.2f}% on {s['test_images']} test images "
             f"(SpikingJelly's copy with ReLU6 as ReLU: {result['spikingjelly_float_accuracy']:.2f}%)",
             format_table(table, ["method", "T", "acc", "spikes", "qann", "same", "verified", "backend", "bytes",
                                  "ratio"],
                          ["method", "T", "SNN accuracy", "spikes/img", "quantized ANN", "same prediction",
                           "convert verified", "backend", ".snn bytes", "float-weight .snn / this"])]
    for steps, rec in result["recommended"].items():
        lines.append(f"T={steps}: recommended beta {rec['beta']:g}: {rec['spike_reduction_pct']:.1f}% fewer spikes "
                     f"than beta = 0 for {rec['accuracy_drop']:.2f} points (target >= {MIN_SPIKE_REDUCTION:.0f}%: "
                     f"{'met' if rec['met'] else 'NOT met'})")
    for steps, rec in result.get(f"recommended_int{s['weight_bits']}", {}).items():
        lines.append(f"T={steps}, int{s['weight_bits']} weights: recommended beta {rec['beta']:g}: "
                     f"{rec['spike_reduction_pct']:.1f}% fewer spikes than beta = 0 for "
                     f"{rec['accuracy_drop']:.2f} points")
    for key, t in result["targets"]["float_gap"].items():
        lines.append(f"{key}: {t['gap']:.2f} points below float (limit {t['limit']}), every prediction equal to the "
                     f"quantized ANN's: {t['all_predictions_equal']}: {'met' if t['met'] else 'NOT met'}")
    lines.append(f"({result['seconds']:.0f} s)")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """Accuracy against T (log2) and against spikes per image (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    for ax, key in zip(axes, ("T", "spikes_per_image")):
        for method in methods:
            mine = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["T"])
            xs = [max(r[key], 1e-1) for r in mine]
            ys = [r["accuracy"] for r in mine]
            ax.plot(xs, ys, marker="o" if mine[0]["converter"] == "ann2snn" else "s", label=method)
            if key != "T":
                for r, xv, yv in zip(mine, xs, ys):
                    ax.annotate(f"T={r['T']}", (xv, yv), textcoords="offset points", xytext=(3, -9), fontsize=7)
        ax.axhline(result["float_ann_accuracy"], color="gray", linestyle="--", linewidth=1, label="float ANN")
        ax.set_xscale("log", base=2 if key == "T" else 10)
        if key == "T":
            ticks = sorted({r["T"] for r in result["rows"]})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
        else:
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("T (time steps, log scale)" if key == "T" else "spikes per image (log)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
        top = max(r["accuracy"] for r in result["rows"])
        ax.set_ylim(max(0, min(top - 15, min(r["accuracy"] for r in result["rows"]) - 1)), top + 1)
    axes[0].set_title("Fashion-MNIST, SmallResNet: accuracy against T")
    axes[1].set_title("accuracy against spikes per image")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timesteps", default="2,3,4", help="T values for ann2snn (default 2,3,4)")
    p.add_argument("--betas", default="0,5e-6,8e-6,1e-5", help="spike-regularizer weights (default 0,5e-6,8e-6,1e-5)")
    p.add_argument("--sj-timesteps", default="4,8,16,32", help="T values for SpikingJelly (default 4,8,16,32)")
    p.add_argument("--sj-modes", default="max,99.9%",
                   help=f"SpikingJelly modes, of {', '.join(SJ_MODES)}".replace("%", "%%"))   # argparse formats %
    p.add_argument("--sj-calib-batches", type=int, default=8, help="SpikingJelly calibration batches of 64")
    p.add_argument("--train-limit", type=int, default=12000, help="first N training images (default 12000)")
    p.add_argument("--float-epochs", type=int, default=6)
    p.add_argument("--float-lr", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=10, help="QAT epochs (default 10: the regularizer needs them)")
    p.add_argument("--lr", type=float, default=0.01, help="QAT learning rate")
    p.add_argument("--weight-bits", type=int, choices=[8], default=None,
                   help="also a QAT row with int8 weights (BN folded) per T and beta, from the same float.onnx")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH")
    p.add_argument("--plot", metavar="PATH")
    p.add_argument("--quick", action="store_true", help="tiny settings: 512 training and 500 test images of Fashion-MNIST's shape made here "
                   "(no data package), T=2, with the int8-weight rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.timesteps, args.betas, args.sj_timesteps, args.sj_modes = "2", "0,1e-4", "4,8", "max"
        args.train_limit, args.float_epochs, args.epochs, args.sj_calib_batches = 512, 1, 1, 2
        args.weight_bits = 8
    result = run(args)
    emit(result, report(result), args.json, args.plot, lambda path: plot(result, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
