"""Spike sparsity against accuracy on digits: the spike regularizer's beta swept per T (docs/method.md section 5).

Per seed, one float digits-cnn is trained (float_only; with `--float relu` plain ReLUs instead);
from its weights, for every T and beta, the same quantization-aware recipe (same seed, epochs,
learning rate) fine-tunes a quantized copy with loss = cross_entropy + beta * spikes per image,
which ann2snn.convert compiles; the SNN is simulated time step by time step on the 450 test
images. Reported per (T, beta), as means over the seeds (0, 1, 2 by default; one test image is
0.22 points, so one seed's differences of a few tenths are noise): the quantized ANN's and the
SNN's test accuracy (%) with the SNN's standard deviation over the seeds, how many test images
both predict alike, and the SNN's spikes per image. Per T the recommended beta is the one with
the fewest spikes whose mean SNN accuracy is at most 0.5 points below beta = 0.

    python bench/sparsity.py                                   # table (3 seeds, 2 at a time)
    python bench/sparsity.py --json out.json --plot out.png    # also JSON and a plot
    python bench/sparsity.py --json                            # JSON on stdout, table on stderr
    python bench/sparsity.py --quick                           # tiny settings (smoke test)

Acceptance targets (issue 4): at the recommended beta, at least 30% fewer spikes per image than
at beta = 0 for the same T with at most 0.5 points lower accuracy; at T = 4 the SNN within 0.3
points of the float ANN trained with the same recipe.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from ann2snn.compile.compiler import convert  # noqa: E402
from ann2snn.data.sets import load_dataset  # noqa: E402
from ann2snn.tables import format_table  # noqa: E402
from ann2snn.train import TrainConfig, train  # noqa: E402

MAX_ACCURACY_DROP = 0.5       # points, recommended beta against beta = 0
MIN_SPIKE_REDUCTION = 30.0    # %, recommended beta against beta = 0
MAX_FLOAT_GAP_T4 = 0.3        # points, SNN at T = 4 below the float ANN


@dataclass(frozen=True)
class Recipe:
    """The training recipe shared by every run of a benchmark (float and QAT)."""

    float_epochs: int = 30
    float_lr: float = 0.05
    epochs: int = 30          # quantization-aware fine-tuning
    lr: float = 0.05
    weight_decay: float = 5e-4
    per_channel: bool = False     # one lambda per channel (QAT)
    seed: int = 0
    train_limit: int | None = None   # first N training images only (quick runs)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


QUICK = Recipe(float_epochs=2, epochs=1, train_limit=256)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def test_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The 450 digits test images [N, 1, 8, 8] and labels."""
    test = load_dataset("digits", split="test")
    return test.x.clone(), test.y.clone()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in %."""
    return 100.0 * (logits.argmax(1) == labels).double().mean().item()


def train_float(recipe: Recipe, workdir: Path):
    """Train the float digits-cnn (clipped-ReLU sites, quantize=False); returns (weights path, result)."""
    path = workdir / "digits_float.safetensors"
    start = time.perf_counter()
    result = train(TrainConfig(model="digits-cnn", data="digits", float_only=True, epochs=recipe.float_epochs,
                               lr=recipe.float_lr, weight_decay=recipe.weight_decay, seed=recipe.seed,
                               train_limit=recipe.train_limit, output=str(path)), progress=False)
    log(f"float ANN: {100 * result.test_accuracy:.2f}% ({time.perf_counter() - start:.0f} s)")
    return path, result


def train_relu_float(recipe: Recipe, workdir: Path) -> tuple[Path, nn.Module]:
    """The zoo digits-cnn with its plain nn.ReLU activations, trained by the float recipe (`train` with
    float_activation="plain"); returns (safetensors state dict, model on the CPU in eval mode)."""
    path = workdir / "digits_float_relu.safetensors"
    start = time.perf_counter()
    result = train(TrainConfig(model="digits-cnn", data="digits", float_only=True, float_activation="plain",
                               epochs=recipe.float_epochs, lr=recipe.float_lr, weight_decay=recipe.weight_decay,
                               seed=recipe.seed, train_limit=recipe.train_limit, output=str(path)), progress=False)
    log(f"float ANN (ReLU): {100 * result.test_accuracy:.2f}% ({time.perf_counter() - start:.0f} s)")
    return path, result.model.cpu().eval()


def train_qat(recipe: Recipe, init: Path, timesteps: int, beta: float) -> torch.nn.Module:
    """Quantization-aware fine-tuning from the float weights; returns the model (CPU, eval mode)."""
    result = train(TrainConfig(model="digits-cnn", data="digits", timesteps=timesteps, beta=beta,
                               epochs=recipe.epochs, lr=recipe.lr, weight_decay=recipe.weight_decay,
                               per_channel=recipe.per_channel, seed=recipe.seed,
                               train_limit=recipe.train_limit, init=str(init)), progress=False)
    return result.model.cpu().eval()


def snn_metrics(model: torch.nn.Module, timesteps: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Convert `model` and simulate the SNN on (x, y): accuracies in %, spikes per image."""
    with torch.no_grad():
        ann_prediction = model(x).argmax(1)
    snn = convert(model, T=timesteps)
    out = snn.simulate(x)
    snn_prediction = out.logits.argmax(1)
    spikes = sum(c.double().sum().item() for c in out.spikes.values()) / len(y)
    return {
        "ann_accuracy": 100.0 * (ann_prediction == y).double().mean().item(),
        "snn_accuracy": accuracy(out.logits, y),
        "same_prediction": int((snn_prediction == ann_prediction).sum()),
        "images": len(y),
        "spikes_per_image": spikes,
        "spikes_per_site": {k: v.double().mean().item() for k, v in out.spikes.items()},
    }


