"""The `ann2snn` command."""
from __future__ import annotations

import json
import math
import signal
import sys
import tempfile
import warnings
from functools import wraps
from pathlib import Path

import click

import ann2snn
from ann2snn.errors import Ann2SnnError
from ann2snn.export import MAX_EXPORT_TIMESTEPS   # train and demo export uint8 QDQ: T <= 8
from ann2snn.levels import MAX_TIMESTEPS
from ann2snn.paths import check_device, check_output
from ann2snn.tables import format_table
from ann2snn.models import MODEL_NAMES


# Exit codes, one meaning each (README, `ann2snn --help`).
EXIT_VERIFICATION_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL_ERROR = 3


def strict_json(value) -> str:
    """`value` as strict JSON (RFC 8259): a float that is not finite (a float site's clip bound of
    inf, say) becomes null instead of Python's Infinity / NaN tokens, which JSON parsers refuse."""
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), indent=2, allow_nan=False, default=str)


def _one_line(text: str) -> str:
    """A message on one line: newlines in a path or a name are shown escaped."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def reports_errors(command):
    """Bad input: one line on stderr and exit code 2; an internal error: one line asking for a bug
    report and exit code 3. No traceback unless --debug, and warnings raised on the way to an error
    are dropped so that the error is the only line."""
    @wraps(command)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            try:
                result = command(*args, **kwargs)
            except Ann2SnnError as err:
                if debug:
                    raise
                click.echo(f"ann2snn: error: {_one_line(str(err))}", err=True)
                sys.exit(EXIT_BAD_INPUT)
            except (click.exceptions.Exit, click.ClickException, SystemExit, KeyboardInterrupt):
                raise
            except Exception as err:
                if debug:
                    raise
                click.echo(f"ann2snn: error: internal error, please report it with the command that caused it "
                           f"(--debug shows the traceback): {type(err).__name__}: "
                           f"{_one_line(str(err).strip().splitlines()[0] if str(err).strip() else '')}", err=True)
                sys.exit(EXIT_INTERNAL_ERROR)
        for w in caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        return result
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(ann2snn.__version__, prog_name="ann2snn")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Compile trained ANNs into error-free, ultra-low-latency bit-serial spiking neural networks.

    Exit codes: 0 success; 1 the conversion was built but failed verification (nothing written);
    2 bad input or usage (one line naming the file and the problem); 3 an internal error.
    """


