"""The .snn artifact: one safetensors file; the graph description is JSON in its metadata.

Loading runs no code from the file, by construction: torch.fx turns the graph into Python source,
so every name that reaches that source is checked to be a plain identifier (node names, placeholder
and keyword names) or a dotted path of identifiers naming a declared module or a stored tensor;
module types, functions, methods, attributes and dtypes come from the allow-lists below (the dtypes
in artifact_tensors.py, which also checks each tensor against its module); constants are JSON
numbers, strings (which fx writes with repr), booleans and null; tensors come from safetensors.
"""
from __future__ import annotations

import glob
import hashlib
import json
import keyword
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import fx, nn

from ..errors import ArtifactError
from .artifact_tensors import DTYPES, check_file_dtypes, check_loaded, check_tensors, format_version_of
from .metadata import ArtifactHeader, ConversionReport, Source, check_format
from .neuron import BitSerialIFNode
from ..ops import FUNCTION_OPS, LAYERS, METHOD_KINDS, MODULE_OPS
from .quant import QuantDequant
from .integer_artifact import float_tensors, integer_tensors
from .integer_values import IntegerWeights

# Module types an artifact may hold, with the attributes that rebuild each (its tensors come from
# the state dict): the table of ann2snn/ops.py.
MODULE_FIELDS: dict[type[nn.Module], tuple[str, ...]] = {t: op.fields for t, op in MODULE_OPS.items()}
# ann2snn's own modules rebuild from `artifact_config()` / `from_artifact_config()`.
# Listed here, not registered by whoever defines them: what a fresh interpreter may load must not
# depend on what happens to be imported.
CUSTOM_MODULES: dict[str, type[nn.Module]] = {"BitSerialIFNode": BitSerialIFNode, "QuantDequant": QuantDequant}


FUNCTIONS: dict[str, Callable] = {op.name: fn for fn, op in FUNCTION_OPS.items()}
_FUNCTION_NAMES = {id(fn): name for name, fn in FUNCTIONS.items()}
METHODS = frozenset(METHOD_KINDS)
# what `getattr(tensor, name)` may read
ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})
NODE_OPS = frozenset({"placeholder", "get_attr", "call_module", "call_function", "call_method", "output"})
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}\Z")
_INDEX = re.compile(r"[0-9]{1,9}\Z")


def _shown(value: Any) -> str:
    """A value of the file, quoted on one line and cut short, for an error message."""
    text = json.dumps(value) if isinstance(value, str) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + '..."'