def recommend(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per T: the row with the fewest spikes whose SNN accuracy is at most MAX_ACCURACY_DROP points
    below that T's beta = 0 row (beta = 0 itself when no other qualifies)."""
    chosen = {}
    for steps in sorted({r["T"] for r in rows}):
        mine = [r for r in rows if r["T"] == steps]
        base = next((r for r in mine if r["beta"] == 0), None)
        if base is None:
            continue
        ok = [r for r in mine if r["snn_accuracy"] >= base["snn_accuracy"] - MAX_ACCURACY_DROP - 1e-9]
        best = min(ok, key=lambda r: (r["spikes_per_image"], r["beta"]))
        chosen[steps] = {
            "T": steps, "beta": best["beta"], "snn_accuracy": best["snn_accuracy"],
            "spikes_per_image": best["spikes_per_image"],
            "beta0_snn_accuracy": base["snn_accuracy"], "beta0_spikes_per_image": base["spikes_per_image"],
            "accuracy_drop": base["snn_accuracy"] - best["snn_accuracy"],
            "spike_reduction_pct": 100.0 * (1 - best["spikes_per_image"] / base["spikes_per_image"]),
        }
    return chosen


def check_targets(recommended: dict[int, dict[str, Any]], rows: list[dict[str, Any]],
                  float_accuracy: float) -> dict[str, Any]:
    targets: dict[str, Any] = {"sparsity": {}}
    for steps, rec in recommended.items():
        targets["sparsity"][str(steps)] = {
            "met": rec["spike_reduction_pct"] >= MIN_SPIKE_REDUCTION and rec["accuracy_drop"] <= MAX_ACCURACY_DROP + 1e-9,
            "spike_reduction_pct": rec["spike_reduction_pct"], "accuracy_drop": rec["accuracy_drop"],
        }
    t4 = [r for r in rows if r["T"] == 4]
    if t4 and 4 in recommended:
        base = next(r for r in t4 if r["beta"] == 0)
        rec = recommended[4]
        targets["t4_vs_float"] = {
            "float_accuracy": float_accuracy,
            "beta0": {"snn_accuracy": base["snn_accuracy"], "gap": float_accuracy - base["snn_accuracy"],
                      "met": float_accuracy - base["snn_accuracy"] <= MAX_FLOAT_GAP_T4 + 1e-9},
            "recommended": {"beta": rec["beta"], "snn_accuracy": rec["snn_accuracy"],
                            "gap": float_accuracy - rec["snn_accuracy"],
                            "met": float_accuracy - rec["snn_accuracy"] <= MAX_FLOAT_GAP_T4 + 1e-9},
        }
    return targets


def plot(rows: list[dict[str, Any]], float_accuracy: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for steps in sorted({r["T"] for r in rows}):
        mine = sorted((r for r in rows if r["T"] == steps), key=lambda r: r["beta"])
        xs = [r["spikes_per_image"] for r in mine]
        ys = [r["snn_accuracy"] for r in mine]
        line, = ax.plot(xs, ys, marker="o", label=f"T = {steps}")
        ax.errorbar(xs, ys, yerr=[r["snn_accuracy_std"] for r in mine], linestyle="none", color=line.get_color(),
                    capsize=2, linewidth=0.8)
        chosen = [r for r in mine if r.get("recommended")]
        ax.plot([r["spikes_per_image"] for r in chosen], [r["snn_accuracy"] for r in chosen], marker="*",
                markersize=14, linestyle="none", color=line.get_color())
        for r, xv, yv in zip(mine, xs, ys):
            ax.annotate(f"{r['beta']:g}", (xv, yv), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.axhline(float_accuracy, color="gray", linestyle="--", linewidth=1, label="float ANN")
    ax.set_xlabel("spikes per image")
    ax.set_ylabel("SNN test accuracy (%)")
    ax.set_title("digits-cnn: beta annotated, * recommended (mean, std over seeds)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_seed(timesteps: list[int], betas: list[float], recipe: Recipe, float_kind: str = "clipped",
             threads: int = 1) -> dict[str, Any]:
    """One seed: the float ANN, then QAT and the simulated SNN for every (T, beta)."""
    torch.set_num_threads(threads)
    x, y = test_tensors()
    with tempfile.TemporaryDirectory(prefix="ann2snn-bench-") as tmp:
        if float_kind == "relu":
            float_path, float_model = train_relu_float(recipe, Path(tmp))
            with torch.no_grad():
                float_accuracy = accuracy(float_model(x), y)
        else:
            float_path, float_result = train_float(recipe, Path(tmp))
            float_accuracy = 100.0 * float_result.test_accuracy
        rows = []
        for steps in timesteps:
            for beta in betas:
                t0 = time.perf_counter()
                model = train_qat(recipe, float_path, steps, beta)
                row = {"T": steps, "beta": beta, "seed": recipe.seed, **snn_metrics(model, steps, x, y),
                       "seconds": time.perf_counter() - t0}
                rows.append(row)
                log(f"seed={recipe.seed} T={steps} beta={beta:g}: SNN {row['snn_accuracy']:.2f}%, "
                    f"{row['spikes_per_image']:.0f} spikes/img ({row['seconds']:.0f} s)")
    return {"seed": recipe.seed, "float_ann_accuracy": float_accuracy, "rows": rows}


def mean_over_seeds(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (T, beta): accuracies and spikes averaged over the seeds (with the SNN accuracy's
    standard deviation), prediction agreement summed, and every seed's own figures."""
    merged = []
    for first in runs[0]["rows"]:
        mine = [next(r for r in run["rows"] if r["T"] == first["T"] and r["beta"] == first["beta"]) for run in runs]
        snn = torch.tensor([r["snn_accuracy"] for r in mine], dtype=torch.float64)
        merged.append({
            "T": first["T"], "beta": first["beta"], "seeds": len(mine),
            "ann_accuracy": sum(r["ann_accuracy"] for r in mine) / len(mine),
            "snn_accuracy": snn.mean().item(),
            "snn_accuracy_std": snn.std().item() if len(mine) > 1 else 0.0,
            "same_prediction": sum(r["same_prediction"] for r in mine),
            "images": sum(r["images"] for r in mine),
            "spikes_per_image": sum(r["spikes_per_image"] for r in mine) / len(mine),
            "per_seed": [{k: r[k] for k in ("seed", "ann_accuracy", "snn_accuracy", "spikes_per_image",
                                             "same_prediction", "spikes_per_site", "seconds")} for r in mine],
        })
    return merged


def run(timesteps: list[int], betas: list[float], recipe: Recipe, float_kind: str = "clipped",
        seeds: list[int] | None = None, jobs: int = 1, threads: int = 1) -> dict[str, Any]:
    """Every seed's sweep (`jobs` seeds at a time, each in its own process), averaged over the seeds."""
    start = time.perf_counter()
    if 0.0 not in betas:
        betas = [0.0] + betas
    seeds = seeds or [recipe.seed]
    recipes = [dataclasses.replace(recipe, seed=seed) for seed in seeds]
    if jobs > 1 and len(seeds) > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(jobs, len(seeds)), mp_context=context) as pool:
            runs = list(pool.map(run_seed, *zip(*[(timesteps, betas, r, float_kind, threads) for r in recipes])))
    else:
        runs = [run_seed(timesteps, betas, r, float_kind, threads) for r in recipes]
    rows = mean_over_seeds(runs)
    float_accuracy = sum(r["float_ann_accuracy"] for r in runs) / len(runs)
    recommended = recommend(rows)
    for row in rows:
        base = next(r for r in rows if r["T"] == row["T"] and r["beta"] == 0)
        row["spike_reduction_pct"] = 100.0 * (1 - row["spikes_per_image"] / base["spikes_per_image"])
        row["recommended"] = recommended[row["T"]]["beta"] == row["beta"]
    return {
        "benchmark": "sparsity", "dataset": "digits", "model": "digits-cnn", "accuracy_unit": "%",
        "recipe": {**recipe.to_json(), "seed": None}, "seeds": seeds, "timesteps": timesteps, "betas": betas,
        "float_activations": float_kind, "float_ann_accuracy": float_accuracy,
        "float_ann_accuracy_per_seed": {str(r["seed"]): r["float_ann_accuracy"] for r in runs},
        "rows": rows, "recommended": [recommended[t] for t in sorted(recommended)],
        "targets": check_targets(recommended, rows, float_accuracy),
        "seconds": time.perf_counter() - start,
    }


def report(result: dict[str, Any]) -> str:
    rows = [{**r, "same": f"{r['same_prediction']}/{r['images']}", "beta": f"{r['beta']:g}",
             "spikes": round(r["spikes_per_image"]), "reduction": f"{r['spike_reduction_pct']:.1f}%",
             "rec": "*" if r["recommended"] else "",
             "ann": f"{r['ann_accuracy']:.2f}", "snn": f"{r['snn_accuracy']:.2f}",
             "std": f"{r['snn_accuracy_std']:.2f}"} for r in result["rows"]]
    seeds = ",".join(map(str, result["seeds"]))
    kind = "clipped ReLUs, float_only" if result["float_activations"] == "clipped" else "plain ReLUs"
    lines = [f"Float ANN (digits-cnn, {kind}, {result['recipe']['float_epochs']} epochs): "
             f"{result['float_ann_accuracy']:.2f}% test accuracy (mean over seeds {seeds})",
             f"Test accuracy (%) on the digits test images and spikes per image of the SNN, per (T, beta), "
             f"mean over seeds {seeds} (std: the SNN accuracy's standard deviation over them):",
             format_table(rows, ["T", "beta", "ann", "snn", "std", "same", "spikes", "reduction", "rec"],
                          ["T", "beta", "quantized ANN", "SNN", "std", "same prediction", "spikes/img",
                           "vs beta=0", "recommended"]),
             "",
             f"Recommended beta per T (fewest spikes, SNN accuracy at most {MAX_ACCURACY_DROP} points below beta=0):"]
    targets = result["targets"]
    for rec in result["recommended"]:
        ok = targets["sparsity"][str(rec["T"])]["met"]
        lines.append(f"  T={rec['T']}: beta={rec['beta']:g}, {rec['spikes_per_image']:.0f} spikes/img "
                     f"({rec['spike_reduction_pct']:.1f}% fewer than beta=0), accuracy "
                     f"{rec['snn_accuracy']:.2f}% ({-rec['accuracy_drop'] + 0.0:+.2f} points); "
                     f"target (>= {MIN_SPIKE_REDUCTION:.0f}% fewer, <= {MAX_ACCURACY_DROP} points lower): "
                     f"{'met' if ok else 'NOT met'}")
    if "t4_vs_float" in targets:
        t4 = targets["t4_vs_float"]
        for key, label in (("beta0", "beta=0"), ("recommended", f"recommended beta={t4['recommended'].get('beta', 0):g}")):
            entry = t4[key]
            lines.append(f"  T=4 SNN vs float ANN at {label}: {entry['snn_accuracy']:.2f}% vs "
                         f"{t4['float_accuracy']:.2f}% ({-entry['gap'] + 0.0:+.2f} points); target "
                         f"(<= {MAX_FLOAT_GAP_T4} points below): {'met' if entry['met'] else 'NOT met'}")
    lines.append(f"({result['seconds']:.0f} s)")
    return "\n".join(lines)


def emit(result: dict[str, Any], text: str, json_path: str | None, plot_path: str | None = None,
         draw: Callable[[str], None] | None = None) -> None:
    """The table on stdout, and the JSON at `json_path`; with json_path "-" the JSON on stdout and
    the table on stderr. With `plot_path`, `draw(plot_path)` draws the figure there."""
    if json_path == "-":
        print(text, file=sys.stderr)
        print(json.dumps(result, indent=2))
    else:
        print(text)
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    if plot_path:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        draw(plot_path)


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


DEFAULT_BETAS = "0,1e-5,3e-5,1e-4,3e-4,1e-3,3e-3"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timesteps", default="2,3,4", help="comma-separated T values (default 2,3,4)")
    p.add_argument("--betas", default=DEFAULT_BETAS, help=f"comma-separated betas; 0 is always added "
                   f"(default {DEFAULT_BETAS})")
    p.add_argument("--epochs", type=int, default=None, help="QAT epochs per run")
    p.add_argument("--float-epochs", type=int, default=None, help="epochs of the float ANN")
    p.add_argument("--lr", type=float, default=None, help="QAT learning rate")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; results are their means (default 0,1,2)")
    p.add_argument("--jobs", type=int, default=2, help="seeds run at a time, each in its own process (default 2)")
    p.add_argument("--float", dest="float_kind", choices=("clipped", "relu"), default="clipped",
                   help="the float ANN QAT starts from: `train(float_only=True)` with trainable clipped ReLUs "
                        "(default), or plain ReLUs trained by the same recipe (lambdas then calibrated at QAT start)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: fastest for this network, and robust on a busy machine)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the results as JSON to PATH (no PATH: stdout, and the table to stderr)")
    p.add_argument("--plot", metavar="PATH", help="plot SNN accuracy against spikes per image (PNG)")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings for a smoke test: T=2, betas 0 and 1e-3, seed 0, 256 training images, 1-2 epochs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = QUICK if args.quick else Recipe()
    recipe = Recipe(float_epochs=args.float_epochs or base.float_epochs, float_lr=base.float_lr,
                    epochs=args.epochs or base.epochs, lr=args.lr or base.lr, train_limit=base.train_limit)
    seeds = parse_ints(args.seeds) if not args.quick or args.seeds != "0,1,2" else [0]
    timesteps = parse_ints(args.timesteps) if not args.quick or args.timesteps != "2,3,4" else [2]
    betas = parse_floats(args.betas) if not args.quick or args.betas != DEFAULT_BETAS else [0.0, 1e-3]
    result = run(timesteps, betas, recipe, args.float_kind, seeds, args.jobs, args.threads)
    emit(result, report(result), args.json, args.plot,
         lambda path: plot(result["rows"], result["float_ann_accuracy"], path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
