"""Errors and warnings meant for the person running ctgridit.

A :class:`CTGridItError` describes a problem with the user's input or
environment (a missing file, a 2D image, an output that exists). The command
line prints it as one line, ``error: <what>: <problem>; <what to do>``, and
exits with code 2, without a traceback. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
import textwrap


class CTGridItError(Exception):
    """A user-facing error: what is wrong, with which file, and what to do."""

    exit_code = 2

    def __init__(self, problem: str, path: str | os.PathLike | None = None, hint: str | None = None):
        self.problem = problem.rstrip(". ")
        self.path = None if path is None else os.fspath(path)
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.path}: {self.problem}" if self.path else self.problem
        if self.hint:
            text += f"; {self.hint.rstrip('.')}"
        return " ".join(text.split())  # never more than one line


class CTGridItWarning(UserWarning):
    """Something the user should know (a resampled DICOM series, a chosen series)."""


def shorten(text: str, width: int) -> str:
    """``text`` on one line, cut at a word boundary to at most ``width`` characters (an error's cause in its line)."""
    return textwrap.shorten(" ".join(str(text).split()), width=width, placeholder=" ...")
