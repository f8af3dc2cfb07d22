"""The `ann2snn` command."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

import ann2snn
from ann2snn.console.output import EXIT_VERIFICATION_FAILED, reports_errors, strict_json
from ann2snn.errors import Ann2SnnError
from ann2snn.train.export import MAX_EXPORT_TIMESTEPS   # train and demo export uint8 QDQ: T <= 8
from ann2snn.levels import MAX_TIMESTEPS
from ann2snn.console.paths import check_device, check_output
from ann2snn.console.tables import channel_summary, site_rows, snn_summary
from ann2snn.tables import format_table
from ann2snn.models import MODEL_NAMES
from ann2snn.console.options import (batch_size_option, min_agreement_option, run_batch_size_option, sample_shape,
                             weight_bits_option, zoo_model_or_onnx_file)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(ann2snn.__version__, prog_name="ann2snn")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Compile trained ANNs into error-free, ultra-low-latency bit-serial spiking neural networks.

    Exit codes: 0 success; 1 the conversion was built but failed verification (nothing written);
    2 bad input or usage (one line naming the file and the problem); 3 an internal error.
    """


@cli.command()
@click.option("-T", "timesteps", multiple=True, type=click.IntRange(1, MAX_EXPORT_TIMESTEPS), default=(2, 3, 4),
              show_default=True,
              help="Time steps to convert at (repeat the option for several).")
@click.option("--out", "output_dir", type=click.Path(file_okay=False), default="runs/demo", show_default=True,
              help="Folder for the trained weights, ONNX exports and .snn files.")
