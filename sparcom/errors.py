"""The error a user's bad input raises, and the wording helpers every check shares. A leaf module:
it imports nothing of sparcom, so any module may raise these without an import circle."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A bad config value; the message is one line: ``key: value ...; expected ...``."""


def closest(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest candidate, or nothing when none is close."""
    found = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.75)
    return f" (did you mean {found[0]}?)" if found else ""
