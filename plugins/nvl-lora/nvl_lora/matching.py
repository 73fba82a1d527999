"""Which modules a LoRA target list selects (Megatron-Bridge's ``module_matcher`` semantics).

A module matches a pattern when its short name (the last dotted component) equals the pattern, or
when its full dotted name matches the pattern read as a glob: ``*`` stands for any run of characters
(dots included) and the match is anchored at both ends. Other characters are literal (Megatron-Bridge
leaves ``.`` unescaped, so it matches any character there; escaping it changes nothing for real module
names and avoids surprises).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$")


def pattern_matches(pattern: str, full_name: str) -> bool:
    """Whether ``pattern`` selects the module called ``full_name``."""
    short = full_name.rsplit(".", 1)[-1]
    if pattern == short:
        return True
    return _glob_regex(pattern).match(full_name) is not None


def first_match(patterns: Iterable[str], full_name: str) -> str | None:
    """The first pattern that selects ``full_name``, or ``None``."""
    for p in patterns:
        if pattern_matches(p, full_name):
            return p
    return None