def _identifier(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.match(value) or keyword.iskeyword(value):
        raise ArtifactError(f"{what} {_shown(value)} is not a plain identifier")
    return value


def _dotted_path(value: Any, what: str) -> str:
    """A path of submodules: identifiers, or indices into a Sequential (fx writes those as
    getattr(m, "0"))."""
    if not isinstance(value, str) or not value:
        raise ArtifactError(f"{what} {_shown(value)} is not a dotted path of identifiers")
    for part in value.split("."):
        if not (_IDENTIFIER.match(part) or _INDEX.match(part)) or keyword.iskeyword(part):
            raise ArtifactError(f"{what} {_shown(value)} is not a dotted path of identifiers")
    return value


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
    """A node argument from its JSON form; anything but the tags below and JSON scalars is refused."""
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if not isinstance(value, dict) or len(value) != 1:
        raise ArtifactError(f"a node argument {_shown(value)} is not a value of the format")
    (kind, body), = value.items()
    if kind == "node" and isinstance(body, str) and body in nodes:
        return nodes[body]
    if kind in ("tuple", "slice") and isinstance(body, list) and (kind == "tuple" or len(body) == 3):
        items = [_decode(v, nodes) for v in body]
        return tuple(items) if kind == "tuple" else slice(*items)
    if kind == "dict" and isinstance(body, dict):
        return {_identifier(k, "a dict key"): _decode(v, nodes) for k, v in body.items()}
    if kind == "float" and body in ("nan", "inf", "-inf"):
        return float(body)
    if kind == "dtype" and body in DTYPES:
        return DTYPES[body]
    raise ArtifactError(f"a node argument {_shown(kind)}: {_shown(body)} is not a value of the format "
                        "(an earlier node, tuple, slice, dict, float or dtype)")


# --- modules --------------------------------------------------------------------------------

def _module_entry(module: nn.Module) -> dict:
    if type(module) in MODULE_FIELDS:
        config = {field: getattr(module, field) for field in MODULE_FIELDS[type(module)]}
        if hasattr(module, "bias") and isinstance(module, LAYERS):
            config["bias"] = module.bias is not None
        return {"type": f"nn.{type(module).__name__}", "config": config}
    if type(module).__name__ in CUSTOM_MODULES:
        return {"type": type(module).__name__, "config": module.artifact_config()}
    raise ArtifactError(f"cannot save module type {type(module).__name__}")


def _plain(value: Any) -> bool:
    """A JSON scalar, or a list of them: all a module's configuration may hold."""
    if isinstance(value, list):
        return all(v is None or isinstance(v, (bool, int, float, str)) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _build_module(target: str, entry: Any) -> nn.Module:
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise ArtifactError(f"module {target}: the entry has no type and config")
    name, config = entry.get("type"), entry["config"]
    cls = next((c for c in MODULE_FIELDS if f"nn.{c.__name__}" == name), None) or CUSTOM_MODULES.get(name)
    if cls is None:
        raise ArtifactError(f"module {target}: type {_shown(name)} is not allowed in an artifact")
    if not all(isinstance(k, str) and _plain(v) for k, v in config.items()):
        raise ArtifactError(f"module {target}: its config holds something other than numbers, strings and lists")
    if cls in MODULE_FIELDS:
        unknown = set(config) - set(MODULE_FIELDS[cls]) - {"bias"}
        if unknown:
            raise ArtifactError(f"module {target}: {name} takes no {_shown(sorted(unknown)[0])}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    return cls.from_artifact_config(config)


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


def _node_target(op: str, target: Any, args: tuple, modules: dict, tensors: dict[str, torch.Tensor]) -> Any:
    """The checked target of a node: what fx will write into the generated source."""
    if op == "placeholder":
        return _identifier(target, "the input name")
    if op == "output":
        if target != "output":
            raise ArtifactError(f"the output node's target {_shown(target)} is not 'output'")
        return target
    if op == "get_attr":
        if _dotted_path(target, "the tensor") not in tensors:
            raise ArtifactError(f"the tensor {target} is not in the file")
        return target
    if op == "call_module":
        if _dotted_path(target, "the module") not in modules:
            raise ArtifactError(f"the module {target} is called but not declared")
        return target
    if op == "call_method":
        if target not in METHODS:
            raise ArtifactError(f"method {_shown(target)} is not allowed in an artifact")
        return target
    if not isinstance(target, str) or target not in FUNCTIONS:
        raise ArtifactError(f"function {_shown(target)} is not allowed in an artifact")
    if FUNCTIONS[target] is getattr and (len(args) != 2 or args[1] not in ATTRIBUTES):
        raise ArtifactError(f"getattr may read only {', '.join(sorted(ATTRIBUTES))}, "
                            f"not {_shown(args[1] if len(args) == 2 else args)}")
    return FUNCTIONS[target]


def build_graph(description: dict, tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    """The SNN graph of a JSON description, every name and value checked (module docstring)."""
    if not isinstance(description, dict) or not isinstance(description.get("modules"), dict) \
            or not isinstance(description.get("nodes"), list):
        raise ArtifactError("the graph description has no modules and nodes")
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    root: dict[str, Any] = {}
    with torch.device("meta"):   # sizes come from the file: allocate nothing until the tensors arrive
        for target, entry in description["modules"].items():
            root[_dotted_path(target, "the module name")] = _build_module(target, entry)
    for spec in description["nodes"]:
        if not isinstance(spec, dict) or set(spec) != {"name", "op", "target", "args", "kwargs"}:
            raise ArtifactError(f"a node {_shown(spec)} lacks name, op, target, args or kwargs")
        name, op = _identifier(spec["name"], "the node name"), spec["op"]
        if name in nodes:
            raise ArtifactError(f"two nodes are named {name}")
        if op not in NODE_OPS:
            raise ArtifactError(f"node {name}: unknown node kind {_shown(op)}")
        args, kwargs = _decode(spec["args"], nodes), _decode(spec["kwargs"], nodes)
        if not isinstance(args, (list, tuple)) or not isinstance(spec["kwargs"], dict) \
                or set(spec["kwargs"]) != {"dict"}:
            raise ArtifactError(f"node {name}: args must be a list and kwargs a dict")
        args = tuple(args)
        target = _node_target(op, spec["target"], args, description["modules"], tensors)
        if op == "get_attr":
            root[target] = tensors[target]
        nodes[name] = graph.create_node(op, target, args, kwargs, name=name)
    if not any(n.op == "output" for n in graph.nodes):
        raise ArtifactError("the graph description has no output node")
    gm = fx.GraphModule(root, graph, "SNN")
    state = {k: v for k, v in tensors.items() if k in gm.state_dict()}
    missing = set(gm.state_dict()) - set(state)
    if missing:
        raise ArtifactError(f"the artifact lacks tensors {sorted(missing)[:5]}")
    dtype = check_tensors(gm, state)
    gm.load_state_dict(state, strict=True, assign=True)  # keep the saved dtype
    check_loaded(gm, dtype)
    return gm


# --- files ----------------------------------------------------------------------------------

def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporary files of earlier writes of `path` whose process is gone (killed by SIGKILL,
    which no handler sees). Their names carry the writer's process id."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:   # a live process of another user
            pass


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write through a temporary file beside `path`, then rename: no half-written outputs, and an
    interrupted write (an exception, Ctrl-C, SIGTERM through the CLI) leaves no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
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


def write_artifact(path: str | os.PathLike, gm: fx.GraphModule, timesteps: int, report: ConversionReport,
                   source: Source, integer_layers: dict[str, IntegerWeights] | None = None) -> None:
    """Write an SNN's graph, tensors (an integer layer's as its integers), T, conversion report and
    source description (SNN.save)."""
    tensors = integer_tensors({k: v.detach().contiguous().clone() for k, v in gm.state_dict().items()},
                              integer_layers or {})
    meta = ArtifactHeader(timesteps, describe_graph(gm), report, source, format_version=format_version_of(tensors),
                          integer_layers=list(integer_layers or {})).to_json()
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"ann2snn": json.dumps(meta)}))


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON header stored in an .snn file, as it is there (format and version checked)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("ann2snn")
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: not a readable .snn file ({str(err).splitlines()[0]})") from None
    if raw is None:
        raise ArtifactError(f"{path}: a safetensors file without an ann2snn graph")
    try:
        meta = json.loads(raw)
        check_format(meta)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: the graph description is not JSON ({err})") from None
    except RecursionError:
        raise ArtifactError(f"{path}: the graph description is nested too deeply") from None
    except ArtifactError as err:
        raise ArtifactError(f"{path}: {err}") from None
    return meta


def read_artifact(path: str | os.PathLike) -> tuple[fx.GraphModule, ArtifactHeader, dict[str, IntegerWeights]]:
    """(graph, header, integer layers) of an .snn artifact, every part checked (ann2snn.load_snn);
    the header's source carries the version that wrote it."""
    meta = read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: truncated or corrupt tensors ({str(err).splitlines()[0]})") from None
    try:
        header = ArtifactHeader.from_json(meta)
        header.source.ann2snn_version = header.ann2snn_version
        check_file_dtypes(tensors, header.format_version)
        tensors, integer_layers = float_tensors(tensors, header.integer_layers)
        return build_graph(header.graph, tensors), header, integer_layers
    except ArtifactError as err:
        raise ArtifactError(f"{path}: {err}") from None
    except RecursionError:
        raise ArtifactError(f"{path}: the graph description is nested too deeply") from None
    except Exception as err:   # anything else the description makes fx or a module constructor raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ArtifactError(f"{path}: broken graph description ({message})") from None
