"""The layout's rules (issue 14), checked on the package's source: imports form no cycle and point
one way, each module imports alone, what an op means is listed in ann2snn/ops.py only, energy
runs no interpreter of its own, and no module outgrows one sitting. Each checker is also shown
failing on a broken input."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# installed names -> folders (pyproject's package-dir: kernels/ and models/ install under ann2snn)
ROOTS = {"ann2snn": REPO / "ann2snn", "ann2snn.kernels": REPO / "kernels", "ann2snn.models": REPO / "models"}
MAX_LINES = 400


def package_modules() -> dict[str, Path]:
    """Every module of the installed package, by name, with its source file."""
    found = {"ann2snn.cli": REPO / "cli.py"}   # ann2snn/cli.py links to it
    for package, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            if path.is_symlink() or "__pycache__" in path.parts:
                continue
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package] + parts)] = path
    return found


MODULES = package_modules()


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its source, lazy imports included
    (a lazy import hides a cycle, it does not remove it). `from p import x` names module p.x when
    there is one, else p."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                found.add(target)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles, each as the path that closes it."""
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                found.append(stack[stack.index(w):] + [w])
            elif w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v)
    return found


# --- imports ---------------------------------------------------------------------------------------

def test_no_import_cycle():
    assert cycles(import_graph(MODULES)) == []


def test_the_cycle_check_finds_a_lazy_cycle(tmp_path):
    (tmp_path / "a.py").write_text("from .b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import g   # lazy: still a cycle\n")
    modules = {"p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py"}
    assert cycles(import_graph(modules)) == [["p.a", "p.b", "p.a"]]


# what each base module may import of the package (None: anything but the CLI)
ALLOWED = {
    "ann2snn.levels": set(),                       # torch only: below the kernels and everything else
    "ann2snn.ops": set(),
    "ann2snn.errors": set(),
    "ann2snn.version": set(),
    "ann2snn.progress": set(),
    "ann2snn.tables": set(),
    "ann2snn.models": set(),                       # the zoo: torch only
    "ann2snn.kernels": {"ann2snn.levels", "ann2snn.kernels"},
}
BASE = set(ALLOWED)
# The stages, lowest first: a stage imports the base, the stages below it and itself, never a stage
# above it or beside it (a tuple holds stages side by side). Data flows frontend -> compile ->
# runtime, and each imports what it hands its graph to.
STAGES = ["ann2snn.data", "ann2snn.runtime", "ann2snn.compile", "ann2snn.frontend", "ann2snn.verify",
          ("ann2snn.train", "ann2snn.energy"), "ann2snn.pipeline", "ann2snn.console", "ann2snn.cli", "ann2snn.__main__"]
MAX_PLAIN_MODULES = 10


def _part(name: str, parts) -> str | None:
    return next((p for p in sorted(parts, key=len, reverse=True) if name == p or name.startswith(p + ".")), None)


def stage_rank() -> dict[str, int]:
    return {stage: rank for rank, entry in enumerate(STAGES) for stage in (entry if isinstance(entry, tuple) else (entry,))}


def allowed_problems(graph: dict[str, set[str]]) -> list[str]:
    ranks = stage_rank()
    problems = []
    for name, targets in graph.items():
        base = _part(name, BASE)
        if base:
            problems += [f"{name} imports {t}" for t in targets
                         if not any(t == a or t.startswith(a + ".") for a in ALLOWED[base] | {base})]
            continue
        stage = _part(name, ranks)
        if stage is None:
            if name != "ann2snn":
                problems.append(f"{name} belongs to no stage")
            problems += [f"{name} imports the CLI" for t in targets if t == "ann2snn.cli"]
            continue
        for t in targets:
            if t == "ann2snn" and ranks[stage] > ranks["ann2snn.pipeline"]:   # the public API, for the CLI
                continue
            other = _part(t, ranks)
            if _part(t, BASE) or other == stage:
                continue
            if other is None or ranks[other] >= ranks[stage]:
                problems.append(f"{name} imports {t}")
    return problems


