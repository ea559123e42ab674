"""Type guards for decoded JSON (the emulator's own: it imports nothing of the SDK)."""

from __future__ import annotations

from typing import Any, TypeGuard


def is_object(value: object) -> TypeGuard[dict[str, Any]]:
    """A JSON object (its keys are strings, its values anything JSON)."""
    return isinstance(value, dict)


def is_array(value: object) -> TypeGuard[list[Any]]:
    """A JSON array."""
    return isinstance(value, list)
