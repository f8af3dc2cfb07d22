"""Export a model with QuantClippedActivation sites to ONNX, as a QDQ model onnxruntime runs.

Each site z -> q(z) * theta becomes

    per layer:    Clip(z, 0, lambda) -> QuantizeLinear(theta, 0) -> DequantizeLinear(theta, 0)
    per channel:  Relu(z) -> Min(lambda[c]) -> QuantizeLinear(theta[c], 0, axis=1) -> DequantizeLinear

with uint8 and zero point 0, so the compiler reads theta = scale and lambda = the clip bound back
(docs/method.md section 1). Weights stay float, except in a model whose weights are fake-quantized
(`weight_quant.quantize_weights`): there every Conv / Gemm weight is an INT8 initializer behind a
DequantizeLinear, with an int32 bias where its input is a QDQ site, also through average pools
(qdq_weights.py). ONNX rounds half to even where q() rounds half up: the two differ only where
z / theta lies exactly (within float rounding) on a level boundary k + 1/2.

BatchNormalization stays a node of its own and every parameter keeps its PyTorch name, so the
file can also initialize training (`TrainConfig.init`) by name.

Run the file with `onnxruntime_session`: onnxruntime's default QDQ graph transforms quantize the
float weights of a Conv / Gemm fed by a DequantizeLinear to int8 (and fuse QLinearConv), which
changes the results; the session config "session.disable_quant_qdq" turns them off.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from ..compile.trace import freeze_parametrizations
from ..runtime.artifact import write_atomically
from ..errors import Ann2SnnError
from ..runtime.quant import QuantClippedActivation
from ..levels import channel_view, timesteps_for_levels
from .qdq_weights import dequantize_weights
from .weight_quant import integer_tensors

# uint8 holds levels 0..255: T <= 8 time steps (torch exports fake quantization as uint8 or int8 QDQ only).
_QUANT_MAX = 255
MAX_EXPORT_TIMESTEPS = timesteps_for_levels(_QUANT_MAX)


class _QdqSite(nn.Module):
    """The exported form of one site: clip to [0, lambda], then fake quantization (Q -> DQ) with scale theta."""

    def __init__(self, site: QuantClippedActivation, qdq: bool) -> None:
        super().__init__()
        if qdq and site.levels > _QUANT_MAX:
            raise Ann2SnnError(f"a site with {site.levels} levels (T = {site.timesteps}) does not fit uint8 QDQ "
                               f"(at most {_QUANT_MAX} levels, T <= {MAX_EXPORT_TIMESTEPS})")
        self.qdq = qdq
        self.per_channel = site.per_channel
        clip = site.clip.detach().float().cpu()
        # theta exactly as the site computes it (lambda / L in float32), so ONNX holds the same scale.
        theta = (clip / site.levels).contiguous()
        if self.per_channel:
            self.register_buffer("bound", clip.clone())
            self.register_buffer("scale", theta)
            self.register_buffer("zero_point", torch.zeros(clip.numel(), dtype=torch.int32))
        else:
            self.bound_value = float(clip)
            self.scale_value = float(theta)

    def forward(self, z: Tensor) -> Tensor:
        if self.per_channel:
            x = torch.minimum(torch.relu(z), channel_view(self.bound, z.dim()))
            if self.qdq:
                x = torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, 1, 0, _QUANT_MAX)
            return x
        x = torch.clamp(z, 0.0, self.bound_value)
        if self.qdq:
            x = torch.fake_quantize_per_tensor_affine(x, self.scale_value, 0, 0, _QUANT_MAX)
        return x


def _export_copy(model: nn.Module, qdq: bool, example: Tensor) -> tuple[nn.Module, dict[str, tuple[Tensor, Tensor]]]:
    """A float32 CPU eval-mode copy of `model` whose sites are _QdqSite modules (the caller's model is
    untouched), and the integer levels and scales of its fake-quantized weights and biases by ONNX
    name (the copy's weights and biases are plain tensors on those grids)."""
    exported = copy.deepcopy(model).cpu().float().eval()
    with torch.no_grad():   # at the export's input size: an adaptive pool's windows, a bias grid, follow it
        exported(example[:1])
    weights = integer_tensors(exported)
    for name, module in list(exported.named_modules()):
        if isinstance(module, QuantClippedActivation):
            if not torch.isfinite(module.clip).all():
                raise Ann2SnnError(f"site {name!r} has no finite clipping threshold lambda: calibrate it first")
            exported.set_submodule(name, _QdqSite(module, qdq))
    freeze_parametrizations(exported)
    return exported, weights


def _inline_initializer_aliases(graph: onnx.GraphProto) -> None:
    """The exporter stores equal tensors once and names the others through Identity nodes (e.g. a
    fresh BN's running_mean = its bias); give each its own initializer so every PyTorch name is one."""
    initializers = {t.name: t for t in graph.initializer}
    for node in list(graph.node):
        if node.op_type == "Identity" and node.input[0] in initializers:
            alias = onnx.TensorProto()
            alias.CopyFrom(initializers[node.input[0]])
            alias.name = node.output[0]
            graph.initializer.append(alias)
            graph.node.remove(node)


def export_onnx(model: nn.Module, input_shape: tuple[int, ...] | str | os.PathLike,
                path: str | os.PathLike | Tensor, *, qdq: bool = True, opset: int = 17) -> Path:
    """Write `model` (input [batch, *input_shape], any batch size) to the ONNX file `path`.

    Also `export_onnx(model, path, example_input)`: the input shape of one sample of the batch
    `example_input` (the form for a model from `ann2snn.train.prepare`, which has no shape of its own).
    qdq=True: every QuantClippedActivation site becomes clip -> QuantizeLinear -> DequantizeLinear
    (the quantized ANN); qdq=False: the clip only (the float clipped ANN). Returns the path.
    """
    if isinstance(path, Tensor):
        input_shape, path = tuple(path.shape[1:]), input_shape
    path = Path(path)
    if path.is_dir():
        raise Ann2SnnError(f"{path}: is a directory, not an ONNX file path")
    example = torch.zeros((2, *input_shape))
    exported, weights = _export_copy(model, qdq, example)

    def write(tmp: str) -> None:
        from ..frontend.reader import load_checked   # here: `import ann2snn` loads no importer

        with warnings.catch_warnings():
            # PRESERVE on an eval-mode model exports inference BN nodes but skips the eval peephole
            # that folds BN into Conv and renames the weights; torch warns about it, and about the
            # TorchScript exporter being legacy (the only one that exports fake quantization as QDQ).
            warnings.simplefilter("ignore")
            torch.onnx.export(
                exported, (example,), tmp, dynamo=False, opset_version=opset,
                training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        proto = load_checked(tmp)
        _inline_initializer_aliases(proto.graph)
        missing = set(weights) - set(dequantize_weights(proto.graph, weights))
        if missing:   # a tensor the exporter folded into another one or used outside a Conv / Gemm
            raise Ann2SnnError(f"{path}: the integer tensors {', '.join(sorted(missing))} are not the weight "
                               "or bias of an exported Conv or Gemm")
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)

    try:
        write_atomically(path, write)
    except OSError as err:
        raise Ann2SnnError(f"{path}: cannot write ONNX file ({err.strerror or err})") from None
    except torch.onnx.errors.OnnxExporterError as err:
        raise Ann2SnnError(f"{path}: torch.onnx cannot export the model ({str(err).splitlines()[0]})") from None
    return path


def onnx_initializers(path: str | os.PathLike) -> dict[str, Tensor]:
    """The initializers of an ONNX file by name, including names the exporter aliased via Identity."""
    from ..frontend.reader import load_checked

    proto = load_checked(path)
    tensors = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in tensors:
            tensors[node.output[0]] = tensors[node.input[0]]
    return tensors
