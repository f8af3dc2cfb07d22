"""The .snn artifact: a plain safetensors file with the graph as JSON metadata, loaded without pickle."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import ann2snn
import ann2snn.runtime.artifact as artifact
from ann2snn.errors import ArtifactError
from ann2snn.runtime.neuron import BitSerialIFNode
from ann2snn.runtime.quant import QuantClippedActivation
from test_onnx_import import qdq_model  # noqa: F401 (a fixture)


def site(levels: int, clip, channels: int = 0) -> QuantClippedActivation:
    s = QuantClippedActivation(levels=levels, channels=channels)
    s.clip.data = torch.tensor(clip, dtype=torch.float32).reshape(s.clip.shape)
    return s


class Net(nn.Module):
    """Site on the input (membrane offset), conv + BN + per-channel site, max pool, concat of two
    sites (one per-layer), residual add, flatten, linear with a per-layer site, linear head."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.act_in = site(15, [1.0, 0.8, 1.2], channels=3)
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.act0 = site(15, [1.0, 1.6, 0.7, 1.3], channels=4)
        self.pool = nn.MaxPool2d(2)
        self.left, self.act_left = nn.Conv2d(4, 2, 1), site(7, 1.1)
        self.right, self.act_right = nn.Conv2d(4, 2, 3, padding=1, groups=2), site(15, [0.6, 1.7], channels=2)
        self.res = nn.Conv2d(4, 4, 3, padding=1)
        self.act_res = site(15, [1.0, 1.3, 0.8, 1.5], channels=4)
        self.fc, self.act_fc = nn.Linear(4 * 9, 6), site(31, 1.9)
        self.head = nn.Linear(6, 3)
        self.bn.running_mean.copy_(0.3 * torch.randn(4, generator=g))
        self.bn.running_var.copy_(0.5 + torch.rand(4, generator=g))
        self.bn.weight.data = 0.5 + torch.rand(4, generator=g)
        self.bn.bias.data = 0.2 * torch.randn(4, generator=g)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.data = torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5
                if m.bias is not None:
                    m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=g)
        self.eval()

    def forward(self, x):
        h = self.pool(self.act0(self.bn(self.conv(self.act_in(x)))))
        h = torch.cat([self.act_left(self.left(h)), self.act_right(self.right(h))], 1)
        h = self.act_res(self.res(h) + h)
        return self.head(self.act_fc(self.fc(torch.flatten(h, 1))))


def make_snn(dtype: torch.dtype) -> tuple[ann2snn.SNN, nn.Module, torch.Tensor]:
    model = Net().to(dtype)
    snn = ann2snn.convert(model, source={"file": "net.py", "kind": "pytorch", "note": [1, 2.5, None]})
    x = (torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 1.5).to(dtype)
    return snn, model, x


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["float32", "float64"])
def converted(request, tmp_path_factory):
    snn, model, x = make_snn(request.param)
    path = tmp_path_factory.mktemp("artifact") / "net.snn"
    snn.save(path)
    return snn, model, x, path


def test_round_trip_gives_identical_outputs(converted):
    snn, model, x, path = converted
    loaded = ann2snn.load_snn(path)
    assert isinstance(loaded, ann2snn.SNN)
    dtype = x.dtype
    # the conversion has per-channel and per-layer theta and membrane offsets to carry
    neurons = {n: snn.graph_module.get_submodule(n) for n in snn.site_names}
    assert any(m.theta.dim() == 1 for m in neurons.values()) and any(m.theta.dim() == 0 for m in neurons.values())
    assert (neurons["act_in"].membrane_offset != 0).all()
    assert snn.report["sites"]["act_in"]["bias_shift"]["kind"] == "membrane"
    assert loaded.site_names == snn.site_names
    for name, m in neurons.items():
        lm = loaded.graph_module.get_submodule(name)
        assert isinstance(lm, BitSerialIFNode)
        assert (lm.levels, lm.timesteps) == (m.levels, m.timesteps)
        assert lm.theta.dtype == m.theta.dtype and torch.equal(lm.theta, m.theta)
        assert torch.equal(lm.membrane_offset, m.membrane_offset)
    for k, v in snn.graph_module.state_dict().items():
        w = loaded.graph_module.state_dict()[k]
        assert w.dtype == v.dtype and torch.equal(w, v), k
    for mode in ("simulate", "evaluate"):
        a, b = getattr(snn, mode)(x), getattr(loaded, mode)(x)
        assert b.logits.dtype == dtype
        assert torch.equal(a.logits, b.logits), mode
        assert a.spikes.keys() == b.spikes.keys()
        assert all(torch.equal(a.spikes[k], b.spikes[k]) for k in a.spikes), mode
    if dtype == torch.float64:
        assert torch.allclose(loaded.simulate(x).logits, model(x), rtol=0, atol=1e-9)
    assert loaded.timesteps == snn.timesteps == 5
    assert loaded.report == snn.report
    assert loaded.source.to_json() == {**snn.source.to_json(), "ann2snn_version": ann2snn.__version__}
    assert loaded.source.extra == {"note": [1, 2.5, None]} and loaded.source.kind == "pytorch"


