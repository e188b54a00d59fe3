"""One error type for every user-facing failure: a message, and where it happened (file, line, column)."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class PeftcError(Exception):
    """A problem with the user's input. The CLI prints `str(err)` and exits non-zero, no traceback."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 column: int | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.column = column
        self.source = source

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line:
                where += f":{self.line}"
                if self.column:
                    where += f":{self.column}"
            where += ": "
        text = f"{where}{self.message}"
        if self.source is not None and self.line:
            lines = self.source.splitlines()
            if 0 < self.line <= len(lines):
                src = lines[self.line - 1]
                text += f"\n    {src}"
                if self.column:
                    text += "\n    " + " " * (self.column - 1) + "^"
        return text


class PeftcWarning(UserWarning):
    """Something in the user's input that is allowed but probably not meant (peft warns about the same).
    The library issues it with `warnings.warn`; the CLI prints it as `peftc: warning: ...` on stderr."""


def did_you_mean(word: str, choices: Iterable[str], n: int = 3, aliases: dict[str, str] | None = None) -> str:
    """' (did you mean 'x'?)' for the closest choices, or ''. `aliases` maps other spellings (e.g. peft's
    config keys) to a choice."""
    choices = list(choices)
    if aliases and word in aliases:
        return f" (did you mean '{aliases[word]}'?)"
    close = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    close.sort(key=lambda c: sorted(c) != sorted(word))   # swapped letters ('lroa' -> 'lora') first
    if not close:
        # a short name typed with extra letters: 'rnak' -> 'r'
        close = [c for c in choices if len(c) <= 2 and word.lower().startswith(c.lower())][:n]
    if not close:
        return ""
    return " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)"
