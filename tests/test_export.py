"""QDQ ONNX export: onnxruntime runs the exported file and computes the quantized ANN of PyTorch."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from ann2snn import models
from ann2snn.data.sets import load_dataset
from ann2snn.errors import Ann2SnnError
from ann2snn.train.export import export_onnx
from ann2snn.frontend.reader import onnxruntime_session
from ann2snn.compile.calibrate import activation_sites, calibrate_clips, quantize_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def qat_digits_cnn(train_set, timesteps: int, per_channel: bool) -> nn.Module:
    """digits-cnn with random weights, non-trivial BN statistics and calibrated lambdas, in eval mode."""
    torch.manual_seed(timesteps)
    model = quantize_model(models.build_model("digits-cnn", 10), timesteps, per_channel, (1, 8, 8))
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    calibrate_clips(model, [(train_set.x[:512], None)])
    return model.eval()


def constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant node outputs by name."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def site_ratios(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """z / theta at every site (what q() rounds), one [N, ...] tensor per site."""
    ratios: list[torch.Tensor] = []
    hooks = [site.register_forward_hook(lambda m, i, o: ratios.append(
        i[0] / m.theta().view((1, -1) + (1,) * (i[0].dim() - 2) if m.per_channel else ())))
        for site in activation_sites(model).values()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return ratios


@pytest.mark.parametrize("timesteps,per_channel", [(2, False), (4, False), (8, False), (3, True)])
def test_onnxruntime_computes_the_quantized_model(tmp_path, digits, timesteps, per_channel):
    train_set, test_set = digits
    model = qat_digits_cnn(train_set, timesteps, per_channel)
    path = export_onnx(model, (1, 8, 8), tmp_path / "m.onnx")
    session = onnxruntime_session(path)
    x = test_set.x
    with torch.no_grad():
        want = model(x).numpy()
    # Dynamic batch: the whole test set at once and a batch of 7 give the same logits.
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_array_equal(session.run(None, {"input": x[:7].numpy()})[0], got[:7])
    differing = ~np.isclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max()).all(axis=1)
    # A row may differ only where a level moved at a tie: z / theta = k + 1/2 up to float rounding
    # (ONNX rounds half to even, q() half up; ORT's and torch's convolutions round differently).
    # Measured on these 450 images: 0 rows at T = 2 and 4, 7 at T = 8, 1 at T = 3 per channel.
    ratios = site_ratios(model, x)
    levels = 2**timesteps - 1
    tie_distance = torch.stack([
        ((r - r.floor() - 0.5).abs() / r.abs().clamp(min=1)).masked_fill((r < 0) | (r > levels), 1).flatten(1).min(1)[0]
        for r in ratios]).min(0)[0].numpy()
    assert differing.sum() <= 10, f"{differing.sum()} of {len(x)} rows differ"
    assert (tie_distance[differing] < 1e-6).all()
    # The quantization is not vacuous: every site uses its whole range of levels.
    for r in ratios:
        q = torch.clamp(torch.floor(r + 0.5), 0, levels)
        assert q.min() == 0 and q.max() == levels


@pytest.mark.parametrize("per_channel", [False, True])
def test_graph_has_one_qdq_pair_per_site_with_scale_theta(tmp_path, digits, per_channel):
    model = qat_digits_cnn(digits[0], 3, per_channel)
    graph = onnx.load(str(export_onnx(model, (1, 8, 8), tmp_path / "m.onnx"))).graph
    values = constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    dequantize = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    sites = activation_sites(model)
    assert len(quantize) == len(dequantize) == len(sites)
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for name, site in sites.items():
        (q,) = [n for n in quantize if n.name.startswith(f"/{name}/")]
        (dq,) = [n for n in dequantize if n.input[0] == q.output[0]]
        theta = site.theta().detach().numpy()
        for node in (q, dq):
            np.testing.assert_array_equal(values[node.input[1]], theta)
            zero_point = values[node.input[2]]
            assert zero_point.dtype == np.uint8 and not zero_point.any()
            axis = {a.name: a.i for a in node.attribute}.get("axis", 1)
            assert axis == 1 and values[node.input[1]].shape == ((theta.size,) if per_channel else ())
        # The clip in front: Clip(0, lambda) per layer, Relu -> Min(lambda[c]) per channel.
        clip = producer[q.input[0]]
        lam = site.clip.detach().numpy()
        if per_channel:
            assert clip.op_type == "Min" and producer[clip.input[0]].op_type == "Relu"
            np.testing.assert_array_equal(values[clip.input[1]].reshape(-1), lam)
        else:
            assert clip.op_type == "Clip"
            assert values[clip.input[1]] == 0 and values[clip.input[2]] == lam


def test_float_export_is_the_clipped_ann(tmp_path, digits):
    model = qat_digits_cnn(digits[0], 3, per_channel=True)
    path = export_onnx(model, (1, 8, 8), tmp_path / "float.onnx", qdq=False)
    assert not [n for n in onnx.load(str(path)).graph.node if "Quantize" in n.op_type]
    for site in activation_sites(model).values():
        site.quantize = False
    x = digits[1].x
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(onnxruntime_session(path).run(None, {"input": x.numpy()})[0], want,
                               rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_export_refusals(tmp_path, digits):
    model = qat_digits_cnn(digits[0], 3, per_channel=False)
    with pytest.raises(Ann2SnnError, match="is a directory"):
        export_onnx(model, (1, 8, 8), tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(Ann2SnnError, match="cannot write ONNX file"):
        export_onnx(model, (1, 8, 8), tmp_path / "file" / "m.onnx")
    uncalibrated = quantize_model(models.build_model("digits-cnn", 10), 3)
    with pytest.raises(Ann2SnnError, match="'act1' has no finite clipping threshold"):
        export_onnx(uncalibrated, (1, 8, 8), tmp_path / "m.onnx")
    with pytest.raises(Ann2SnnError, match="does not fit uint8"):
        export_onnx(quantize_model(model, 9), (1, 8, 8), tmp_path / "m.onnx")
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*tmp"))
