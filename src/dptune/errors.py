"""Errors that reach the user as one line, without a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type's name
    when the message is empty: what a one-line error quotes of a library's exception."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


class ConfigError(ValueError):
    """A setting that cannot work (conflicting options, a size the backbone cannot take, a model
    reference that does not resolve). The message names the setting and, where one exists, the fix."""


class DataError(ValueError):
    """Bad input data. The message names the file and what is wrong with it."""


class ModelOutputError(ValueError):
    """The model's output is NaN or infinite: its weights are non-finite, or finite but so large that
    the forward pass overflows (a run that diverged after its last finite check). Nothing is predicted,
    scored, calibrated or exported from such an output."""


@contextmanager
def of_image(name: str) -> Iterator[None]:
    """A ``ModelOutputError`` raised inside names the image ``name`` whose output it was."""
    try:
        yield
    except ModelOutputError as e:
        raise ModelOutputError(f"{name}: {e}") from None


class DataErrors(DataError):
    """Several bad files found in one pass; ``problems`` holds one line per file."""

    def __init__(self, problems: list[str], total: int | None = None, hint: str = "") -> None:
        self.problems = problems
        self.total = total if total is not None else len(problems)
        self.hint = hint
        super().__init__(self.render())

    def render(self, cap: int = 20) -> str:
        lines = self.problems[:cap]
        if self.total > cap:
            lines.append(f"... and {self.total - cap} more")
        summary = f"{self.total} bad sample(s) found before training."
        if self.hint:
            summary += f" {self.hint}"
        return "\n".join([*lines, summary])
