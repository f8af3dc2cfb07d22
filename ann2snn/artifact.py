"""The .snn artifact: one safetensors file; the graph description is JSON in its metadata.

Loading runs no code from the file: module types and functions come from the allow-lists below,
tensors from safetensors, everything else is JSON.
"""
from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import fx, nn

from . import __version__
from .errors import ArtifactError
from .neuron import BitSerialIFNode
from .snn import SNN

FORMAT = "ann2snn-snn"
FORMAT_VERSION = 1

# Module types an artifact may hold, with the attributes that rebuild each (its tensors come from
# the state dict).
MODULE_FIELDS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Conv1d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                "padding_mode"),
    nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                "padding_mode"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm1d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.BatchNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.MaxPool1d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    nn.AvgPool1d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    nn.AvgPool2d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    nn.AdaptiveAvgPool1d: ("output_size",),
    nn.AdaptiveAvgPool2d: ("output_size",),
    nn.AdaptiveMaxPool1d: ("output_size",),
    nn.AdaptiveMaxPool2d: ("output_size",),
    nn.Flatten: ("start_dim", "end_dim"),
    nn.Identity: (),
    nn.Dropout: ("p",),
}
# ann2snn's own modules rebuild from `artifact_config()` / `from_artifact_config()`.
CUSTOM_MODULES: dict[str, type[nn.Module]] = {"BitSerialIFNode": BitSerialIFNode}


