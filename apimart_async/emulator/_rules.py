"""What the emulated service accepts on ``POST /v1/videos/generations``.

Written apart from the SDK's own rules on purpose: it states the service's behaviour from
apimart-api.md, including where the service is lenient (gemini maps unknown aspect ratios to
16:9; fields a model does not take are ignored, as JSON APIs usually do [assumed]).
"""

from __future__ import annotations

from typing import Any, Final, cast
from urllib.parse import urlsplit

__all__ = ["KNOWN_MODELS", "OTHER_MODELS", "RuleError", "check_body", "price"]

SEED_MODELS: Final = (
    "gemini-omni-flash-preview",
    "viduq3",
    "viduq3-mix",
    "sora-2-preview",
    "sora-2-pro-preview",
)
#: Models the real service serves beyond the seeds [docs]; the emulator accepts any fields.
OTHER_MODELS: Final = (
    "veo3.1",
    "veo3.1-fast",
    "kling-v3",
    "seedance-1-pro",
    "hailuo-02",
    "wan2.5",
    "viduq3-pro",
    "viduq3-turbo",
)
KNOWN_MODELS: Final = SEED_MODELS + OTHER_MODELS

_VIDU_FORMATS: Final = {"png", "jpeg", "jpg", "webp"}
_GEMINI_FORMATS: Final = {"png", "jpeg", "jpg"}
_SORA_FORMATS: Final = {"jpeg", "jpg", "png", "webp"}
_IMAGE_EXTS: Final = {"jpeg", "jpg", "png", "webp", "gif", "bmp", "tif", "tiff", "heic"}


