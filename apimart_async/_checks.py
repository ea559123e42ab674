"""The checks of numeric settings and arguments, in one place, raising one error type.

Every count (``concurrency``, ``max_retries``...) and every number of seconds or rate
(``timeout``, ``requests_per_second``, ``PollPolicy`` fields...) of the client, a batch, a
method or a policy is checked here, before any request is sent. Each check raises
``OptionError`` naming the field and the rule: a ``ConfigurationError`` and a
``ValidationError`` (so a ``ValueError``) at once, so whatever a caller catches for a bad
setting keeps working wherever the setting is given.
"""

from __future__ import annotations

import math
import os
import sys
from typing import cast

from ._errors import FieldError, OptionError, ValidationError

__all__ = [
    "check_int",
    "check_non_negative_number",
    "check_non_negative_seconds",
    "check_path",
    "check_positive_int",
    "check_positive_number",
    "check_seconds",
    "path_rule",
    "shown_path",
]


def check_int(
    name: str, value: object, *, minimum: int = 1, allow_none: bool = False, least: str = ""
) -> None:
    """A whole number >= ``minimum`` (``bool`` is not a number here); None too with
    ``allow_none``. ``least`` says where the minimum comes from (``status_concurrency (8)``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(
            [FieldError(name, f"must be a whole number >= {least or minimum}", value)]
        )


def check_positive_int(name: str, value: object, *, allow_none: bool = False) -> None:
    """A whole number >= 1; None too with ``allow_none``."""
    check_int(name, value, minimum=1, allow_none=allow_none)


def check_positive_number(
    name: str, value: object, *, unit: str = "", allow_none: bool = False, finite: bool = False
) -> None:
    """A number > 0 (infinity too, unless ``finite``); ``unit`` ends the rule (``of
    seconds``); None too with ``allow_none``."""
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0
        or (finite and not math.isfinite(value))
    ):
        rule = f"must be a positive number {unit}".rstrip()
        raise OptionError([FieldError(name, rule, value)])
    _fits_a_float(name, value)


def check_seconds(name: str, value: object) -> None:
    """A positive number of seconds, or None (no limit)."""
    check_positive_number(name, value, unit="of seconds", allow_none=True)


def check_non_negative_number(name: str, value: object, *, unit: str, finite: bool) -> None:
    """A number >= 0 (infinity too, unless ``finite``); ``unit`` names what it counts."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value >= 0
        or (finite and not math.isfinite(value))
    ):
        raise OptionError([FieldError(name, f"must be >= 0 {unit}", value)])
    _fits_a_float(name, value)


def _fits_a_float(name: str, value: int | float) -> None:
    """Times and rates are floats inside: a whole number too large for one (``10**400``)
    is refused by name, not an ``OverflowError`` later."""
    if isinstance(value, int) and value > _FLOAT_MAX:
        raise OptionError([FieldError(name, "is too large (at most about 1.8e308)", value)])


_FLOAT_MAX = int(sys.float_info.max)


def check_non_negative_seconds(name: str, value: object) -> None:
    """Zero or more seconds, or None."""
    if value is not None:
        check_non_negative_number(name, value, unit="seconds", finite=False)


#: ``path_rule``'s rules, and the value a ``FieldError`` shows for a path that breaks one.
NUL_RULE = "must not contain a NUL character"
SURROGATE_RULE = (
    "must be a path a file system can hold (it holds a lone surrogate, as JSON's \\ud800)"
)


def path_rule(path: object) -> str | None:
    """The rule a path (str, bytes or os.PathLike) breaks on every file system, or None: a NUL
    character (``open`` would raise a raw ``ValueError``), or a lone surrogate that no file
    name holds (a raw ``UnicodeEncodeError``)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        return None
    text: str | bytes = os.fspath(cast("str | bytes | os.PathLike[str] | os.PathLike[bytes]", path))
    if isinstance(text, bytes):
        return NUL_RULE if b"\x00" in text else None
    if "\x00" in text:
        return NUL_RULE
    try:
        os.fsencode(text)  # the file system's encoding, as open() uses it
    except UnicodeEncodeError:
        return SURROGATE_RULE
    return None


def shown_path(path: object) -> str:
    """A path that breaks ``path_rule`` as an error shows it (a NUL cut out of the middle)."""
    text = os.fspath(cast("str | os.PathLike[str]", path))
    return "...\\x00..." if "\x00" in str(text) else ascii(text)


def check_path(name: str, path: object) -> None:
    """``ValidationError`` naming ``name`` for a path that breaks ``path_rule``."""
    rule = path_rule(path)
    if rule is not None:
        raise ValidationError([FieldError(name, rule, shown_path(path))])
