"""ann2snn against SpikingJelly 2.0's rate-coding converter on the same digits-cnn.

One float digits-cnn is trained (as in bench/sparsity.py, same recipe and seed). SpikingJelly
converts it with `RateCodingRecipe` (ReLU -> IF neuron with soft reset between two voltage
scalers, thresholds from the calibration data), in three modes:

    max                       mode="max": the largest activation of each layer
    99.9%                     mode="99.9%": the 99.9th percentile of each layer (robust norm)
    99.9% ch + half-thr       mode="99.9%", channel_wise=True, pre_spike_maxpool=True,
                              half_threshold=True (per-channel thresholds, membrane starting at
                              half the threshold, as in SpikingJelly's ResNet-18 example)

and each SNN runs multi-step for T = 1, 2, 4, 8, 16, 32: the analog image is the input current
of every step, the output is the mean of the T steps' logits, and the spikes are the IF neurons'
outputs summed over neurons and steps. ann2snn fine-tunes the same float weights
quantization-aware for T = 1..4 (lambdas calibrated from the float activations at start), without
the spike regularizer (beta = 0) and with it (`--betas`, default 0 and 1e-4), converts them and
simulates the bit-serial SNN.

The float network has plain nn.ReLU activations, because `RateCodingRecipe` converts only
nn.ReLU modules: it is trained here by the recipe of `ann2snn.train.train` (SGD with momentum
0.9, weight decay, per-step cosine schedule, batch 64, the shuffle order of epoch e seeded with
seed + e) with the same epochs and learning rate as bench/sparsity.py's float run. (A float_only
run of `train` has trainable clipped ReLUs instead; dropping its clips to hand it to SpikingJelly
changes the network: 98.67% -> 93.78% in one run.)

    python bench/peers.py                                 # table
    python bench/peers.py --json out.json --plot out.png  # also JSON and a plot (log-x)
    python bench/peers.py --quick                         # tiny settings (smoke test)

SpikingJelly 2.0's `spikingjelly.activation_based.ann2snn/__init__.py` imports `.utils`, which
imports `requests` (for `download_url`); without `requests` installed the package does not
import. The converter and the recipes do not need it: `import_spikingjelly_converter` then
registers the package without running its `__init__.py` and imports `converter` and
`recipes.rate_coding` directly (the JSON output records which way it went).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import os
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("TQDM_DISABLE", "1")   # SpikingJelly's calibration loop draws a progress bar

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))          # bench/sparsity.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # run from a checkout without installing

from ann2snn.data.sets import load_dataset, make_loader  # noqa: E402
from ann2snn.tables import format_table  # noqa: E402
from sparsity import (QUICK, Recipe, accuracy, emit, log, snn_metrics, test_tensors, train_qat,  # noqa: E402
                      train_relu_float)

SJ_MODES: dict[str, dict[str, Any]] = {
    "max": {"mode": "max"},
    "99.9%": {"mode": "99.9%"},
    "99.9% ch + half-thr": {"mode": "99.9%", "channel_wise": True, "pre_spike_maxpool": True,
                            "half_threshold": True},
}
SJ_TIMESTEPS = (1, 2, 4, 8, 16, 32)
ANN2SNN_TIMESTEPS = (1, 2, 3, 4)
ANN2SNN_BETAS = (0.0, 1e-4)


def import_spikingjelly_converter() -> tuple[Any, Any, dict[str, Any]]:
    """(FXConverter, RateCodingRecipe, a note on how they were imported)."""
    from importlib.metadata import version

    import spikingjelly.activation_based as activation_based

    name = "spikingjelly.activation_based.ann2snn"
    note: dict[str, Any] = {"version": version("spikingjelly"), "package_import": "ok", "workaround": None}
    try:
        importlib.import_module(name)
    except ImportError as exc:   # 2.0: ann2snn/__init__ -> .utils -> requests
        note["package_import"] = f"{type(exc).__name__}: {exc}"
        note["workaround"] = (f"registered {name} as a bare package (its __init__.py not run) and imported "
                              f"{name}.converter and {name}.recipes.rate_coding directly")
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        package = types.ModuleType(name)
        package.__path__ = [str(Path(activation_based.__file__).parent / "ann2snn")]
        package.__package__ = name
        sys.modules[name] = package
        setattr(activation_based, "ann2snn", package)
    converter = importlib.import_module(f"{name}.converter")
    rate_coding = importlib.import_module(f"{name}.recipes.rate_coding")
    return converter.FXConverter, rate_coding.RateCodingRecipe, note


@torch.no_grad()
def run_rate_coded(snn: nn.Module, x: torch.Tensor, y: torch.Tensor, timesteps: int) -> dict[str, Any]:
    """Multi-step simulation: x repeated T times, logits averaged over T; spikes of every IF node."""
    from spikingjelly.activation_based import functional

    functional.set_step_mode(snn, "m")
    functional.reset_net(snn)
    try:
        with counting_spikes(snn) as (total, nodes):
            logits = snn(x.unsqueeze(0).repeat(timesteps, *([1] * x.dim()))).mean(0)
    finally:
        functional.reset_net(snn)
    return {"accuracy": accuracy(logits, y), "spikes_per_image": total.item() / len(y), "neuron_layers": nodes}


@contextlib.contextmanager
def counting_spikes(snn: nn.Module) -> Iterator[tuple[torch.Tensor, int]]:
    """While the block runs, every SpikingJelly node's output spikes summed into a float64 tensor
    (zero it to restart); yields it and the number of nodes."""
    from spikingjelly.activation_based import neuron

    total = torch.zeros((), dtype=torch.float64)
    nodes = [m for m in snn.modules() if isinstance(m, neuron.BaseNode)]
    def count(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:   # None: the output stays
        total.add_(output.double().sum())

    handles = [m.register_forward_hook(count) for m in nodes]
    try:
        yield total, len(nodes)
    finally:
        for h in handles:
            h.remove()


def run(sj_timesteps: list[int], ann2snn_timesteps: list[int], recipe: Recipe, calib_batches: int | None,
        betas: tuple[float, ...] = ANN2SNN_BETAS) -> dict[str, Any]:
    start = time.perf_counter()
    FXConverter, RateCodingRecipe, sj_note = import_spikingjelly_converter()
    x, y = test_tensors()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ann2snn-bench-") as tmp:
        float_path, ann = train_relu_float(recipe, Path(tmp))
        with torch.no_grad():
            float_accuracy = accuracy(ann(x), y)
        log(f"float ANN (ReLU): {float_accuracy:.2f}%")

        calib_set = load_dataset("digits", "calib", seed=recipe.seed)
        calib = list(make_loader(calib_set, 64, shuffle=True, seed=recipe.seed))
        if calib_batches is not None:
            calib = calib[:calib_batches]
        for label, kwargs in SJ_MODES.items():
            t0 = time.perf_counter()
            snn = FXConverter(recipe=RateCodingRecipe(dataloader=calib, **kwargs), device="cpu").convert(copy.deepcopy(ann))
            for steps in sj_timesteps:
                row = {"method": f"SpikingJelly {label}", "converter": "spikingjelly", "mode": label,
                       "recipe_kwargs": kwargs, "T": steps, **run_rate_coded(snn, x, y, steps)}
                rows.append(row)
                log(f"SpikingJelly {label} T={steps}: {row['accuracy']:.2f}%, {row['spikes_per_image']:.0f} spikes/img")
            log(f"  ({time.perf_counter() - t0:.0f} s)")

        for beta in betas:
            method = f"ann2snn (bit-serial, QAT beta={beta:g})"
            for steps in ann2snn_timesteps:
                t0 = time.perf_counter()
                metrics = snn_metrics(train_qat(recipe, float_path, steps, beta), steps, x, y)
                rows.append({"method": method, "converter": "ann2snn", "mode": "bit-serial", "beta": beta,
                             "T": steps, "accuracy": metrics["snn_accuracy"],
                             "spikes_per_image": metrics["spikes_per_image"],
                             "quantized_ann_accuracy": metrics["ann_accuracy"],
                             "same_prediction": metrics["same_prediction"], "images": metrics["images"]})
                log(f"{method} T={steps}: {metrics['snn_accuracy']:.2f}%, {metrics['spikes_per_image']:.0f} "
                    f"spikes/img ({time.perf_counter() - t0:.0f} s)")
    return {
        "benchmark": "peers", "dataset": "digits", "model": "digits-cnn", "accuracy_unit": "%",
        "recipe": recipe.to_json(), "float_ann_accuracy": float_accuracy, "float_activations": "relu",
        "spikingjelly": {**sj_note, "recipe": "RateCodingRecipe", "modes": {k: v for k, v in SJ_MODES.items()},
                         "calibration": f"{sum(len(b[1]) for b in calib)} training images in batches of 64",
                         "simulation": "multi-step, direct input repeated each step, logits averaged over T"},
        "rows": rows, "seconds": time.perf_counter() - start,
    }


def report(result: dict[str, Any]) -> str:
    rows = [{"method": r["method"], "T": r["T"], "acc": f"{r['accuracy']:.2f}",
             "spikes": round(r["spikes_per_image"])} for r in result["rows"]]
    sj = result["spikingjelly"]
    lines = [f"Float ANN (digits-cnn with ReLUs, {result['recipe']['float_epochs']} epochs), the source of both: "
             f"{result['float_ann_accuracy']:.2f}%",
             "Test accuracy (%) on the digits test images and spikes per image:",
             format_table(rows, ["method", "T", "acc", "spikes"], ["method", "T", "SNN accuracy", "spikes/img"]),
             f"SpikingJelly {sj['version']}: package import {sj['package_import']}"
             + (f"; workaround: {sj['workaround']}" if sj["workaround"] else ""),
             f"({result['seconds']:.0f} s)"]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """Accuracy against spikes per image (log-x): the whole range, and zoomed to the top 10 points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    top = max(r["accuracy"] for r in result["rows"])
    for ax, zoom in zip(axes, (False, True)):
        for method in methods:
            mine = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["T"])
            xs = [max(r["spikes_per_image"], 1e-1) for r in mine]   # log axis: a silent SNN plots at 0.1
            ys = [r["accuracy"] for r in mine]
            ax.plot(xs, ys, marker="o" if mine[0]["converter"] == "ann2snn" else "s", label=method)
            for r, xv, yv in zip(mine, xs, ys):
                if not zoom or yv >= top - 10:
                    ax.annotate(f"T={r['T']}", (xv, yv), textcoords="offset points", xytext=(3, -9), fontsize=7)
        ax.axhline(result["float_ann_accuracy"], color="gray", linestyle="--", linewidth=1, label="float ANN")
        ax.set_xscale("log")
        ax.set_xlabel("spikes per image (log)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
        if zoom:
            ax.set_ylim(top - 10, top + 0.7)
            shown = [r["spikes_per_image"] for r in result["rows"] if r["accuracy"] >= top - 10 and r["spikes_per_image"] > 0]
            if shown:
                ax.set_xlim(min(shown) / 1.5, max(shown) * 1.5)
            ax.set_title("zoom: top 10 points")
        else:
            ax.set_title("digits-cnn: ann2snn vs SpikingJelly rate coding")
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sj-timesteps", default=",".join(map(str, SJ_TIMESTEPS)),
                   help="T values for SpikingJelly (default 1,2,4,8,16,32)")
    p.add_argument("--timesteps", default=",".join(map(str, ANN2SNN_TIMESTEPS)),
                   help="T values for ann2snn (default 1,2,3,4)")
    p.add_argument("--betas", default=",".join(f"{b:g}" for b in ANN2SNN_BETAS),
                   help="spike-regularizer weights of the ann2snn runs (default 0,0.0001)")
    p.add_argument("--epochs", type=int, default=None, help="QAT epochs of the ann2snn runs")
    p.add_argument("--float-epochs", type=int, default=None, help="epochs of the float ANN")
    p.add_argument("--lr", type=float, default=None, help="QAT learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for this size)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the results as JSON to PATH (no PATH: stdout, and the table to stderr)")
    p.add_argument("--plot", metavar="PATH", help="plot accuracy against spikes per image (PNG, log-x)")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings for a smoke test: SpikingJelly T=1,4, ann2snn T=1,2, 256 training images")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = QUICK if args.quick else Recipe()
    recipe = Recipe(float_epochs=args.float_epochs or base.float_epochs, float_lr=base.float_lr,
                    epochs=args.epochs or base.epochs, lr=args.lr or base.lr, seed=args.seed,
                    train_limit=base.train_limit)
    sj_t = [int(v) for v in args.sj_timesteps.split(",")]
    ours_t = [int(v) for v in args.timesteps.split(",")]
    if args.quick:
        sj_t = sj_t if args.sj_timesteps != ",".join(map(str, SJ_TIMESTEPS)) else [1, 4]
        ours_t = ours_t if args.timesteps != ",".join(map(str, ANN2SNN_TIMESTEPS)) else [1, 2]
    betas = tuple(float(v) for v in args.betas.split(","))
    result = run(sj_t, ours_t, recipe, calib_batches=4 if args.quick else None, betas=betas)
    emit(result, report(result), args.json, args.plot, lambda path: plot(result, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
