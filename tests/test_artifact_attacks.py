"""Hostile .snn files: loading one never runs code from it.

torch.fx writes a graph as Python source and executes it, so a name that reaches that source
unchecked runs on load (a placeholder's default, a get_attr path, a keyword name). Each attack
below plants a payload that creates a marker file if it ever runs; the artifact must be refused
with one ArtifactError line (or, for payloads that are mere string constants, load and fail to
run without executing anything), and the marker must not exist afterwards. A property test
plants hostile strings at random places of a real description.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import ann2snn
from ann2snn.errors import ArtifactError

from test_artifact import make_snn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata and tensors of a real artifact (conv, BN, sites, concat, residual add, linear)."""
    snn, _, _ = make_snn(torch.float32)
    path = tmp_path_factory.mktemp("original") / "net.snn"
    snn.save(path)
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["ann2snn"]), {k: f.get_tensor(k) for k in f.keys()}


def write(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    safetensors.torch.save_file(tensors, str(path), metadata={"ann2snn": json.dumps(meta)})
    return path


def payload(marker: Path) -> str:
    return f'__import__("pathlib").Path({str(marker)!r}).touch()'


def node(meta: dict, op: str, index: int = 0) -> dict:
    return [n for n in meta["graph"]["nodes"] if n["op"] == op][index]


# Each attack edits (meta, tensors) in place, given the payload; all but the last few are code
# injection through a name that fx writes into source, or an escape from an allow-list.
def placeholder_default(meta, tensors, code):
    node(meta, "placeholder")["target"] = f"x=({code})"


def placeholder_annotation(meta, tensors, code):
    node(meta, "placeholder")["target"] = f"x: ({code})"


def node_name(meta, tensors, code):
    node(meta, "call_module", 1)["name"] = f"conv = ({code}); conv"


def get_attr_path(meta, tensors, code):
    target = f'w"); {code}; getattr(self, "w'
    tensors[target] = torch.ones(1)
    meta["graph"]["nodes"].insert(1, {"name": "w", "op": "get_attr", "target": target,
                                      "args": {"tuple": []}, "kwargs": {"dict": {}}})


def get_attr_dotted_expression(meta, tensors, code):
    target = f"w.__class__.__init__.__globals__[{code!r}]"
    tensors[target] = torch.ones(1)
    meta["graph"]["nodes"].insert(1, {"name": "w", "op": "get_attr", "target": target,
                                      "args": {"tuple": []}, "kwargs": {"dict": {}}})


def call_module_target(meta, tensors, code):
    target = f'conv"); {code}; getattr(self, "conv'
    meta["graph"]["modules"][target] = meta["graph"]["modules"].pop("conv")
    for n in meta["graph"]["nodes"]:
        if n["target"] == "conv":
            n["target"] = target
    for key in [k for k in tensors if k.startswith("conv.")]:
        tensors[target + key[4:]] = tensors.pop(key)


def module_name_only(meta, tensors, code):
    meta["graph"]["modules"][f'm"); {code}; ("'] = {"type": "nn.Identity", "config": {}}


def keyword_name(meta, tensors, code):
    n = next(n for n in meta["graph"]["nodes"] if n["target"] == "torch.flatten")
    n["kwargs"] = {"dict": {f"end_dim=-1, start_dim=({code}) or 1, x": 1}}


def dict_key(meta, tensors, code):
    n = next(n for n in meta["graph"]["nodes"] if n["target"] == "torch.flatten")
    n["args"]["tuple"][1] = {"dict": {f"a': ({code}), 'b": 1}}


def dtype_tag(meta, tensors, code):
    n = next(n for n in meta["graph"]["nodes"] if n["target"] == "torch.flatten")
    n["args"]["tuple"][1] = {"dtype": "os"}


def getattr_any_attribute(meta, tensors, code):
    n = next(n for n in meta["graph"]["nodes"] if n["target"] == "torch.flatten")
    n["target"], n["args"] = "getattr", {"tuple": [{"node": "act_res"}, "__class__"]}


def getattr_expression(meta, tensors, code):
    n = next(n for n in meta["graph"]["nodes"] if n["target"] == "torch.flatten")
    n["target"], n["args"] = "getattr", {"tuple": [{"node": "act_res"}, f"shape; {code}"]}


def function_eval(meta, tensors, code):
    n = next(n for n in meta["graph"]["nodes"] if n["target"] == "torch.flatten")
    n["target"], n["args"] = "builtins.eval", {"tuple": [code]}


def method_dunder(meta, tensors, code):
    n = next(n for n in meta["graph"]["nodes"] if n["target"] == "torch.flatten")
    n["op"], n["target"] = "call_method", "__reduce_ex__"


def output_target(meta, tensors, code):
    node(meta, "output")["target"] = f"output; {code}"


def module_type_escape(meta, tensors, code):
    meta["graph"]["modules"]["conv"]["type"] = "nn.Module.__subclasses__"


def module_config_key(meta, tensors, code):
    meta["graph"]["modules"]["conv"]["config"]["__class__"] = code


def module_config_object(meta, tensors, code):
    meta["graph"]["modules"]["pool"]["config"]["kernel_size"] = {"dict": {"eval": code}}


def float_tag(meta, tensors, code):
    n = next(n for n in meta["graph"]["nodes"] if n["target"] == "torch.flatten")
    n["args"]["tuple"][1] = {"float": code}


def node_reference_expression(meta, tensors, code):
    n = next(n for n in meta["graph"]["nodes"] if n["target"] == "torch.flatten")
    n["args"]["tuple"][0] = {"node": code}


def unknown_op(meta, tensors, code):
    node(meta, "call_function")["op"] = "exec"


def huge_module(meta, tensors, code):
    # allocating this (4 * 10^12 weights) before the tensors are checked would exhaust memory
    meta["graph"]["modules"]["fc"]["config"].update(in_features=2_000_000, out_features=2_000_000)


def timesteps_out_of_range(meta, tensors, code):
    meta["timesteps"] = 99


def neuron_timesteps_out_of_range(meta, tensors, code):
    meta["graph"]["modules"]["act_in"]["config"]["timesteps"] = 40


def integer_theta(meta, tensors, code):
    tensors["act_in.theta"] = tensors["act_in.theta"].to(torch.int64)


def integer_tensors(meta, tensors, code):
    # all of them: no floating-point dtype left for the others to share
    tensors.update({name: t.to(torch.int32) for name, t in tensors.items()})


REFUSED: list[Callable] = [
    placeholder_default, placeholder_annotation, node_name, get_attr_path, get_attr_dotted_expression,
    call_module_target, module_name_only, keyword_name, dict_key, dtype_tag, getattr_any_attribute,
    getattr_expression, function_eval, method_dunder, output_target, module_type_escape, module_config_key,
    module_config_object, float_tag, node_reference_expression, unknown_op, huge_module, timesteps_out_of_range,
    neuron_timesteps_out_of_range, integer_theta, integer_tensors,
]


@pytest.mark.parametrize("attack", REFUSED, ids=[a.__name__ for a in REFUSED])
def test_hostile_artifact_is_refused_and_runs_nothing(original, tmp_path, attack):
    marker = tmp_path / "executed"
    meta, tensors = copy.deepcopy(original[0]), dict(original[1])
    attack(meta, tensors, payload(marker))
    path = write(tmp_path / "hostile.snn", meta, tensors)
    with pytest.raises(ArtifactError) as info:
        ann2snn.load_snn(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert not marker.exists(), "loading ran code from the file"


def test_deeply_nested_description_is_refused(original, tmp_path):
    meta, tensors = copy.deepcopy(original[0]), dict(original[1])
    meta["graph"]["nodes"] = "DEEP"
    raw = json.dumps(meta).replace('"DEEP"', "[" * 100_000 + "]" * 100_000)
    path = tmp_path / "deep.snn"
    safetensors.torch.save_file(tensors, str(path), metadata={"ann2snn": raw})
    with pytest.raises(ArtifactError) as info:
        ann2snn.load_snn(path)
    assert "\n" not in str(info.value)


def test_string_constants_are_data_not_code(original, tmp_path):
    """A payload where fx writes a string constant (with repr) loads, and running it fails as a
    wrong argument would, without executing the payload."""
    marker = tmp_path / "executed"
    meta, tensors = copy.deepcopy(original[0]), dict(original[1])
    n = next(n for n in meta["graph"]["nodes"] if n["target"] == "torch.flatten")
    n["args"]["tuple"][1] = f"'); {payload(marker)}; ('"
    snn = ann2snn.load_snn(write(tmp_path / "string.snn", meta, tensors))
    with pytest.raises((TypeError, RuntimeError)):
        snn.evaluate(torch.rand(2, 3, 6, 6))
    assert not marker.exists()


def test_the_attacks_reach_the_loader(original, tmp_path):
    """The same files with the payload removed from the edit still load: each refusal above is
    the check, not a file that was broken some other way."""
    meta, tensors = copy.deepcopy(original[0]), dict(original[1])
    snn = ann2snn.load_snn(write(tmp_path / "plain.snn", meta, tensors))
    assert snn.evaluate(torch.rand(2, 3, 6, 6)).logits.shape == (2, 3)


@pytest.mark.parametrize("command", ["inspect", "eval"])
def test_cli_refuses_a_hostile_artifact_with_one_line(original, tmp_path, command):
    marker = tmp_path / "executed"
    meta, tensors = copy.deepcopy(original[0]), dict(original[1])
    placeholder_default(meta, tensors, payload(marker))
    path = write(tmp_path / "hostile.snn", meta, tensors)
    args = [str(path)] if command == "inspect" else [str(path), "--data", "digits"]
    done = subprocess.run([sys.executable, "-m", "ann2snn", command, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ann2snn: error:") and str(path) in lines[0], done.stderr
    assert not marker.exists()



# A tensor of another shape or dtype than the graph description expects (load_state_dict's own error
# names none): refused naming the tensor, what it should be and what the file holds.
TAMPERED = {
    "shape": (lambda t: t.reshape(-1)[:5].clone(), "float32 of shape [5]"),
    "dtype": (lambda t: t.double(), "float64 of shape [4, 3, 3, 3]"),
}


@pytest.mark.parametrize("command", ["inspect", "eval"])
@pytest.mark.parametrize("tamper", sorted(TAMPERED))
def test_cli_names_a_tampered_tensor(original, tmp_path, tamper, command):
    edit, holds = TAMPERED[tamper]
    meta, tensors = copy.deepcopy(original[0]), dict(original[1])
    assert tensors["conv.weight"].shape == (4, 3, 3, 3) and tensors["conv.weight"].dtype == torch.float32
    tensors["conv.weight"] = edit(tensors["conv.weight"])
    path = write(tmp_path / "tampered.snn", meta, tensors)
    args = [str(path)] if command == "inspect" else [str(path), "--data", "digits"]
    done = subprocess.run([sys.executable, "-m", "ann2snn", command, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (f"ann2snn: error: {path}: tensor conv.weight should be float32 of shape [4, 3, 3, 3], "
                           f"the file holds {holds}\n"), done.stderr

HOSTILE_TEXT = st.one_of(
    st.sampled_from(['x=({code})', '{code}', 'a"); {code}; ("', "a'); {code}; ('", "a.b\n{code}", "a, b=({code})",
                     "a: ({code})", "__class__", "__globals__", "shape; {code}", "os", "system", "eval",
                     "builtins.exec", "nn.Module", "operator.attrgetter", "1a", "a..b", "", "class", "None"]),
    st.text(max_size=40),
)
PLACES = ["node_name", "node_target", "node_op", "arg_string", "arg_tag", "kwarg_key", "module_key",
          "module_type", "config_key", "config_value", "getattr_name"]


def plant(meta: dict, tensors: dict, place: str, index: int, text: str) -> None:
    """Put `text` at one place of the description (index picks the node or module)."""
    nodes, modules = meta["graph"]["nodes"], meta["graph"]["modules"]
    n = nodes[index % len(nodes)]
    module = sorted(modules)[index % len(modules)]
    if place == "node_name":
        n["name"] = text
    elif place == "node_target":
        n["target"] = text
        tensors[text] = torch.ones(1)    # so that a get_attr of it would find a tensor
    elif place == "node_op":
        n["op"] = text
    elif place == "arg_string":
        n["args"] = {"tuple": [text]}
    elif place == "arg_tag":
        n["args"] = {"tuple": [{text: text}]}
    elif place == "kwarg_key":
        n["kwargs"] = {"dict": {text: 1}}
    elif place == "module_key":
        modules[text] = modules.pop(module)
        for other in nodes:
            if other["target"] == module:
                other["target"] = text
    elif place == "module_type":
        modules[module]["type"] = text
    elif place == "config_key":
        modules[module]["config"][text] = 1
    elif place == "config_value":
        modules[module]["config"][next(iter(modules[module]["config"]), "x")] = text
    else:
        n["op"], n["target"], n["args"] = "call_function", "getattr", {"tuple": [{"node": "x"}, text]}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(place=st.sampled_from(PLACES), index=st.integers(0, 40), template=HOSTILE_TEXT)
def test_no_hostile_description_runs_code(original, tmp_path, place, index, template):
    marker = tmp_path / "executed"
    marker.unlink(missing_ok=True)
    meta, tensors = copy.deepcopy(original[0]), dict(original[1])
    plant(meta, tensors, place, index, template.replace("{code}", payload(marker)))
    path = write(tmp_path / "hostile.snn", meta, tensors)
    try:
        snn = ann2snn.load_snn(path)
    except ArtifactError as err:
        assert "\n" not in str(err)
    else:
        try:
            snn.evaluate(torch.rand(2, 3, 6, 6))
        except Exception:   # a wrong but harmless graph may fail to run; it must not run the payload
            pass
    assert not marker.exists(), f"{place} = {template!r} ran code"
