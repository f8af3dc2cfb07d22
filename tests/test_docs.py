"""The docs cannot go stale: the generated pages equal what docs/generate.py writes from the code, every
relative link of README.md and docs/*.md points to a file that exists, and the README stays short."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENERATE = REPO / "docs" / "generate.py"
README_MAX_LINES = 250
# [text](target) and ![alt](target); links inside code are dropped first (without_code)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def load_generator():
    spec = importlib.util.spec_from_file_location("docs_generate", GENERATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_pages_are_current():
    done = subprocess.run([sys.executable, str(GENERATE), "--check"], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr


def test_the_check_fails_on_a_stale_copy(tmp_path, capsys):
    generator = load_generator()
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in generator.PAGES:
        shutil.copy(REPO / "docs" / name, docs / name)
    assert generator.main(["--check", "--docs", str(docs)]) == 0
    # an op renamed in the support table, an option renamed in the reference: each copy is stale
    support = docs / "onnx-support.md"
    support.write_text(support.read_text().replace("| Conv |", "| ConvTranspose |"))
    assert generator.stale_pages(docs) == ["onnx-support.md"]
    cli = docs / "cli.md"
    cli.write_text(cli.read_text().replace("`--calib DATA`", "`--calibration DATA`"))
    assert generator.main(["--check", "--docs", str(docs)]) == 1
    err = capsys.readouterr().err
    assert "onnx-support.md is stale" in err and "cli.md is stale" in err
    # a missing page is stale too, and writing brings every page back
    support.unlink()
    assert generator.stale_pages(docs) == ["onnx-support.md", "cli.md"]
    assert generator.main(["--docs", str(docs)]) == 0 and generator.stale_pages(docs) == []


def test_the_generated_pages_name_what_the_code_registers():
    """Spot checks that the pages come from the registry and click, not from a copy of them."""
    from ann2snn.cli import cli
    from ann2snn.frontend import supported_op_types

    support = (REPO / "docs" / "onnx-support.md").read_text()
    assert all(f"| {op} |" in support for op in supported_op_types())
    reference = (REPO / "docs" / "cli.md").read_text()
    for name, command in cli.commands.items():
        assert f"## `ann2snn {name}`" in reference
        assert all(opt in reference for p in command.params for opt in getattr(p, "opts", []) if opt.startswith("--"))


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def without_code(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def broken_links(page: Path) -> list[str]:
    """Relative links of a Markdown page to a file that does not exist, or to a heading that its page
    lacks (web links are skipped; links inside code are no links)."""
    broken = []
    for target in LINK.findall(without_code(page.read_text())):
        path, _, anchor = target.partition("#")
        if re.match(r"[a-z]+:", path):
            continue
        linked = page.parent / path if path else page
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(f"{page.name}: {target}")
    return broken


def test_every_relative_link_points_to_a_file():
    assert len(pages()) >= 10
    assert [b for page in pages() for b in broken_links(page)] == []


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# here\n")
    page.write_text("# A `page`: here\n[ok](there.md#here) [web](https://example.org/x.md) `[code](nowhere.md)`\n"
                    "[self](#a-page-here) ![picture](missing.png) and [gone](docs/gone.md)\n"
                    "[no such heading](there.md#there) [nor here](#here)\n```\n[in a block](nope.md)\n```\n")
    assert broken_links(page) == ["page.md: missing.png", "page.md: docs/gone.md", "page.md: there.md#there",
                                  "page.md: #here"]


def readme_problems(readme: str, docs: set[str]) -> list[str]:
    """What is wrong with a README: too long, a docs page it does not link, a link out of the repository."""
    problems = [f"{len(readme.splitlines())} lines"] if len(readme.splitlines()) > README_MAX_LINES else []
    linked = {Path(t.split("#")[0]).name for t in LINK.findall(readme)}
    problems += [f"no link to docs/{name}" for name in sorted(docs - linked)]
    return problems + [f"links {t}" for t in LINK.findall(readme) if t.startswith("../")]


def test_the_readme_is_short_and_links_every_docs_page():
    docs = {p.name for p in (REPO / "docs").glob("*.md")}
    assert readme_problems((REPO / "README.md").read_text(), docs) == []
    long = "line\n" * (README_MAX_LINES + 1) + "[spec](../shared/METHOD.md) [one](docs/one.md)\n"
    assert readme_problems(long, {"one.md", "two.md"}) == [
        f"{README_MAX_LINES + 2} lines", "no link to docs/two.md", "links ../shared/METHOD.md"]


def shared_references(root: Path) -> list[str]:
    """Files under `root` (sources, docs, build files; not hidden folders such as .venv) that cite
    ../shared or METHOD.md."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and not d.endswith(".egg-info")
                             and d not in ("__pycache__", "runs", "build"))
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix not in (".py", ".md", ".toml", ".c", ".txt", "") or path == Path(__file__):
                continue
            text = path.read_text(errors="replace")
            if "../shared" in text or "METHOD.md" in text:
                found.append(path.relative_to(root).as_posix())
    return found


def test_nothing_cites_the_shared_method(tmp_path):
    """The method is docs/method.md: the repository does not depend on ../shared any more."""
    assert shared_references(REPO) == []
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text('"""The neuron of METHOD.md section 3."""\n')
    (tmp_path / "ok.py").write_text('"""The neuron of docs/method.md section 3."""\n')
    assert shared_references(tmp_path) == ["pkg/mod.py"]
