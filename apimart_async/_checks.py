"""The checks of numeric arguments, in one place: each raises ``ValidationError`` naming the
field and the rule before any request is sent."""

from __future__ import annotations

from ._errors import FieldError, ValidationError

__all__ = ["check_non_negative_seconds", "check_positive_int", "check_seconds"]


def check_positive_int(name: str, value: object, *, allow_none: bool = False) -> None:
    """A whole number >= 1 (``bool`` is not a number here); None too with ``allow_none``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError([FieldError(name, "must be a whole number >= 1", value)])


def check_seconds(name: str, value: object) -> None:
    """A positive number of seconds, or None (no limit)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValidationError([FieldError(name, "must be a positive number of seconds", value)])


def check_non_negative_seconds(name: str, value: object) -> None:
    """Zero or more seconds, or None."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValidationError([FieldError(name, "must be >= 0 seconds", value)])
