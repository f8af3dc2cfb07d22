"""Options and arguments that several `ann2snn` commands share, and how they are read."""
from __future__ import annotations

import click

from ..models import MODEL_NAMES


def zoo_model_or_onnx_file(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value in MODEL_NAMES or value.lower().endswith(".onnx"):
        return value
    raise click.BadParameter(f"{value!r} is neither a zoo model ({', '.join(MODEL_NAMES)}) nor an .onnx file")


batch_size_option = click.option(
    "--batch-size", type=click.IntRange(1), default=None,
    help="Samples a batch (default: as many as the model's largest activation allows in 1 GiB, at most 256).")
run_batch_size_option = click.option(
    "--batch-size", type=click.IntRange(1), default=None,
    help="Images a batch (default: 128, or fewer where the model's largest activation would take over 1 GiB).")
min_agreement_option = click.option(
    "--min-agreement", type=click.FloatRange(0, 100), default=None, metavar="PERCENT",
    help="A float source: fail below this prediction agreement with onnxruntime's float run.")
weight_bits_option = click.option(
    "--weight-bits", type=int, default=None, metavar="8",
    help="Train int8 weights: BN folded into the weights, per-channel symmetric fake quantization (from "
         "scratch after a float-weight warm-up, --float-weight-epochs); the export is full QDQ (INT8 weights "
         "behind DequantizeLinear).")


def sample_shape(text: str | None) -> tuple[int, ...] | None:
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