def test_the_file_is_plain_safetensors_with_json_metadata(converted):
    snn, _, _, path = converted
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["ann2snn"])
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    assert keys == set(snn.graph_module.state_dict())
    assert all(torch.equal(tensors[k], v) for k, v in snn.graph_module.state_dict().items())
    assert meta["format"] == "ann2snn-snn"
    assert meta["timesteps"] == snn.timesteps
    assert meta["report"] == json.loads(json.dumps(snn.report.to_json()))
    assert {n["name"] for n in meta["graph"]["nodes"]} >= {"act_in", "conv", "head"}
    assert meta["graph"]["modules"]["act_in"]["type"] == "BitSerialIFNode"
    # safetensors' own loader reads it too
    assert set(safetensors.torch.load_file(str(path))) == keys


def test_loading_never_unpickles(converted, monkeypatch):
    snn, _, x, path = converted

    def refuse(*args, **kwargs):
        raise AssertionError("load_snn must not unpickle")

    class NoUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = ann2snn.load_snn(path)
    assert torch.equal(loaded.simulate(x).logits, snn.simulate(x).logits)
    assert torch.equal(loaded.evaluate(x).logits, snn.evaluate(x).logits)


# --- broken files -------------------------------------------------------------------------------

def assert_one_line_artifact_error(path) -> ArtifactError:
    with pytest.raises(ArtifactError) as info:
        ann2snn.load_snn(path)
    message = str(info.value)
    assert message and "\n" not in message
    return info.value


def header_length(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("where", ["8_bytes", "mid_header", "after_header", "mid_data", "minus_1"])
def test_truncated_file_raises_artifact_error(converted, tmp_path, where):
    _, _, _, path = converted
    data = path.read_bytes()
    end = header_length(data)
    cut = {"8_bytes": 8, "mid_header": end // 2, "after_header": end, "mid_data": (end + len(data)) // 2,
           "minus_1": len(data) - 1}[where]
    broken = tmp_path / "broken.snn"
    broken.write_bytes(data[:cut])
    assert_one_line_artifact_error(broken)


def test_random_bytes_raise_artifact_error(tmp_path):
    path = tmp_path / "random.snn"
    g = torch.Generator().manual_seed(3)
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()))
    assert_one_line_artifact_error(path)
    empty = tmp_path / "empty.snn"
    empty.write_bytes(b"")
    assert_one_line_artifact_error(empty)


def test_missing_file_raises_artifact_error(tmp_path):
    assert_one_line_artifact_error(tmp_path / "absent.snn")


def test_safetensors_file_without_ann2snn_metadata_raises(tmp_path):
    path = tmp_path / "plain.snn"
    safetensors.torch.save_file({"w": torch.ones(3)}, str(path))
    assert_one_line_artifact_error(path)
    other = tmp_path / "other.snn"
    safetensors.torch.save_file({"w": torch.ones(3)}, str(other), metadata={"format": "pt"})
    assert_one_line_artifact_error(other)


def rewrite_metadata(src, dst, edit) -> None:
    """Copy an artifact with its metadata JSON changed by `edit(meta)` (tensors unchanged)."""
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["ann2snn"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta)
    safetensors.torch.save_file(tensors, str(dst), metadata={"ann2snn": json.dumps(meta)})


