"""Per-model rules as data: a new model is a row in ``MODEL_SPECS``, not a class.

Every rule of ``apimart-api.md`` for the seed models is here. Rules that cannot be checked
without fetching the media (pixel size, aspect of an image, video length, file size behind a
URL) are listed in ``ModelSpec.unchecked`` so that ``apimart-async models`` can show them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import attrs

__all__ = ["MODEL_SPECS", "IntRange", "ModelSpec", "get_spec"]

PromptRule = Literal["required", "required_or_media", "optional"]


@attrs.frozen
class IntRange:
    """Inclusive integer range, ``low`` to ``high``."""

    low: int
    high: int

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and self.low <= value <= self.high

    def describe(self) -> str:
        """The range in words, e.g. ``"3 to 16"``."""
        return f"{self.low} to {self.high}"


@attrs.frozen
class ModelSpec:
    """The rules of one model. ``None`` for a field means the model does not take it."""

    name: str
    """The model's name as the service knows it."""
    summary: str
    """One line on what the model does."""
    prompt: PromptRule = "optional"
    """``"required"``, ``"required_or_media"`` (a prompt or reference media) or ``"optional"``."""
    prompt_max_chars: int | None = None
    """The longest prompt taken, in characters (None: no limit known)."""
    image_count: tuple[int, int | None] | None = None
    """(min, max) number of reference images (max None: no limit), or None: not taken."""
    image_formats: tuple[str, ...] = ()
    """Image formats by file extension, checked when the URL path has a known image extension."""
    image_max_bytes: int | None = None
    """The largest reference image taken, in bytes (checked for local files; None: no limit
    known beyond the upload endpoint's 20 MB)."""
    video_count: tuple[int, int | None] | None = None
    """(min, max) number of reference videos (max None: no limit), or None: not taken."""
    durations: IntRange | tuple[int, ...] | None = None
    """A range, an explicit tuple of choices, or None (no duration parameter)."""
    default_duration: int | None = None
    """The duration the service uses when none is given."""
    resolutions: tuple[str, ...] | None = None
    """The resolutions taken, or None: not taken."""
    aspect_ratios: tuple[str, ...] | None = None
    """The aspect ratios taken, or None: not taken."""
    aspect_ratio_fallback: str | None = None
    """The service silently maps unknown aspect ratios to this one instead of refusing them."""
    seed: bool = False
    """Whether the model takes a ``seed``."""
    extend: bool = False
    """Whether the model can extend an earlier task (``extend_from_task_id``)."""
    first_image_only: bool = False
    """The service uses only the first reference image (and its aspect ratio)."""
    video_overrides_aspect: bool = False
    """The service ignores ``aspect_ratio`` when a reference video is given."""
    billing: str = ""
    """How the service bills the model, in words."""
    unchecked: tuple[str, ...] = ()
    """Rules of the service this SDK cannot check before sending (e.g. image sizes)."""


_JPEG_PNG = ("jpeg", "jpg", "png")
_JPEG_PNG_WEBP = ("jpeg", "jpg", "png", "webp")

_VIDU_UNCHECKED = (
    "images must be publicly reachable, at least 128x128, aspect 1:4 to 4:1, at most 50 MB",
)
_SORA_UNCHECKED = (
    "the reference image must be at most 10 MB",
    "the reference image's aspect ratio overrides aspect_ratio",
)


def _vidu(name: str, low: int, resolutions: tuple[str, ...], summary: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        summary=summary,
        prompt="required",
        prompt_max_chars=5000,
        image_count=(1, 7),
        image_formats=_JPEG_PNG_WEBP,
        durations=IntRange(low, 16),
        default_duration=5,
        resolutions=resolutions,
        aspect_ratios=("16:9", "9:16", "4:3", "3:4", "1:1"),
        seed=True,
        billing="per video",
        unchecked=_VIDU_UNCHECKED,
    )


def _sora(name: str, resolutions: tuple[str, ...] | None, summary: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        summary=summary,
        prompt="required",
        image_count=(0, None),
        image_formats=_JPEG_PNG_WEBP,
        durations=(4, 8, 12),
        default_duration=4,
        resolutions=resolutions,
        aspect_ratios=("landscape", "16:9", "portrait", "9:16"),
        first_image_only=True,
        image_max_bytes=10 * 1024 * 1024,
        billing="per second of video",
        unchecked=_SORA_UNCHECKED,
    )


MODEL_SPECS: Mapping[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="gemini-omni-flash-preview",
            summary="text, image or video to video; 720p, 24 fps, 3-10 s with audio",
            prompt="required_or_media",
            image_count=(0, 16),
            image_formats=_JPEG_PNG,
            video_count=(0, 1),
            resolutions=("720p",),
            aspect_ratios=("16:9", "9:16"),
            aspect_ratio_fallback="16:9",
            extend=True,
            video_overrides_aspect=True,
            billing="per video",
            unchecked=("the reference video must be 1 to 24 s long (3 s or less recommended)",),
        ),
        _vidu("viduq3", 3, ("540p", "720p", "1080p"), "reference images to video, 3-16 s"),
        _vidu("viduq3-mix", 1, ("720p", "1080p"), "reference images to video, 1-16 s"),
        _sora("sora-2-preview", None, "text or image to video, 4/8/12 s"),
        _sora("sora-2-pro-preview", ("standard", "high"), "sora-2 with a high resolution"),
    )
}
"""The rules of every model this SDK knows, by name; other models get generic checks only."""


def get_spec(model: str) -> ModelSpec | None:
    """The rules of ``model``, or None for a model this SDK does not know yet."""
    return MODEL_SPECS.get(model)