def register_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Allow an ann2snn module with artifact_config / from_artifact_config in artifacts."""
    CUSTOM_MODULES[cls.__name__] = cls
    return cls


FUNCTIONS: dict[str, Callable] = {
    "operator.add": operator.add, "operator.sub": operator.sub, "operator.mul": operator.mul,
    "operator.truediv": operator.truediv, "operator.neg": operator.neg, "operator.getitem": operator.getitem,
    "getattr": getattr,
    "torch.add": torch.add, "torch.sub": torch.sub, "torch.mul": torch.mul, "torch.div": torch.div,
    "torch.cat": torch.cat, "torch.concat": torch.concat, "torch.flatten": torch.flatten,
    "torch.reshape": torch.reshape, "torch.permute": torch.permute, "torch.squeeze": torch.squeeze,
    "torch.unsqueeze": torch.unsqueeze, "torch.mean": torch.mean, "torch.matmul": torch.matmul,
    "torch.clamp": torch.clamp, "torch.relu": torch.relu,
    "F.pad": F.pad, "F.avg_pool1d": F.avg_pool1d, "F.avg_pool2d": F.avg_pool2d,
    "F.adaptive_avg_pool1d": F.adaptive_avg_pool1d, "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "F.max_pool1d": F.max_pool1d, "F.max_pool2d": F.max_pool2d, "F.relu": F.relu,
}
_FUNCTION_NAMES = {id(fn): name for name, fn in FUNCTIONS.items()}
METHODS = frozenset({"view", "reshape", "flatten", "size", "permute", "squeeze", "unsqueeze", "mean",
                     "contiguous", "add", "sub", "mul", "div", "dim"})


# --- values inside node arguments -----------------------------------------------------------

def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (tuple, torch.Size)):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    raise ArtifactError(f"cannot save a graph argument of type {type(value).__name__}")


def _decode(value: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    (kind, body), = value.items()
    if kind == "node":
        return nodes[body]
    if kind == "tuple":
        return tuple(_decode(v, nodes) for v in body)
    if kind == "dict":
        return {k: _decode(v, nodes) for k, v in body.items()}
    if kind == "slice":
        return slice(*(_decode(v, nodes) for v in body))
    if kind == "float":
        return float(body)
    if kind == "dtype":
        return getattr(torch, body)
    raise ArtifactError(f"unknown value tag {kind!r} in the graph description")


# --- modules --------------------------------------------------------------------------------

def _module_entry(module: nn.Module) -> dict:
    if type(module) in MODULE_FIELDS:
        config = {field: getattr(module, field) for field in MODULE_FIELDS[type(module)]}
        if hasattr(module, "bias") and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            config["bias"] = module.bias is not None
        return {"type": f"nn.{type(module).__name__}", "config": config}
    if type(module).__name__ in CUSTOM_MODULES:
        return {"type": type(module).__name__, "config": module.artifact_config()}
    raise ArtifactError(f"cannot save module type {type(module).__name__}")


def _build_module(entry: dict) -> nn.Module:
    name, config = entry["type"], entry["config"]
    if name.startswith("nn."):
        cls = next((c for c in MODULE_FIELDS if c.__name__ == name[3:]), None)
        if cls is None:
            raise ArtifactError(f"module type {name} is not allowed in an artifact")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    if name not in CUSTOM_MODULES:
        raise ArtifactError(f"module type {name} is not allowed in an artifact")
    return CUSTOM_MODULES[name].from_artifact_config(config)


# --- graph ----------------------------------------------------------------------------------

def describe_graph(gm: fx.GraphModule) -> dict:
    """The JSON description of an SNN graph: its nodes and the modules they call."""
    nodes, modules = [], {}
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_module":
            modules[target] = _module_entry(gm.get_submodule(target))
        elif node.op == "call_function":
            if id(target) not in _FUNCTION_NAMES:
                raise ArtifactError(f"cannot save node {node.name}: function {target} is not in the artifact op set")
            target = _FUNCTION_NAMES[id(target)]
        elif node.op == "call_method" and target not in METHODS:
            raise ArtifactError(f"cannot save node {node.name}: method .{target}() is not in the artifact op set")
        nodes.append({"name": node.name, "op": node.op, "target": target,
                      "args": _encode(node.args), "kwargs": _encode(node.kwargs)})
    return {"nodes": nodes, "modules": modules}


def build_graph(description: dict, tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    root: dict[str, Any] = {}
    for target, entry in description["modules"].items():
        root[target] = _build_module(entry)
    for spec in description["nodes"]:
        op, target = spec["op"], spec["target"]
        if op == "call_function":
            if target not in FUNCTIONS:
                raise ArtifactError(f"function {target} is not allowed in an artifact")
            target = FUNCTIONS[target]
        elif op == "call_method" and target not in METHODS:
            raise ArtifactError(f"method {target} is not allowed in an artifact")
        elif op == "get_attr":
            root[target] = tensors[target]
        elif op not in ("placeholder", "call_module", "output"):
            raise ArtifactError(f"unknown node kind {op!r}")
        args = _decode(spec["args"], nodes)
        kwargs = _decode(spec["kwargs"], nodes)
        nodes[spec["name"]] = graph.create_node(op, target, tuple(args), kwargs, name=spec["name"])
    if not any(n.op == "output" for n in graph.nodes):
        raise ArtifactError("the graph description has no output node")
    gm = fx.GraphModule(root, graph, "SNN")
    state = {k: v for k, v in tensors.items() if k in gm.state_dict()}
    missing = set(gm.state_dict()) - set(state)
    if missing:
        raise ArtifactError(f"the artifact lacks tensors {sorted(missing)[:5]}")
    gm.load_state_dict(state, strict=True, assign=True)  # keep the saved dtype
    return gm


# --- files ----------------------------------------------------------------------------------

def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write through a temporary file beside `path`, then rename: no half-written outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make every output private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_snn(snn: SNN, path: str | os.PathLike) -> None:
    gm = snn.graph_module
    tensors = {k: v.detach().contiguous().clone() for k, v in gm.state_dict().items()}
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "ann2snn_version": __version__,
        "timesteps": snn.timesteps, "graph": describe_graph(gm), "report": snn.report, "source": snn.source,
    }
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"ann2snn": json.dumps(meta)}))


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON description stored in an .snn file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("ann2snn")
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: not a readable .snn file ({str(err).splitlines()[0]})") from None
    if raw is None:
        raise ArtifactError(f"{path}: a safetensors file without an ann2snn graph")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: the graph description is not JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: the graph description is not a JSON object")
    if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int) \
            or meta["format_version"] > FORMAT_VERSION:
        raise ArtifactError(f"{path}: unsupported artifact format {meta.get('format')} v{meta.get('format_version')}")
    return meta


def load_snn(path: str | os.PathLike) -> SNN:
    """Load an .snn artifact; needs neither the source ONNX file nor pickle."""
    meta = read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: truncated or corrupt tensors ({str(err).splitlines()[0]})") from None
    try:
        gm = build_graph(meta["graph"], tensors)
        return SNN(gm, meta["timesteps"], report=meta["report"],
                   source={**meta["source"], "ann2snn_version": meta["ann2snn_version"]})
    except ArtifactError as err:
        raise ArtifactError(f"{path}: {err}") from None
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ArtifactError(f"{path}: broken graph description ({message})") from None