def test_a_function_outside_the_allow_list_is_refused(converted, tmp_path):
    _, _, _, path = converted
    calls = []

    def to_os_system(meta):
        node = next(n for n in meta["graph"]["nodes"] if n["op"] == "call_function")
        calls.append(node["target"])
        node["target"] = "os.system"

    bad = tmp_path / "os_system.snn"
    rewrite_metadata(path, bad, to_os_system)
    assert calls and calls[0] in artifact.FUNCTIONS
    err = assert_one_line_artifact_error(bad)
    assert "os.system" in str(err)
    # an unchanged rewrite still loads: the refusal is the allow-list, not the rewriting
    good = tmp_path / "same.snn"
    rewrite_metadata(path, good, lambda meta: None)
    ann2snn.load_snn(good)


@pytest.mark.parametrize("edit", ["module_type", "custom_module", "method", "node_op"])
def test_other_names_outside_the_allow_lists_are_refused(converted, tmp_path, edit):
    _, _, _, path = converted

    def change(meta):
        graph = meta["graph"]
        if edit == "module_type":
            graph["modules"]["conv"]["type"] = "nn.Sequential"
        elif edit == "custom_module":
            graph["modules"]["act_in"]["type"] = "subprocess.Popen"
        elif edit == "method":
            node = next(n for n in graph["nodes"] if n["op"] == "call_function")
            node["op"], node["target"] = "call_method", "__reduce__"
        else:
            node = next(n for n in graph["nodes"] if n["op"] == "call_function")
            node["op"] = "exec"

    bad = tmp_path / f"{edit}.snn"
    rewrite_metadata(path, bad, change)
    assert_one_line_artifact_error(bad)


@pytest.mark.parametrize("raw", ["{this is not json", "[1, 2]", "null", '"ann2snn-snn"'])
def test_ann2snn_metadata_that_is_not_a_json_object_raises_artifact_error(tmp_path, raw):
    bad = tmp_path / "not_json.snn"
    safetensors.torch.save_file({"w": torch.ones(3)}, str(bad), metadata={"ann2snn": raw})
    assert_one_line_artifact_error(bad)


@pytest.fixture(scope="module")
def artifact32(tmp_path_factory):
    snn, _, _ = make_snn(torch.float32)
    path = tmp_path_factory.mktemp("artifact32") / "net.snn"
    snn.save(path)
    return path


@pytest.mark.parametrize("key", ["graph", "timesteps", "report", "source", "ann2snn_version"])
def test_metadata_missing_a_field_raises_artifact_error(artifact32, tmp_path, key):
    bad = tmp_path / f"no_{key}.snn"
    rewrite_metadata(artifact32, bad, lambda meta: meta.pop(key))
    assert_one_line_artifact_error(bad)


def test_a_node_calling_an_undeclared_module_raises_artifact_error(artifact32, tmp_path):
    def edit(meta):
        node = next(n for n in meta["graph"]["nodes"] if n["op"] == "call_module")
        node["target"] = "undeclared"

    bad = tmp_path / "undeclared.snn"
    rewrite_metadata(artifact32, bad, edit)
    assert_one_line_artifact_error(bad)


def test_tensor_shape_disagreeing_with_module_config_raises_artifact_error(artifact32, tmp_path):
    def edit(meta):
        meta["graph"]["modules"]["conv"]["config"]["kernel_size"] = [5, 5]

    bad = tmp_path / "shape.snn"
    rewrite_metadata(artifact32, bad, edit)
    assert_one_line_artifact_error(bad)


def test_missing_tensor_raises_artifact_error(converted, tmp_path):
    _, _, _, path = converted
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "conv.weight"}
    bad = tmp_path / "no_weight.snn"
    safetensors.torch.save_file(tensors, str(bad), metadata=meta)
    assert_one_line_artifact_error(bad)


# --- atomic save ---------------------------------------------------------------------------------