@click.option("--epochs", type=click.IntRange(1), default=30, show_default=True,
              help="Epochs of float training and of each quantization-aware fine-tuning.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@reports_errors
def demo(timesteps, output_dir, epochs, as_json):
    """Train a small CNN on scikit-learn's digits, convert it at T = 2, 3, 4, compare ANN and SNN."""
    from ann2snn.train.demo import run_demo

    rows = run_demo(tuple(timesteps), output_dir, float_epochs=epochs, qat_epochs=epochs, progress=not as_json)
    if as_json:
        click.echo(strict_json({"rows": rows, "output_dir": output_dir}))
        return
    accuracies = ("float ANN", "quantized ANN", "SNN")
    percent = [{**row, **{k: 100 * row[k] for k in accuracies}} for row in rows]
    click.echo("Test accuracy (%) on the 450 held-out digits, and spikes per image of the SNN:")
    click.echo(format_table(percent, ["T", *accuracies, "same prediction", "spikes/img"]))
    click.echo(f"weights, ONNX exports and .snn files in {output_dir}/")


@cli.command()
@click.option("--model", "model_name", default="digits-cnn", show_default=True, callback=zoo_model_or_onnx_file,
              metavar="NAME|FILE.onnx", help=f"A zoo model ({', '.join(MODEL_NAMES)}) or a float ONNX file to fine-tune.")
@click.option("--data", default="digits", show_default=True, metavar="DATA",
              help="digits, fashion-mnist, mnist, an .npz with x and y, a folder of IDX files, or an image folder "
                   "with train/ and val/.")
@click.option("-T", "timesteps", type=click.IntRange(1, MAX_EXPORT_TIMESTEPS), default=3, show_default=True,
              help="Time steps of the SNN: the sites get L = 2^T - 1 levels.")
@click.option("--beta", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Weight of the spike regularizer (spikes per image, docs/method.md section 5).")
@click.option("--epochs", type=click.IntRange(1), default=40, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default=None,
              help="SGD with momentum 0.9, or Adam (default: adam when fine-tuning, else sgd).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None,
              help="Peak learning rate of the cosine schedule (default: sgd 0.05 from scratch and 0.01 when "
                   "fine-tuning, adam 0.001).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--per-channel", is_flag=True, help="One lambda per output channel instead of per layer.")
@weight_bits_option
@click.option("--float-weight-epochs", type=int, default=None, metavar="N",
              help="With --weight-bits from scratch: train float weights with BN for the first N epochs, then "
                   "fold BN and train int8 weights (default: half of --epochs; 0 when fine-tuning).")
@click.option("--validation", type=float, default=None, metavar="FRACTION",
              help="Hold out this share of the training split (never trained on) for the fine-tuning guard's "
                   "choice of the best epoch (default: 0.1 when fine-tuning, else 0).")
@click.option("--float", "float_only", is_flag=True, help="Train the float ANN (clipped ReLUs, no quantization).")
@click.option("--float-activation", type=click.Choice(["clipped", "plain"]), default="clipped", show_default=True,
              help="With --float: clipped ReLUs with a trainable lambda, or the model's plain ReLUs.")
@click.option("--max-grad-norm", type=click.FloatRange(0, min_open=True), default=None,
              help="Clip the gradient's global norm to this before each step (default: no clipping).")
@click.option("--init", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Start from these weights: a safetensors state dict or an ONNX file.")
@click.option("--resume", is_flag=True, help="Continue from OUTPUT's checkpoint (OUTPUT.ckpt).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="The exported ONNX file (QDQ; float with --float); weights go beside it as .safetensors.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@reports_errors
def train(model_name, data, timesteps, beta, epochs, optimizer, lr, batch_size, per_channel, weight_bits,
          float_weight_epochs, validation, float_only, float_activation, max_grad_norm, init, resume, device, workers,
          seed, output, as_json):
    """Train a sparsity-regularized quantized source ANN and export it to ONNX for `convert`.

    Fine-tuning (--model FILE.onnx or --init): the starting model's accuracy on the validation
    split (--validation of the training split, held out from training; never the test split) is
    measured before the first step; an epoch whose loss is not finite or whose validation
    accuracy falls more than 5 points below the start restores the best weights and halves
    the learning rate (3 times, then the run stops), each time with a warning line on stderr; the
    best epoch by validation accuracy, the starting model included, is what is written, and the
    test accuracy reported is that model's. When no epoch
    beat the starting model, the starting model is written, with a warning line saying so (exit
    code 0; the JSON's fine_tune.best_epoch is 0). With --beta above 0 the starting model is no
    candidate: the best epoch that did not diverge is written, with a warning line if it is below
    the starting model's accuracy (fine_tune.below_start).
    """
    from ann2snn.train import TrainConfig, is_onnx_source, train as run_training

    weights = str(Path(output).with_suffix(".safetensors"))
    check_device(device)
    for written in (output, weights, weights + ".ckpt"):
        check_output(written, data, init)
    config = TrainConfig(model=model_name, data=data, timesteps=timesteps, beta=beta, epochs=epochs, lr=lr,
                         optimizer=optimizer, fine_tune=init is not None or is_onnx_source(model_name),
                         batch_size=batch_size, per_channel=per_channel, weight_bits=weight_bits,
                         float_weight_epochs=float_weight_epochs, validation=validation, float_only=float_only,
                         float_activation=float_activation, max_grad_norm=max_grad_norm, init=init,
                         resume=resume, device=device, workers=workers, seed=seed, output=weights, onnx=output)
    result = run_training(config, progress=not as_json)
    from ann2snn.runtime import distributed

    if not distributed.init_from_env(device).is_main:  # under torchrun, process 0 reports
        return
    summary = {"onnx": output, "weights": weights, "checkpoint": weights + ".ckpt",
               "optimizer": config.optimizer_name, "lr": config.learning_rate, **result.to_json()}
    if as_json:
        click.echo(strict_json(summary))
        return
    click.echo(format_table([{"epoch": h["epoch"], "loss": h["loss"], "train acc": 100 * h["train_acc"],
                              "test acc": 100 * h["test_acc"], "spikes/img": h["spikes_per_image"]}
                             for h in result.history[-5:]],
                            ["epoch", "loss", "train acc", "test acc", "spikes/img"]))
    tuned = result.fine_tune
    best = "" if tuned is None else \
        f" (epoch {tuned['best_epoch']}, the best by validation accuracy {100 * tuned['best_accuracy']:.2f}%; " \
        f"the starting model's {100 * tuned['start_accuracy']:.2f}%)"
    click.echo(f"test accuracy {100 * result.test_accuracy:.2f}%{best}, {result.spikes_per_image:.1f} spikes/img; "
               f"wrote {output} and {weights}")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-T", "timesteps", type=click.IntRange(1, MAX_TIMESTEPS), default=None,
              help="Time steps (default: from the model's QDQ level count).")
@click.option("--calib", "calib", default=None, metavar="DATA",
              help="Calibration data: digits, an .npz with x and y, or an image folder.")
@click.option("--calib-samples", type=click.IntRange(1), default=512, show_default=True)
@click.option("--percentile", type=click.FloatRange(50, 100), default=99.99, show_default=True,
              help="Percentile of activations that sets lambda of a float site.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Output .snn file (default: MODEL with suffix .snn).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare the SNN with onnxruntime's run of MODEL.")
@click.option("--verify-data", default=None, metavar="DATA",
              help="Inputs for verification (default: the --calib data; with neither, uniform noise).")
@click.option("--verify-samples", type=click.IntRange(1), default=64, show_default=True,
              help="Verification inputs, drawn at random across classes.")
@click.option("--output-name", "graph_output", default=None, metavar="NAME",
              help="The graph output with the logits, for a model with several (the others are dropped).")
@click.option("--input-shape", default=None, metavar="C,H,W", callback=lambda _c, _p, v: sample_shape(v),
              help="A sample's shape, for an input with dynamic dimensions (default: the --calib data's).")
@min_agreement_option
@batch_size_option
@click.option("--integer/--no-integer", default=None,
              help="Run on integers (int8 weights, int32 membranes: docs/integer.md). Default: where the file's "
                   "layers have int8 weights and the SNN lowers; --integer refuses a file that does not.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@reports_errors
def convert(model, timesteps, calib, calib_samples, percentile, output, verify, verify_data, verify_samples,
            graph_output, input_shape, min_agreement, batch_size, integer, as_json):
    """Convert an ONNX CNN into a bit-serial SNN, verify it, and save it as .snn."""
    from ann2snn.errors import VerificationError
    from ann2snn.verify.verification import describe_verification

    out = check_output(output if output else Path(model).with_suffix(".snn"), model, calib)
    try:
        snn = ann2snn.convert_onnx(model, timesteps, calib, verify, calib_samples=calib_samples, percentile=percentile,
                                   verify_data=verify_data, verify_samples=verify_samples, output_name=graph_output,
                                   input_shape=input_shape, min_agreement=min_agreement, batch_size=batch_size,
                                   progress=not as_json, integer=integer)
        snn.save(out)
    except VerificationError as failed:
        snn, out = failed.snn, None
    check = snn.report.verification
    result = {"model": model, "timesteps": snn.timesteps, "source": snn.source.to_json(), "backend": snn.backend,
              "integer_layers": len(snn.integer_layers), "sites": [{"site": k, **v} for k, v in snn.report.sites.items()], "rewrites": snn.report.rewrites,
              **({"verify": check.to_json()} if check is not None else {}), **({"output": str(out)} if out else {})}
    if as_json:
        click.echo(strict_json(result))
    else:
        click.echo(f"{model}: {len(snn.report.sites)} activation sites, T = {snn.timesteps}, source {snn.source.kind}")
        if snn.backend == "integer":
            click.echo(f"integer SNN: {len(snn.integer_layers)} layers with int8 weights and int32 accumulators")
        click.echo(format_table(site_rows(snn), ["site", "levels", "T", "lambda", "theta", "bias shift"]))
        for rewrite in snn.report.rewrites:
            click.echo("rewrite: " + ", ".join(f"{k}={v}" for k, v in rewrite.items()))
        if check is not None:
            click.echo(describe_verification(check))
        click.echo(f"wrote {out}" if out else "no output written: verification failed")
    if out is None:
        sys.exit(EXIT_VERIFICATION_FAILED)


@cli.command(name="verify")
@click.argument("snn_path", metavar="MODEL.snn", type=click.Path(dir_okay=False))
@click.option("--against", "source_path", required=True, type=click.Path(dir_okay=False), metavar="SOURCE.onnx",
              help="The ONNX file MODEL.snn was converted from.")
@click.option("--data", "data", default=None, metavar="DATA",
              help="Inputs: digits, an .npz with x and y, or an image folder (default: uniform noise).")
@click.option("--samples", type=click.IntRange(1), default=64, show_default=True,
              help="Inputs drawn from DATA (at random, across classes).")
@min_agreement_option
@batch_size_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@reports_errors
def verify_command(snn_path, source_path, data, samples, min_agreement, batch_size, as_json):
    """Prove an existing .snn exact for its source (exit 0), or show where it is not (exit 1)."""
    from ann2snn.runtime.artifact import file_sha256
    from ann2snn.frontend.source import quantized_onnx
    from ann2snn.verify.verification import describe_verification, verify_converted

    snn = ann2snn.load_snn(snn_path)
    if snn.source.sha256 not in (None, file_sha256(source_path)):
        raise Ann2SnnError(f"{snn_path}: converted from a file with another SHA-256 than {source_path} "
                           f"({snn.source.file})")
    clips = {site: entry["lambda"] for site, entry in snn.report.sites.items() if "lambda" in entry}
    steps = {entry.get("timesteps") for entry in snn.report.sites.values()}
    source_graph, _ = quantized_onnx(source_path, snn.timesteps if len(steps) == 1 else None, clips=clips,
                                     output=snn.source.output, input_shape=snn.source.input_shape)
    check = verify_converted(source_path, snn, source_graph, data, None, None, samples, min_agreement,
                             batch_size=batch_size, progress=not as_json)
    if as_json:
        click.echo(strict_json({"model": snn_path, "against": source_path, **check.to_json()}))
    else:
        click.echo(f"{snn_path} against {source_path}:")
        click.echo(describe_verification(check))
    if not check.passed:
        sys.exit(EXIT_VERIFICATION_FAILED)


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@reports_errors
def inspect(path, as_json):
    """Summarize an .onnx or .snn file: ops (supported or not) and activation sites; of an .snn also
    its size and each layer's weight dtype."""
    if path.lower().endswith(".snn"):
        summary = snn_summary(path)
    else:
        from ann2snn.frontend.importer import inspect_onnx

        summary = {"kind": "onnx", **inspect_onnx(path)}
    if as_json:
        click.echo(strict_json(summary))
        return
    for key, value in summary.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            click.echo(f"{key}:")
            rows = [{"name": k, **{kk: channel_summary(vv) if isinstance(vv, list) else vv for kk, vv in v.items()
                                   if not isinstance(vv, dict)}} for k, v in value.items()]
            columns = list(dict.fromkeys(c for r in rows for c in r))
            click.echo(format_table(rows, columns))
        else:
            click.echo(f"{key}: {value}")


@cli.command(name="eval")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, metavar="DATA",
              help="digits, an .npz with x and y, or an image folder (its val/ split when it has one).")
@run_batch_size_option
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--mode", type=click.Choice(["evaluate", "simulate"]), default="evaluate", show_default=True,
              help="evaluate: time-folded fast path; simulate: time-stepped spike planes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@reports_errors
def eval_command(model, data, batch_size, workers, device, mode, as_json):
    """Top-1/top-5 accuracy, spikes per image per layer and images per second of an .snn on DATA."""
    from ann2snn.runtime import distributed
    from ann2snn.data.sets import load_dataset, make_loader
    from ann2snn.runtime.scoring import auto_batch_size, score_snn
    from ann2snn.runtime.memory import stage

    check_device(device)
    context = distributed.init_from_env(device)
    device = distributed.local_device(device, context)
    snn = ann2snn.load_snn(model)
    dataset = distributed.shard(load_dataset(data, split="test"), context)
    batch_size = batch_size or auto_batch_size(snn, dataset, mode)
    loader = make_loader(dataset, batch_size, workers=workers, pin_memory=device.startswith("cuda"))
    with stage(f"eval ({mode})", "--batch-size"):
        result = score_snn(snn, loader, mode=mode, device=device, progress=not as_json and context.is_main,
                              total=len(loader), context=context)
    if not context.is_main:
        return
    if as_json:
        click.echo(strict_json(result.to_json()))
        return
    rows = [{"layer": name, "spikes/img": count} for name, count in result.layer_spikes_per_image.items()]
    click.echo(format_table(rows, ["layer", "spikes/img"]))
    click.echo(f"{result.images} images ({mode}, {result.device}): top-1 {100 * result.top1:.2f}%, "
               f"top-5 {100 * result.top5:.2f}%, {result.spikes_per_image:.1f} spikes/img, "
               f"{result.images_per_second:.1f} img/s")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, metavar="DATA",
              help="digits, an .npz with x and y, or an image folder (its val/ split when it has one).")
@click.option("--table", "table", default=None, metavar="NAME|FILE",
              help="Energy table: fp32-45nm or int8-45nm (Horowitz, ISSCC 2014), or your own JSON file "
                   "(default: int8-45nm where the layers after the first hold int8 weights, else fp32-45nm).")
@click.option("--samples", type=click.IntRange(1), default=None,
              help="Count over the first N images (default: the whole split).")
@run_batch_size_option
@click.option("--mode", type=click.Choice(["evaluate", "simulate"]), default="evaluate", show_default=True,
              help="evaluate: popcounts of the levels (fast); simulate: time-stepped spike planes (same counts).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--neuron-updates", is_flag=True, help="Add neurons * T * E_neuron_update to the SNN's energy.")
@click.option("--memory", is_flag=True, help="Add memory traffic: weight reads and neuron state reads/writes.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a plot of per-layer spike rate and energy (e.g. energy.png).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@reports_errors
def energy(model, data, table, samples, batch_size, mode, device, neuron_updates, memory, plot, as_json):
    """Spikes, synaptic operations and energy per layer of an .snn against the same ANN (docs/method.md section 6)."""
    from ann2snn.runtime import distributed
    from ann2snn.data.sets import draw, load_dataset, make_loader
    from ann2snn.energy import count_operations, default_table, estimate_energy, format_report, load_table, plot_energy
    from ann2snn.runtime.scoring import COUNTING_COPIES, auto_batch_size
    from ann2snn.runtime.memory import stage

    check_device(device)
    if plot:
        check_output(plot, model, table)
    energy_table = load_table(table) if table is not None else None   # a bad table refused before any work
    context = distributed.init_from_env(device)
    device = distributed.local_device(device, context)
    snn = ann2snn.load_snn(model)
    choice = "--table"
    if energy_table is None:
        name, choice = default_table(snn.weight_dtypes())
        energy_table = load_table(name)
    if neuron_updates:
        energy_table.require("neuron_update", "--neuron-updates")
    if memory:
        energy_table.require("memory_weight", "--memory")
        energy_table.require("memory_state", "--memory")
    dataset = draw(load_dataset(data, split="test"), samples)   # at random, across classes
    batch_size = batch_size or auto_batch_size(snn, dataset, mode, COUNTING_COPIES, labels=False)
    loader = make_loader(distributed.shard(dataset, context), batch_size)
    with stage(f"energy ({mode})", "--batch-size"):
        counts = count_operations(snn, loader, mode=mode, device=device, progress=not as_json and context.is_main,
                                  total=len(loader), context=context)
    if not context.is_main:
        return
    report = estimate_energy(counts, energy_table, neuron_updates=neuron_updates, memory=memory)
    if plot:
        plot_energy(report, plot)
    if as_json:
        click.echo(strict_json({"model": model, "data": data, **report.to_json(), "table_choice": choice,
                               **({"plot": plot} if plot else {})}))
        return
    click.echo(f"{model} on {data}:")
    if choice != "--table":
        click.echo(choice)
    click.echo(format_report(report))
    if plot:
        click.echo(f"wrote {plot}")


def exit_on_signal(signum: int, frame) -> None:
    """SIGTERM unwinds like Ctrl-C (SystemExit 143), so an interrupted write removes its temporary file."""
    sys.exit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, exit_on_signal)
    cli(prog_name="ann2snn")


if __name__ == "__main__":
    main()