def test_dependencies_point_one_way():
    assert allowed_problems(import_graph(MODULES)) == []
    broken = {**import_graph(MODULES), "ann2snn.kernels.reference": {"ann2snn.runtime.snn"},
              "ann2snn.runtime.snn": {"ann2snn.compile.trace"}, "ann2snn.train.loop": {"ann2snn.energy.count"},
              "ann2snn.flat": set()}
    assert sorted(allowed_problems(broken)) == [
        "ann2snn.flat belongs to no stage", "ann2snn.kernels.reference imports ann2snn.runtime.snn",
        "ann2snn.runtime.snn imports ann2snn.compile.trace", "ann2snn.train.loop imports ann2snn.energy.count"]


def plain_modules(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.py"))


def test_the_package_is_laid_out_by_stage():
    """At most 10 plain modules beside the stage packages, and every stage's folder is there."""
    assert len(plain_modules(REPO / "ann2snn")) <= MAX_PLAIN_MODULES, plain_modules(REPO / "ann2snn")
    folders = {p.name for p in (REPO / "ann2snn").iterdir() if (p / "__init__.py").is_file()}
    assert {s.split(".")[1] for s in stage_rank() if "." in s and s.count(".") == 1} - {"pipeline", "cli", "__main__"} <= folders


def init_problems(name: str, source: str) -> list[str]:
    """A stage's __init__ says in two lines what the stage does and exports its public names: a
    docstring of two lines of text, imports and __all__, nothing else."""
    tree = ast.parse(source)
    doc = ast.get_docstring(tree) or ""
    problems = [] if len([line for line in doc.splitlines() if line.strip()]) == 2 else [f"{name}: not a two-line docstring"]
    body = tree.body[1:] if doc else tree.body
    problems += [f"{name}:{node.lineno} is not an import or __all__" for node in body
                 if not isinstance(node, (ast.Import, ast.ImportFrom))
                 and not (isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "__all__")]
    if "__all__" not in source:
        problems.append(f"{name}: no __all__")
    return problems


def test_each_stage_says_what_it_does():
    stages = [name for name, path in MODULES.items() if path.name == "__init__.py" and name.count(".") == 1
              and _part(name, stage_rank())]
    assert len(stages) >= 7
    assert [p for name in stages for p in init_problems(name, MODULES[name].read_text())] == []
    assert init_problems("m", '"""One line."""\ndef f():\n    pass\n') == [
        "m: not a two-line docstring", "m:2 is not an import or __all__", "m: no __all__"]


def test_each_module_imports_alone():
    """In a fresh interpreter, each module imported first (the package's modules dropped between):
    an import cycle that only one entry point trips shows here."""
    script = ("import importlib, sys\nfailed = []\nfor name in sys.argv[1:]:\n"
              "    for loaded in [m for m in sys.modules if m == 'ann2snn' or m.startswith('ann2snn.')]:\n"
              "        del sys.modules[loaded]\n"
              "    try:\n        importlib.import_module(name)\n"
              "    except Exception as err:\n        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
              "print('\\n'.join(failed))\n")
    names = sorted(set(MODULES) - {"ann2snn.__main__"})   # importing it runs the CLI
    done = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr


# --- one table -------------------------------------------------------------------------------------

def op_names() -> set[str]:
    from ann2snn.ops import FUNCTION_OPS, MODULE_OPS
    return {f"nn.{t.__name__}" for t in MODULE_OPS} | {op.name for op in FUNCTION_OPS.values()}


# The simulator's rules: how each function runs on Signals, not what it is (test_ops checks that its
# keys are the table's). The zoo builds networks; it lists no ops.
NOT_LISTS = {("ann2snn.runtime.simulator", "FUNCTION_RULES")}


def op_lists(name: str, source: str, names: set[str]) -> list[str]:
    """Literal collections in `source` that name two or more of the table's ops: a second list."""
    tree = ast.parse(source)
    tree.body = [node for node in tree.body if not any(
        (name, ast.unparse(t)) in NOT_LISTS for t in getattr(node, "targets", [getattr(node, "target", None)]) if t)]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
            items = node.keys if isinstance(node, ast.Dict) else node.elts
            listed = [ast.unparse(e) for e in items if e is not None and ast.unparse(e) in names]
            if len(listed) >= 2:
                found.append(f"{name}:{node.lineno} lists {', '.join(listed)}")
    return found


def test_ops_are_listed_in_the_table_alone():
    names = op_names()
    problems = [problem for name, path in MODULES.items() if name != "ann2snn.ops" and not name.startswith("ann2snn.models")
                for problem in op_lists(name, path.read_text(), names)]
    assert problems == []
    assert op_lists("m", "POOLS = (nn.AvgPool2d, nn.AvgPool1d)\nADDS = [operator.add, torch.add]\n", names) == [
        "m:1 lists nn.AvgPool2d, nn.AvgPool1d", "m:2 lists operator.add, torch.add"]


# --- energy and size -------------------------------------------------------------------------------

def interpreters(source: str) -> list[str]:
    """Classes that subclass an fx Interpreter."""
    return [node.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ClassDef)
            and any(ast.unparse(b).split(".")[-1] == "Interpreter" for b in node.bases)]


