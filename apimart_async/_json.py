"""Type guards for decoded JSON: ``json.loads`` gives ``Any``; these say what was checked."""

from __future__ import annotations

from typing import Any, TypeGuard

__all__ = ["is_array", "is_object"]


def is_object(value: object) -> TypeGuard[dict[str, Any]]:
    """A JSON object (its keys are strings, its values anything JSON)."""
    return isinstance(value, dict)


def is_array(value: object) -> TypeGuard[list[Any]]:
    """A JSON array."""
    return isinstance(value, list)