# The one exception class outside ``apimart_async._errors``, on purpose: the emulator is an
# independent implementation of the service and imports nothing of the SDK, so the SDK's error
# tree cannot leak into the replies the SDK is tested against. It never leaves the emulator:
# the server turns it into a 400 reply.
class RuleError(Exception):
    """A request body broke one of the service's rules: ``param`` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _http_url(value: Any) -> bool:
    if not isinstance(value, str) or any(c.isspace() for c in value):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


def _ext(url: str) -> str | None:
    last = urlsplit(url).path.rsplit("/", 1)[-1]
    if "." not in last:
        return None
    ext = last.rsplit(".", 1)[-1].lower()
    return ext if ext in _IMAGE_EXTS else None


def _url_list(body: dict[str, Any], name: str, *, data_video: bool = False) -> list[str]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise RuleError(name, f"{name} must be an array of URLs")
    urls = cast("list[object]", value)
    for i, url in enumerate(urls):
        ok = _http_url(url) or (
            data_video and isinstance(url, str) and url.startswith("data:video/")
        )
        if not ok:
            raise RuleError(name, f"{name}[{i}] is not a valid URL")
    return cast("list[str]", urls)  # each one checked above


def _formats(urls: list[str], allowed: set[str], model: str) -> None:
    for i, url in enumerate(urls):
        ext = _ext(url)
        if ext is not None and ext not in allowed:
            raise RuleError(
                "image_urls", f"image_urls[{i}]: format {ext} is not supported by {model}"
            )


def check_body(body: Any) -> tuple[str, dict[str, Any]]:
    """Validate a submit body; returns (model, the parameters the task will use) or raises
    RuleError naming the parameter."""
    if not isinstance(body, dict):
        raise RuleError("body", "request body must be a JSON object")
    body = cast("dict[str, Any]", body)  # JSON: keys are strings
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RuleError("model", "model is required")
    if model not in KNOWN_MODELS:
        raise RuleError("model", f"model {model} does not exist or is not available")
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise RuleError("prompt", "prompt must be a string")
    for name in ("webhook",):
        if body.get(name) is not None and not _http_url(body[name]):
            raise RuleError(name, f"{name} must be an http(s) URL")
    params: dict[str, Any] = {}
    if model.startswith("gemini"):
        images = _url_list(body, "image_urls")
        videos = _url_list(body, "video_urls", data_video=True)
        if not (prompt and prompt.strip()) and not images and not videos:
            raise RuleError(
                "prompt", "prompt or reference media (image_urls / video_urls) is required"
            )
        if len(images) > 16:
            raise RuleError("image_urls", "at most 16 reference images are supported")
        _formats(images, _GEMINI_FORMATS, model)
        if len(videos) > 1:
            raise RuleError("video_urls", "only one reference video is supported")
        resolution = body.get("resolution", "720p")
        if resolution != "720p":
            raise RuleError("resolution", "only 720p is supported")
        if body.get("extend_from_task_id") is not None:
            if not isinstance(body["extend_from_task_id"], str) or not body["extend_from_task_id"]:
                raise RuleError("extend_from_task_id", "extend_from_task_id must be a task id")
            if videos:
                raise RuleError(
                    "extend_from_task_id", "extend_from_task_id cannot be used with video_urls"
                )
        aspect = body.get("aspect_ratio")
        params["aspect_ratio"] = "9:16" if aspect == "9:16" and not videos else "16:9"
        params["duration"] = 8
    elif model.startswith("viduq3") and model in SEED_MODELS:
        if not isinstance(prompt, str) or not prompt.strip():
            raise RuleError("prompt", "prompt is required")
        if len(prompt) > 5000:
            raise RuleError("prompt", "prompt must be at most 5000 characters")
        images = _url_list(body, "image_urls")
        if not 1 <= len(images) <= 7:
            raise RuleError("image_urls", "1 to 7 reference images are required")
        _formats(images, _VIDU_FORMATS, model)
        duration = body.get("duration", 5)
        low = 1 if model == "viduq3-mix" else 3
        if not _int(duration) or not low <= duration <= 16:
            raise RuleError("duration", f"duration must be an integer from {low} to 16")
        resolutions = ("720p", "1080p") if model == "viduq3-mix" else ("540p", "720p", "1080p")
        if body.get("resolution", "720p") not in resolutions:
            raise RuleError("resolution", f"resolution must be one of {', '.join(resolutions)}")
        if body.get("aspect_ratio", "16:9") not in ("16:9", "9:16", "4:3", "3:4", "1:1"):
            raise RuleError("aspect_ratio", "unsupported aspect_ratio")
        if body.get("seed") is not None and not _int(body["seed"]):
            raise RuleError("seed", "seed must be an integer")
        params["duration"] = duration
    elif model.startswith("sora-2"):
        if not isinstance(prompt, str) or not prompt.strip():
            raise RuleError("prompt", "prompt is required")
        duration = body.get("duration", 4)
        if not _int(duration) or duration not in (4, 8, 12):
            raise RuleError("duration", "duration must be 4, 8 or 12")
        if body.get("aspect_ratio", "landscape") not in ("landscape", "16:9", "portrait", "9:16"):
            raise RuleError(
                "aspect_ratio", "aspect_ratio must be landscape, portrait, 16:9 or 9:16"
            )
        if "resolution" in body and body["resolution"] is not None:
            if model != "sora-2-pro-preview":
                raise RuleError("resolution", "resolution is only supported by sora-2-pro-preview")
            if body["resolution"] not in ("standard", "high"):
                raise RuleError("resolution", "resolution must be standard or high")
        # only the first image is used, but the page's format limit is on the whole array
        images = _url_list(body, "image_urls")
        _formats(images, _SORA_FORMATS, model)
        params["duration"] = duration
    else:
        duration = body.get("duration")
        ok = isinstance(duration, int) and not isinstance(duration, bool) and 0 < duration <= 60
        params["duration"] = duration if ok else 5
    return model, params


#: USD per video, or per second for the sora models [assumed prices, for the emulator only].
_FLAT_PRICE: Final = {
    "gemini-omni-flash-preview": 1.0,
    "viduq3": 0.3,
    "viduq3-mix": 0.35,
}
_PER_SECOND: Final = {"sora-2-preview": 0.1, "sora-2-pro-preview": 0.3}


def price(model: str, params: dict[str, Any]) -> float:
    if model in _PER_SECOND:
        return round(_PER_SECOND[model] * int(params.get("duration", 4)), 4)
    return _FLAT_PRICE.get(model, 0.5)
