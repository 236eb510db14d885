"""User-facing errors.

Library code raises these for problems the user can fix (bad input files, wrong options, missing
metadata). The CLI turns them into a one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations


class HoverdaskError(Exception):
    """A problem with the user's input: say what is wrong and what to do about it."""


class SlideError(HoverdaskError):
    """A slide cannot be opened or lacks what processing needs (e.g. its pixel size).

    ``code`` says which kind of problem it is (``empty``, ``truncated``, ``not-a-slide``,
    ``damaged``, ``no-mpp``, ...), so that ``hoverdask check`` can name the fix; the message is
    what the user reads.
    """

    def __init__(self, message: str, *, code: str = "unreadable") -> None:
        super().__init__(message)
        self.code = code


class CheckpointError(HoverdaskError):
    """A model file cannot be loaded safely, or does not fit the HoVer-Net layout."""


class DatasetError(HoverdaskError):
    """A training/evaluation dataset folder is missing files or has inconsistent labels."""


def one_line(error: BaseException | None) -> str:
    """``Kind: message`` on one line, as the cohort summary reports a failed slide."""
    if error is None:
        return "unknown error"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