def test_save_is_atomic(tmp_path, monkeypatch):
    snn, _, x = make_snn(torch.float32)
    real_save = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "save_file", half_then_fail)
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(OSError, match="disk full"):
        snn.save(folder / "net.snn")
    assert list(folder.iterdir()) == []  # neither the file nor a temporary one
    # an existing artifact at the destination survives a failed save untouched
    monkeypatch.setattr(artifact, "save_file", real_save)
    snn.save(folder / "net.snn")
    before = (folder / "net.snn").read_bytes()
    monkeypatch.setattr(artifact, "save_file", half_then_fail)
    with pytest.raises(OSError):
        snn.save(folder / "net.snn")
    assert [p.name for p in folder.iterdir()] == ["net.snn"]
    assert (folder / "net.snn").read_bytes() == before
    assert torch.equal(ann2snn.load_snn(folder / "net.snn").simulate(x).logits, snn.simulate(x).logits)


def test_save_into_a_new_folder_and_overwrite(tmp_path):
    snn, _, x = make_snn(torch.float64)
    path = tmp_path / "a" / "b" / "net.snn"
    snn.save(path)
    snn.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["net.snn"]
    assert torch.equal(ann2snn.load_snn(path).evaluate(x).logits, snn.evaluate(x).logits)


def test_a_fresh_interpreter_loads_artifacts_of_every_kind(tmp_path, qdq_model):
    """No module type an artifact may hold depends on what was imported before (the QDQ importer's
    QuantDequant used to register itself on import, so only the CLI could load QDQ artifacts). Every
    kind: the zoo, a float ONNX file, and onnxruntime's QDQ flavours (signed input, the defaults,
    uint8, symmetric, per-channel, A16W8), its QOperator format and a PT2E export; each loaded alone
    in a fresh interpreter computes the logits of the SNN it was saved from."""
    import subprocess
    import sys
    from pathlib import Path

    from ann2snn import convert_onnx
    from ann2snn.train.export import export_onnx
    from ann2snn.runtime.quant import QuantDequant
    from test_cli import digits_model
    from test_onnx_import import QuantNet, export, quantize, randomize_batch_norms
    from test_pt2e import pt2e_onnx
    from test_quantizers import FLAVOURS

    snns = {"qdq signed input": convert_onnx(qdq_model, verify=False)}   # the input keeps a QDQ pair
    assert any(isinstance(m, QuantDequant) for m in snns["qdq signed input"].modules())
    float_onnx = tmp_path / "float.onnx"
    export_onnx(digits_model(quantize=False), (1, 8, 8), float_onnx, qdq=False)
    snns["float onnx"] = convert_onnx(float_onnx, T=3, calib=torch.rand(16, 1, 8, 8), verify=False)
    snns["zoo"], _, zoo_x = make_snn(torch.float32)
    torch.manual_seed(0)
    float_file = export(randomize_batch_norms(QuantNet()), (3, 8, 8), str(tmp_path / "quant_net.onnx"), "torchscript-17")
    flavours = {**FLAVOURS, "A16W8": dict(activation_type="QUInt16", weight_type="QInt8", per_channel=True),
                "QOperator": dict(quant_format="QOperator", activation_type="QUInt8")}
    for i, (flavour, options) in enumerate(flavours.items()):
        snns[flavour] = convert_onnx(quantize(float_file, tmp_path / f"flavour{i}.onnx", **dict(options)),
                                      verify=False)
    snns["pt2e"] = convert_onnx(pt2e_onnx("digits-cnn", "x86", tmp_path / "pt2e.onnx"), verify=False)
    args = []
    for i, (kind, snn) in enumerate(snns.items()):
        shape = {"float onnx": (1, 8, 8), "pt2e": (1, 8, 8), "zoo": tuple(zoo_x.shape[1:])}.get(kind, (3, 8, 8))
        x = torch.rand((4, *shape), generator=torch.Generator().manual_seed(i), dtype=torch.float32)
        snn.save(tmp_path / f"{i}.snn")
        torch.save({"x": x, "logits": snn.evaluate(x).logits}, tmp_path / f"{i}.pt")
        args += [str(tmp_path / f"{i}.snn"), str(tmp_path / f"{i}.pt")]
    script = ("import sys, torch, ann2snn\nfor snn, data in zip(sys.argv[1::2], sys.argv[2::2]):\n"
              "    want = torch.load(data)\n"
              "    assert torch.equal(ann2snn.load_snn(snn).evaluate(want['x']).logits, want['logits']), snn\n"
              "print('loaded', len(sys.argv) // 2)")
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == f"loaded {len(snns)}", done.stderr
