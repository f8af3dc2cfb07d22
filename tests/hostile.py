"""What every hostile-input test checks: the CLI's promise for bad input (docs/converting.md, "Exit codes").

A refused command exits with code 2 (1: built but failed verification), prints exactly one line on
stderr that starts with `ann2snn: error:` and names the file and the problem, prints no
traceback, and creates or modifies no file. `invoke` runs the real click command in this process
(hundreds of cases in seconds); the test files also run a few cases through a subprocess.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from click.testing import CliRunner, Result

from ann2snn import cli


def invoke(*args: str | os.PathLike) -> Result:
    """`ann2snn ARGS` in-process; stdout and stderr apart, exceptions caught into the result."""
    return CliRunner().invoke(cli.cli, [str(a) for a in args], prog_name="ann2snn", catch_exceptions=True)


def snapshot(*folders: str | os.PathLike) -> dict[str, str]:
    """Every file under `folders` with a digest of its bytes and its modification time."""
    files = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                stat = path.stat()
                files[str(path)] = f"{hashlib.sha256(path.read_bytes()).hexdigest()}:{stat.st_mtime_ns}"
    return files


def assert_refused(result: Result, *fragments: str, code: int = 2, before: dict[str, str] | None = None,
                   folders: tuple = ()) -> str:
    """The command exited with `code`, printed one `ann2snn: error:` line holding every fragment
    (a path, an op, the expected and found shapes, ...) and no traceback; with `before` (a
    snapshot of `folders`), no file there was created, removed or changed. Returns the line."""
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("ann2snn: error: "), line
    assert "internal error" not in line, line
    for fragment in fragments:
        assert str(fragment) in line, (fragment, line)
    if before is not None:
        assert snapshot(*folders) == before, "a refused command created or changed a file"
    return line


def assert_usage_error(result: Result, fragment: str) -> None:
    """Click refused the command line itself (its own format: usage, hint, `Error:` line), code 2."""
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr and "Error: " in result.stderr and fragment in result.stderr