def _load_inputs(data: str, split: str, samples: int, seed: int = 0):
    """`samples` (images, labels) of DATA drawn at random with `seed`, across its classes."""
    import torch

    from ann2snn.data import draw, load_dataset, make_loader

    batches = list(make_loader(draw(load_dataset(data, split=split, seed=seed), samples, seed),
                               batch_size=min(samples, 256)))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def _zoo_model_or_onnx_file(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value in MODEL_NAMES or value.lower().endswith(".onnx"):
        return value
    raise click.BadParameter(f"{value!r} is neither a zoo model ({', '.join(MODEL_NAMES)}) nor an .onnx file")


def _model_inputs(model: str, data: str, split: str, samples: int):
    """`samples` images of DATA (`_load_inputs`), refused unless they have the ONNX model's input shape."""
    from ann2snn.data import check_input_shape
    from ann2snn.onnx_import import inspect_onnx

    x = _load_inputs(data, split, samples)[0]
    check_input_shape(data, tuple(x.shape[1:]), inspect_onnx(model)["input"]["shape"][1:])
    return x


def _verification_inputs(model: str, verify_data: str | None, calib: str | None, calib_x, samples: int):
    """Real inputs where there are any (--verify-data, else the calibration data), else noise,
    with a description of which."""
    from ann2snn.verify import random_inputs

    if verify_data:
        x = _model_inputs(model, verify_data, "test", samples)
        return x, f"{len(x)} inputs of {verify_data}"
    if calib_x is not None:
        return calib_x[:samples], f"{min(samples, len(calib_x))} calibration inputs of {calib}"
    return random_inputs(model, samples), f"{samples} inputs of uniform noise (no --verify-data or --calib)"


min_agreement_option = click.option(
    "--min-agreement", type=click.FloatRange(0, 100), default=None, metavar="PERCENT",
    help="A float source: fail below this prediction agreement with onnxruntime's float run.")


def _verify(path: str, snn, source_graph, verify_data: str | None, calib: str | None, calib_x, samples: int,
            min_agreement: float | None):
    """ann2snn.verify.verify_snn on the verification inputs; onnxruntime runs the model as imported
    (the output chosen, the input sized: ann2snn.onnx_import.save_as_imported)."""
    from ann2snn.onnx_import import save_as_imported
    from ann2snn.verify import verify_snn

    with tempfile.TemporaryDirectory() as folder:
        reference = save_as_imported(path, source_graph, folder)
        x, inputs = _verification_inputs(reference, verify_data, calib, calib_x, samples)
        return verify_snn(reference, snn, source_graph, x, inputs=inputs,
                          min_agreement=None if min_agreement is None else min_agreement / 100)


def _verify_line(v: dict) -> str:
    """The verification in words: the exactness gate, then the comparison with onnxruntime."""
    gate = v["exact"]
    exact = (f"exactness gate on {gate['samples']} inputs: {gate['levels_compared']:,} levels at "
             f"{len(gate['sites'])} sites equal to the quantized source's: "
             f"{'yes' if gate['passed'] else 'NO (' + '; '.join(gate['problems'][:2]) + ')'}")
    if gate["ties"] or gate["evaluation_ties"]:
        exact += (f" ({gate['ties']:,} of them, and {gate['evaluation_ties']:,} of the evaluation's against the "
                  f"simulation, exact ties: z / theta a half-integer, rounded up or down by float64's last bit; "
                  f"given the same level there, everything else matches)")
    comparison = (f"{v['reference']}: prediction agreement {100 * v['agreement']:.2f}%, max |logit difference| "
                  f"{v['max_abs_logit_diff']:.3g}")
    if v["levels"] is not None:
        t = v["levels"]["totals"]
        comparison += (f"; levels: {t['compared']:,} compared, {t['equal']:,} equal, {t['ties']} ties, "
                       f"{t['near_boundary']} near a boundary, {t['downstream']} downstream of one, "
                       f"{t['unexplained']} unexplained")
    if v["lossy"]:
        comparison += " (post-training quantization of a float model: lossy, not part of the gate)"
    return f"verified on {v['inputs']}\n{exact}\n{comparison}\n{'PASSED' if v['passed'] else 'FAILED'}"


def _site_rows(snn: ann2snn.SNN) -> list[dict]:
    rows = []
    for name, site in snn.report["sites"].items():
        theta = site.get("theta")
        lam = site.get("lambda")
        shift = site.get("bias_shift", {})
        rows.append({
            "site": name, "levels": site.get("levels"), "T": site.get("timesteps"),
            "lambda": _summary(lam), "theta": _summary(theta),
            "bias shift": f"{shift.get('kind', '')}:{shift.get('target', '')}",
        })
    return rows


def _summary(value) -> str | float:
    if isinstance(value, list):
        return f"{min(value):.4g}..{max(value):.4g} ({len(value)} ch)"
    return value


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
    from ann2snn.demo import run_demo

    rows = run_demo(tuple(timesteps), output_dir, float_epochs=epochs, qat_epochs=epochs, progress=not as_json)
    if as_json:
        click.echo(strict_json({"rows": rows, "output_dir": output_dir}))
        return
    click.echo("Test accuracy (%) on the 450 held-out digits, and spikes per image of the SNN:")
    click.echo(format_table(rows, ["T", "float ANN", "quantized ANN", "SNN", "same prediction", "spikes/img"]))
    click.echo(f"weights, ONNX exports and .snn files in {output_dir}/")


@cli.command()
@click.option("--model", "model_name", default="digits-cnn", show_default=True, callback=_zoo_model_or_onnx_file,
              metavar="NAME|FILE.onnx", help=f"A zoo model ({', '.join(MODEL_NAMES)}) or a float ONNX file to fine-tune.")
@click.option("--data", default="digits", show_default=True, metavar="DATA",
              help="digits, fashion-mnist, mnist, an .npz with x and y, a folder of IDX files, or an image folder "
                   "with train/ and val/.")
@click.option("-T", "timesteps", type=click.IntRange(1, MAX_EXPORT_TIMESTEPS), default=3, show_default=True,
              help="Time steps of the SNN: the sites get L = 2^T - 1 levels.")
@click.option("--beta", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Weight of the spike regularizer (spikes per image, METHOD.md section 5).")
@click.option("--epochs", type=click.IntRange(1), default=40, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=0.05, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--per-channel", is_flag=True, help="One lambda per output channel instead of per layer.")
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
def train(model_name, data, timesteps, beta, epochs, lr, batch_size, per_channel, float_only, float_activation,
          max_grad_norm, init, resume, device, workers, seed, output, as_json):
    """Train a sparsity-regularized quantized source ANN and export it to ONNX for `convert`."""
    from ann2snn.train import TrainConfig, train as run_training

    weights = str(Path(output).with_suffix(".safetensors"))
    check_device(device)
    for written in (output, weights, weights + ".ckpt"):
        check_output(written, data, init)
    config = TrainConfig(model=model_name, data=data, timesteps=timesteps, beta=beta, epochs=epochs, lr=lr,
                         batch_size=batch_size, per_channel=per_channel, float_only=float_only,
                         float_activation=float_activation, max_grad_norm=max_grad_norm, init=init,
                         resume=resume, device=device, workers=workers, seed=seed, output=weights, onnx=output)
    result = run_training(config, progress=not as_json)
    from ann2snn import distributed

    if not distributed.init_from_env(device).is_main:  # under torchrun, process 0 reports
        return
    summary = {"onnx": output, "weights": weights, "checkpoint": weights + ".ckpt", **result.to_json()}
    if as_json:
        click.echo(strict_json(summary))
        return
    click.echo(format_table([{"epoch": h["epoch"], "loss": h["loss"], "train acc": 100 * h["train_acc"],
                              "test acc": 100 * h["test_acc"], "spikes/img": h["spikes_per_image"]}
                             for h in result.history[-5:]],
                            ["epoch", "loss", "train acc", "test acc", "spikes/img"]))
    click.echo(f"test accuracy {100 * result.test_accuracy:.2f}%, {result.spikes_per_image:.1f} spikes/img; "
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
@click.option("--input-shape", default=None, metavar="C,H,W", callback=lambda _c, _p, v: _sample_shape(v),
              help="A sample's shape, for an input with dynamic dimensions (default: the --calib data's).")
@min_agreement_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@reports_errors
def convert(model, timesteps, calib, calib_samples, percentile, output, verify, verify_data, verify_samples,
            graph_output, input_shape, min_agreement, as_json):
    """Convert an ONNX CNN into a bit-serial SNN, verify it, and save it as .snn."""
    from ann2snn.compiler import compile_source, quantized_onnx

    out = check_output(output if output else Path(model).with_suffix(".snn"), model, calib)
    calib_x = _model_inputs(model, calib, "calib", calib_samples) if calib else None
    source_graph, source = quantized_onnx(model, timesteps, calib_x, percentile=percentile, output=graph_output,
                                          input_shape=input_shape)
    snn = compile_source(model, source_graph, source, timesteps)
    result = {"model": model, "timesteps": snn.timesteps, "source": snn.source,
              "sites": [{"site": k, **v} for k, v in snn.report["sites"].items()],
              "rewrites": snn.report["rewrites"]}
    if verify:
        result["verify"] = _verify(model, snn, source_graph, verify_data, calib, calib_x, verify_samples,
                                   min_agreement).to_json()
    if not verify or result["verify"]["passed"]:
        snn.save(out)
        result["output"] = str(out)
    if as_json:
        click.echo(strict_json(result))
    else:
        click.echo(f"{model}: {len(result['sites'])} activation sites, T = {snn.timesteps}, "
                   f"source {snn.source['kind']}")
        click.echo(format_table(_site_rows(snn), ["site", "levels", "T", "lambda", "theta", "bias shift"]))
        for rewrite in snn.report["rewrites"]:
            click.echo("rewrite: " + ", ".join(f"{k}={v}" for k, v in rewrite.items()))
        if verify:
            click.echo(_verify_line(result["verify"]))
        click.echo(f"wrote {out}" if "output" in result else "no output written: verification failed")
    if verify and not result["verify"]["passed"]:
        sys.exit(EXIT_VERIFICATION_FAILED)


def _sample_shape(text: str | None) -> tuple[int, ...] | None:
    """--input-shape C,H,W as a tuple of positive sizes."""
    if text is None:
        return None
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{text!r} is not a list of positive sizes such as 3,32,32")
    return sizes


@cli.command(name="verify")
@click.argument("snn_path", metavar="MODEL.snn", type=click.Path(dir_okay=False))
@click.option("--against", "source_path", required=True, type=click.Path(dir_okay=False), metavar="SOURCE.onnx",
              help="The ONNX file MODEL.snn was converted from.")
@click.option("--data", "data", default=None, metavar="DATA",
              help="Inputs: digits, an .npz with x and y, or an image folder (default: uniform noise).")
@click.option("--samples", type=click.IntRange(1), default=64, show_default=True,
              help="Inputs drawn from DATA (at random, across classes).")
@min_agreement_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@reports_errors
def verify_command(snn_path, source_path, data, samples, min_agreement, as_json):
    """Prove an existing .snn exact for its source (exit 0), or show where it is not (exit 1)."""
    from ann2snn.artifact import file_sha256
    from ann2snn.compiler import quantized_onnx

    snn = ann2snn.load_snn(snn_path)
    if snn.source.get("sha256") not in (None, file_sha256(source_path)):
        raise Ann2SnnError(f"{snn_path}: converted from a file with another SHA-256 than {source_path} "
                           f"({snn.source.get('file')})")
    clips = {site: entry["lambda"] for site, entry in snn.report["sites"].items() if "lambda" in entry}
    steps = {entry.get("timesteps") for entry in snn.report["sites"].values()}
    source_graph, _ = quantized_onnx(source_path, snn.timesteps if len(steps) == 1 else None, clips=clips,
                                     output=snn.source.get("output"), input_shape=snn.source.get("input_shape"))
    check = _verify(source_path, snn, source_graph, data, None, None, samples, min_agreement)
    if as_json:
        click.echo(strict_json({"model": snn_path, "against": source_path, **check.to_json()}))
    else:
        click.echo(f"{snn_path} against {source_path}:")
        click.echo(_verify_line(check.to_json()))
    if not check.passed:
        sys.exit(EXIT_VERIFICATION_FAILED)


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@reports_errors
def inspect(path, as_json):
    """Summarize an .onnx or .snn file: ops (supported or not) and activation sites."""
    if path.lower().endswith(".snn"):
        from ann2snn.artifact import load_snn, read_metadata

        load_snn(path)   # the whole file checked, as eval would load it
        meta = read_metadata(path)
        summary = {"kind": "snn", "timesteps": meta["timesteps"], "ann2snn_version": meta["ann2snn_version"],
                   "source": meta["source"], "sites": meta["report"].get("sites", {}),
                   "ops": _count_ops(meta["graph"])}
    else:
        from ann2snn.onnx_import import inspect_onnx

        summary = {"kind": "onnx", **inspect_onnx(path)}
    if as_json:
        click.echo(strict_json(summary))
        return
    for key, value in summary.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            click.echo(f"{key}:")
            rows = [{"name": k, **{kk: _summary(vv) if isinstance(vv, list) else vv for kk, vv in v.items()
                                   if not isinstance(vv, dict)}} for k, v in value.items()]
            columns = list(dict.fromkeys(c for r in rows for c in r))
            click.echo(format_table(rows, columns))
        else:
            click.echo(f"{key}: {value}")


@cli.command(name="eval")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, metavar="DATA",
              help="digits, an .npz with x and y, or an image folder (its val/ split when it has one).")
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--mode", type=click.Choice(["evaluate", "simulate"]), default="evaluate", show_default=True,
              help="evaluate: time-folded fast path; simulate: time-stepped spike planes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@reports_errors
def eval_command(model, data, batch_size, workers, device, mode, as_json):
    """Top-1/top-5 accuracy, spikes per image per layer and images per second of an .snn on DATA."""
    from ann2snn import distributed
    from ann2snn.data import load_dataset, make_loader
    from ann2snn.evaluation import evaluate_snn

    check_device(device)
    context = distributed.init_from_env(device)
    device = distributed.local_device(device, context)
    snn = ann2snn.load_snn(model)
    dataset = distributed.shard(load_dataset(data, split="test"), context)
    loader = make_loader(dataset, batch_size, workers=workers, pin_memory=device.startswith("cuda"))
    result = evaluate_snn(snn, loader, mode=mode, device=device, progress=not as_json and context.is_main,
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


def _count_ops(graph: dict) -> dict:
    counts: dict[str, int] = {}
    for node in graph["nodes"]:
        if node["op"] in ("placeholder", "output"):
            continue
        op = graph["modules"][node["target"]]["type"] if node["op"] == "call_module" else node["target"]
        counts[op] = counts.get(op, 0) + 1
    return counts


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, metavar="DATA",
              help="digits, an .npz with x and y, or an image folder (its val/ split when it has one).")
@click.option("--table", "table", default="fp32-45nm", show_default=True, metavar="NAME|FILE",
              help="Energy table: fp32-45nm or int8-45nm (Horowitz, ISSCC 2014), or your own JSON file.")
@click.option("--samples", type=click.IntRange(1), default=None,
              help="Count over the first N images (default: the whole split).")
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
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
    """Spikes, synaptic operations and energy per layer of an .snn against the same ANN (METHOD.md 6)."""
    from ann2snn import distributed
    from ann2snn.data import draw, load_dataset, make_loader
    from ann2snn.energy import count_operations, estimate_energy, format_report, load_table, plot_energy

    check_device(device)
    if plot:
        check_output(plot, model, table)
    energy_table = load_table(table)
    if neuron_updates:
        energy_table.require("neuron_update", "--neuron-updates")
    if memory:
        energy_table.require("memory_weight", "--memory")
        energy_table.require("memory_state", "--memory")
    context = distributed.init_from_env(device)
    device = distributed.local_device(device, context)
    snn = ann2snn.load_snn(model)
    dataset = draw(load_dataset(data, split="test"), samples)   # at random, across classes
    loader = make_loader(distributed.shard(dataset, context), batch_size)
    counts = count_operations(snn, loader, mode=mode, device=device, progress=not as_json and context.is_main,
                              total=len(loader), context=context)
    if not context.is_main:
        return
    report = estimate_energy(counts, energy_table, neuron_updates=neuron_updates, memory=memory)
    if plot:
        plot_energy(report, plot)
    if as_json:
        click.echo(strict_json({"model": model, "data": data, **report.to_json(),
                               **({"plot": plot} if plot else {})}))
        return
    click.echo(f"{model} on {data}:")
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
