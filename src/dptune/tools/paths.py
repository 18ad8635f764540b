"""argparse types for the tools' path options (kept free of heavy imports: the benchmark reads it)."""

from __future__ import annotations

import argparse


def path_arg(value: str) -> str:
    """A path option's value: an empty one (``--json ''``, an unset shell variable) is refused, where it
    would be no file at all (evaluate wrote no scores and said nothing) or the current folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder name")
    return value