def test_energy_runs_no_interpreter_of_its_own():
    """It counts on the lowered simulator and evaluator (energy/observe.py)."""
    for name, path in MODULES.items():
        if name.startswith("ann2snn.energy"):
            assert interpreters(path.read_text()) == [], name
    assert interpreters("from torch import fx\nclass _Counter(fx.Interpreter):\n    pass\n") == ["_Counter"]


def test_no_module_outgrows_one_sitting():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize("name", ["ann2snn.levels", "ann2snn.ops", "ann2snn.energy.observe"])
def test_the_walk_sees_the_modules(name):
    assert name in MODULES and MODULES[name].is_file()


# --- one reader of ONNX files ----------------------------------------------------------------------

READER = "ann2snn.frontend.reader"
# What reads an ONNX file, or its external data, unchecked; and what lets onnxruntime do so.
ONNX_LOADERS = {"onnx.load", "onnx.load_model", "onnx.load_external_data_for_model",
                "onnx.external_data_helper.load_external_data_for_model"}
SESSION_MAKER = READER   # onnxruntime_session: checks the file first


def onnx_loads(name: str, source: str) -> list[str]:
    """Calls in `source` that load an ONNX file past reader.load_checked's checks (the external data
    inside the model's folder): onnx's loaders, under their dotted names or imported from onnx, and
    onnxruntime sessions."""
    imported = {a.asname or a.name: f"{node.module}.{a.name}" for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ImportFrom) and node.module in ("onnx", "onnx.external_data_helper",
                                                                        "onnxruntime")
                for a in node.names}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            called = ast.unparse(node.func)
            called = imported.get(called, called)
            if called in ONNX_LOADERS and name != READER:
                found.append(f"{name}:{node.lineno} calls {called}")
            if called.endswith("InferenceSession") and name != SESSION_MAKER:
                found.append(f"{name}:{node.lineno} calls {called}")
    return found


def test_onnx_files_are_loaded_by_the_reader_alone():
    bench = {f"bench.{p.stem}": p for p in (REPO / "bench").glob("*.py")}
    problems = [problem for name, path in {**MODULES, **bench}.items()
                for problem in onnx_loads(name, path.read_text())]
    assert problems == []
    broken = ("import onnx\nfrom onnx import load_model as read\nimport onnxruntime as ort\n"
              "m = onnx.load(p)\nn = read(p)\ns = ort.InferenceSession(p)\n")
    assert onnx_loads("m", broken) == ["m:4 calls onnx.load", "m:5 calls onnx.load_model",
                                       "m:6 calls ort.InferenceSession"]
    assert onnx_loads(READER, "import onnx\nm = onnx.load(p)\n") == []
