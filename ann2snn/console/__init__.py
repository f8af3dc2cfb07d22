"""Console: what the `ann2snn` command shares: click options, checked paths, tables, strict JSON, one-line errors.

cli.py (the command) is built from these.
"""
from .output import EXIT_BAD_INPUT, EXIT_INTERNAL_ERROR, EXIT_VERIFICATION_FAILED, reports_errors, strict_json
from .tables import channel_summary, count_ops, site_rows

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERNAL_ERROR", "EXIT_VERIFICATION_FAILED", "channel_summary", "count_ops",
           "reports_errors", "site_rows", "strict_json"]
