"""How an `ann2snn` command ends: its exit codes, its JSON output, and its one-line errors."""
from __future__ import annotations

import json
import math
import sys
import warnings
from functools import wraps

import click

from ..errors import Ann2SnnError
from ..runtime.memory import is_allocation_failure


# Exit codes, one meaning each (docs/converting.md, `ann2snn --help`).
EXIT_VERIFICATION_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL_ERROR = 3


def strict_json(value) -> str:
    """`value` as strict JSON (RFC 8259): a float that is not finite (a float site's clip bound of
    inf, say) becomes null instead of Python's Infinity / NaN tokens, which JSON parsers refuse."""
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), indent=2, allow_nan=False, default=str)


def _one_line(text: str) -> str:
    """A message on one line: newlines in a path or a name are shown escaped."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def reports_errors(command):
    """Bad input: one line on stderr and exit code 2; an internal error: one line asking for a bug
    report and exit code 3. No traceback unless --debug, and warnings raised on the way to an error
    are dropped so that the error is the only line."""
    @wraps(command)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            try:
                result = command(*args, **kwargs)
            except Ann2SnnError as err:
                if debug:
                    raise
                click.echo(f"ann2snn: error: {_one_line(str(err))}", err=True)
                sys.exit(EXIT_BAD_INPUT)
            except (click.exceptions.Exit, click.ClickException, SystemExit, KeyboardInterrupt):
                raise
            except Exception as err:
                if debug:
                    raise
                if is_allocation_failure(err):   # outside the stages that name themselves (memory.stage)
                    click.echo("ann2snn: error: out of memory; lower --batch-size (or the samples asked for)", err=True)
                    sys.exit(EXIT_BAD_INPUT)
                click.echo(f"ann2snn: error: internal error, please report it with the command that caused it "
                           f"(--debug shows the traceback): {type(err).__name__}: "
                           f"{_one_line(str(err).strip().splitlines()[0] if str(err).strip() else '')}", err=True)
                sys.exit(EXIT_INTERNAL_ERROR)
        for w in caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        return result
    return wrapper
