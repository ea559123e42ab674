"""Request and reply models: frozen attrs classes, validated against the rules in ``_specs``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import types
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Final, cast
from urllib.parse import urlsplit

import attrs

from ._errors import ApimartWarning, FieldError, ValidationError
from ._results import Balance, DownloadedFile, Task, TaskError, TaskStatus, UploadedImage, Video
from ._specs import IntRange, ModelSpec, get_spec

__all__ = [
    "Balance",
    "DownloadedFile",
    "Task",
    "TaskError",
    "TaskStatus",
    "UploadedImage",
    "Video",
    "VideoRequest",
]

#: Field names of ``VideoRequest`` that map one to one onto the body.
_TYPED_FIELDS = (
    "prompt",
    "image_urls",
    "video_urls",
    "duration",
    "resolution",
    "aspect_ratio",
    "seed",
    "extend_from_task_id",
    "webhook",
)
#: The keys of ``from_dict`` that are fields (the rest go to ``extra``).
_FIELD_NAMES = frozenset({"model", *_TYPED_FIELDS})
_IMAGE_EXTENSIONS = frozenset({"jpeg", "jpg", "png", "webp", "gif", "bmp", "tif", "tiff", "heic"})


def _to_tuple(value: Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    """``image_urls`` / ``video_urls`` as given (a sequence of URLs or local paths), as a
    tuple; a ``pathlib.Path`` entry becomes its string (a local path, see ``is_local_ref``).

    Anything else is kept as it is, so that validation names the field and the rule (a bare
    string is a common slip for a one-element list; a type checker cannot catch it, as a
    ``str`` is a sequence of strings)."""
    kind = type(value)
    if kind is tuple and not value:  # the default: no URLs
        return ()
    if (kind is tuple or kind is list) and all(type(v) is str for v in value):
        return cast("tuple[str, ...]", tuple(value))  # the common case, without ABC checks
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray)):
        return tuple(os.fspath(v) if isinstance(v, os.PathLike) else v for v in value)
    return value  # type: ignore[return-value]  # refused by check_request


#: A URL scheme (``ftp:``, ``javascript:``): not taken for a local path. One letter and a
#: colon is a Windows drive (``C:``), a path.
_OTHER_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def is_local_ref(value: str) -> bool:
    """Whether an ``image_urls`` / ``video_urls`` entry names a local file: a ``file://`` URL,
    or any string with no URL scheme (``http:``, ``data:``, ``ftp:``...) in front."""
    lowered = value[:8].lower()
    if lowered.startswith("file://"):
        return True
    if lowered.startswith(("http:", "https:", "data:")):
        return False
    return value != "" and _OTHER_SCHEME.match(value) is None


#: The ``extra`` of every request that has none: one shared read-only mapping, not a view
#: of its own per request (20,000 jobs were 20,000 more objects for every full collection).
_NO_EXTRA: Mapping[str, Any] = types.MappingProxyType({})


def _to_frozen_mapping(value: Mapping[str, Any]) -> Mapping[str, Any]:
    """``extra`` as a read-only mapping (anything else is kept for validation to name)."""
    given: object = value  # the caller may pass anything
    if type(given) is dict or isinstance(given, Mapping):
        return types.MappingProxyType(dict(value)) if value else _NO_EXTRA
    return value  # refused by check_request


@attrs.frozen(eq=True, hash=False, repr=False)
class VideoRequest:
    """One video generation request, checked against its model's rules on construction.

    Unset fields are not sent, so the service's defaults apply. ``extra`` is merged into the
    body unchecked: it is the way to pass fields this SDK does not know (new models).

    Raises:
        ValidationError: a field breaks a rule; the message names the field, rule and value.
    """

    model: str
    """The model name, e.g. ``"sora-2-preview"`` (see ``MODEL_SPECS``)."""
    prompt: str | None = None
    """What to generate. Required by most models."""
    image_urls: tuple[str, ...] = attrs.field(default=(), kw_only=True, converter=_to_tuple)
    """Reference images: http(s) URLs, or local files (a ``pathlib.Path``, a path string or a
    ``file://`` URL) that ``client.batch`` uploads once each (see ``media_root``)."""
    video_urls: tuple[str, ...] = attrs.field(default=(), kw_only=True, converter=_to_tuple)
    """Reference videos: http(s) URLs, ``data:video/`` URIs where the model takes them, or
    local files that ``client.batch`` sends as ``data:`` URIs (no video upload exists)."""
    duration: int | None = attrs.field(default=None, kw_only=True)
    """Length of the video in whole seconds."""
    resolution: str | None = attrs.field(default=None, kw_only=True)
    """e.g. ``"720p"``, or ``"standard"``/``"high"`` for Sora 2 Pro."""
    aspect_ratio: str | None = attrs.field(default=None, kw_only=True)
    """e.g. ``"16:9"`` or ``"portrait"``, as the model names them."""
    seed: int | None = attrs.field(default=None, kw_only=True)
    """A seed for reproducible output, where the model takes one."""
    extend_from_task_id: str | None = attrs.field(default=None, kw_only=True)
    """The id of an earlier task whose video this one continues."""
    webhook: str | None = attrs.field(default=None, kw_only=True)
    """An http(s) URL the service calls when the task ends."""
    extra: Mapping[str, Any] = attrs.field(
        factory=dict[str, Any], kw_only=True, converter=_to_frozen_mapping
    )
    """Fields sent as they are, merged into the body after the typed ones."""

    def __attrs_post_init__(self) -> None:
        spec = get_spec(self.model) if type(self.model) is str else None
        shape = _shape(self, spec)
        known = _CLEAN.get(shape) if shape is not None else None
        if known is not None and known[0] is spec:
            notes: Sequence[str] = known[1]
        else:
            errors, notes = check_request(self)
            if errors:
                raise ValidationError(errors)
            if shape is not None:
                if len(_CLEAN) >= _CLEAN_MAX:
                    _CLEAN.clear()
                _CLEAN[shape] = (spec, tuple(notes))
        if notes:
            collecting = _NOTES.get()
            for note in notes:
                if collecting is not None:
                    collecting.append(note)
                else:
                    warnings.warn(note, ApimartWarning, stacklevel=3)

    def __repr__(self) -> str:
        parts = [f"model={self.model!r}"]
        if self.prompt is not None:
            prompt = self.prompt if len(self.prompt) <= 40 else self.prompt[:39] + "…"
            parts.append(f"prompt={prompt!r}")
        for name in _TYPED_FIELDS[1:]:
            value = getattr(self, name)
            if value not in (None, ()):
                parts.append(f"{name}={hide_userinfo(value)!r}")
        if self.extra:
            parts.append(f"extra={dict(self.extra)!r}")
        return f"VideoRequest({', '.join(parts)})"

    @property
    def spec(self) -> ModelSpec | None:
        """The rules this request was checked against (None for a model not known here)."""
        return get_spec(self.model)

    def to_body(self) -> dict[str, Any]:
        """The JSON body of the submit request: set fields only, then ``extra``."""
        body: dict[str, Any] = {"model": self.model}
        for name in _TYPED_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if type(value) is tuple:
                if not value:
                    continue
                value = list(cast("tuple[str, ...]", value))
            body[name] = value
        if self.extra:
            body.update(self.extra)
        return body

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON body: equal for requests that send the same thing."""
        canonical = json.dumps(self.to_body(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def to_dict(self) -> dict[str, Any]:
        """The request as plain JSON values: ``model``, the set fields, and ``extra`` (when
        not empty) as a nested object; ``from_dict`` makes the same request of it."""
        data: dict[str, Any] = {"model": self.model}
        for name in _TYPED_FIELDS:
            value = getattr(self, name)
            if value is None or value == ():
                continue
            data[name] = list(cast("tuple[str, ...]", value)) if isinstance(value, tuple) else value
        if self.extra:
            data["extra"] = dict(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VideoRequest:
        """Build a request from a JSON-like mapping (e.g. an untrusted request body): keys
        that are not fields go to ``extra``, merged with an ``extra`` object if one is given.

        Raises:
            ValidationError: for anything that does not make a valid request, naming the
                field (``request`` when ``data`` is not an object); never another exception.
        """
        given: object = data  # the caller may pass anything
        if type(given) is not dict and not isinstance(given, Mapping):
            raise ValidationError([FieldError("request", "must be a JSON object", given)])
        fields: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        nested: object = data.get("extra")
        if nested is not None:
            if not isinstance(nested, Mapping):
                raise ValidationError(
                    [FieldError("extra", "must be an object of field names to JSON values", nested)]
                )
            extra.update(cast("Mapping[str, Any]", nested))
        for key, value in data.items():
            if key in _FIELD_NAMES:
                fields[key] = value
            elif key != "extra":
                extra[key] = value
        if "model" not in fields:
            raise ValidationError([FieldError("model", "is required", has_value=False)])
        return cls(**fields, extra=extra)

    @classmethod
    def _from_dict_noting(cls, data: Mapping[str, Any]) -> tuple[VideoRequest, tuple[str, ...]]:
        """``from_dict``, with the warnings it deserves returned instead of warned (a jobs
        file reports them by line)."""
        notes: list[str] = []
        token = _NOTES.set(notes)
        try:
            return cls.from_dict(data), tuple(notes)
        finally:
            _NOTES.reset(token)


# -- validation ------------------------------------------------------------------------------

#: Where a request's warnings go instead of ``warnings.warn`` (``_from_dict_noting``).
_NOTES: ContextVar[list[str] | None] = ContextVar("apimart_async_request_notes", default=None)

#: Requests that passed ``check_request``, by ``_shape``: the spec they were checked against
#: and their warnings. A jobs file's lines mostly differ in their prompt only, so most of its
#: requests are checked by one lookup (issue 16). Emptied when full.
_CLEAN: dict[tuple[Any, ...], tuple[ModelSpec | None, tuple[str, ...]]] = {}
_CLEAN_MAX = 1024


def _shape(req: VideoRequest, spec: ModelSpec | None) -> tuple[Any, ...] | None:
    """Everything ``check_request`` reads of ``req`` (``request_shape``); None when a field
    holds anything but the plain types a check can pass, or ``extra`` is not empty (a request
    with ``extra`` is always checked in full)."""
    extra: object = req.extra
    if type(extra) is not types.MappingProxyType or extra:
        return None
    return request_shape(
        spec, req.model, req.prompt, req.image_urls, req.video_urls, req.duration,
        req.resolution, req.aspect_ratio, req.seed, req.extend_from_task_id, req.webhook,
    )  # fmt: skip


def request_shape(
    spec: ModelSpec | None,
    model: object,
    prompt: object,
    image_urls: object,
    video_urls: object,
    duration: object,
    resolution: object,
    aspect_ratio: object,
    seed: object,
    extend_from_task_id: object,
    webhook: object,
) -> tuple[Any, ...] | None:
    """The fields of a request without ``extra`` (as ``VideoRequest`` holds them, after its
    converters), with the prompt reduced to what its rules look at (set, blank, over the
    model's limit, Unicode); None when a field holds anything but the plain types a check
    can pass. Two requests of one shape, checked against the same spec (``spec``, that of
    ``model``), get the same verdict: ``VideoRequest`` and a jobs file's check (``_jobsfile``)
    skip the checks of a shape that passed them.

    Its parameters after ``spec`` are ``model`` and ``_TYPED_FIELDS``, in order: a new field
    of ``VideoRequest`` must be one of them (``tests/test_jobs_check.py`` checks it)."""
    if type(model) is not str or type(image_urls) is not tuple or type(video_urls) is not tuple:
        return None
    images = cast("tuple[object, ...]", image_urls)
    videos = cast("tuple[object, ...]", video_urls)
    for url in (*images, *videos):
        if type(url) is not str:
            return None
    said: tuple[bool, bool, bool] | None = None
    if prompt is not None:
        if type(prompt) is not str:
            return None
        limit = spec.prompt_max_chars if spec is not None else None
        said = (
            prompt.strip() != "",
            limit is not None and len(prompt) > limit,
            prompt.isascii() or is_unicode_text(prompt),
        )
    for text in (resolution, aspect_ratio, extend_from_task_id, webhook):
        if text is not None and type(text) is not str:
            return None
    for number in (duration, seed):
        if number is not None and type(number) is not int:
            return None
    return (
        model, said, images, videos, duration, resolution, aspect_ratio, seed,
        extend_from_task_id, webhook,
    )  # fmt: skip


def _choices(options: Iterable[Any]) -> str:
    items = [repr(o) for o in options]
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " or " + items[-1]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: The most URLs one ``image_urls`` or ``video_urls`` list may hold (no model takes more than
#: 16): a longer list, from an untrusted body, is refused by its length before each URL is
#: checked.
MAX_URLS: Final = 100

NOT_UNICODE = "must be valid Unicode text (it holds a lone surrogate, as JSON's \\ud800)"


def is_unicode_text(text: str) -> bool:
    """Whether ``text`` can be sent as UTF-8: JSON (and so ``json.loads``) lets a lone
    surrogate such as ``\\ud800`` through, which no URL or UTF-8 body can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@]*@")


def hide_userinfo(value: Any) -> Any:
    """``value`` with the user and password of a URL replaced by ``***`` (a webhook's secret;
    shown in errors and reprs, never in what is sent)."""
    if isinstance(value, str) and "@" in value:
        return _USERINFO.sub(r"\1***@", value, count=1)
    return value


def url_rule(value: Any) -> str | None:
    """The rule ``value`` breaks as an http(s) URL (as ``VideoRequest.webhook``), or None."""
    rule = _url_error(value)
    if rule is None and isinstance(value, str) and not is_unicode_text(value):
        return NOT_UNICODE  # a lone surrogate: no URL (or UTF-8 body) can carry it
    return rule


def _url_error(
    value: Any, *, allow_data_video: bool = False, allow_local: bool = False
) -> str | None:
    """The rule a URL breaks, or None."""
    schemes = "an http(s) URL or a data:video/ URI" if allow_data_video else "an http(s) URL"
    if allow_local:
        schemes += " or a local file path"
    if not isinstance(value, str):
        return f"must be {schemes}"
    if allow_data_video and value.startswith("data:video/"):
        return None
    if allow_local and is_local_ref(value):
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        return f"must be {schemes}"
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return f"must be {schemes}"
    if any(c.isspace() for c in value):
        return "must not contain white space"
    return None


def _extension(url: str) -> str | None:
    path = urlsplit(url).path
    last = path.rsplit("/", 1)[-1]
    if "." not in last:
        return None
    ext = last.rsplit(".", 1)[-1].lower()
    return ext if ext in _IMAGE_EXTENSIONS else None


def _check_url_list(
    errors: list[FieldError],
    name: str,
    value: Any,
    *,
    allow_data_video: bool = False,
) -> list[str]:
    if isinstance(value, str):
        errors.append(FieldError(name, "takes a list of URLs, not a single string", value))
        return []
    if not isinstance(value, tuple):
        errors.append(FieldError(name, "must be a list of URLs", value))
        return []
    items = cast("tuple[object, ...]", value)
    if len(items) > MAX_URLS:  # refused by its length: an untrusted body may hold 50,000
        errors.append(FieldError(name, f"must hold at most {MAX_URLS} URLs", f"{len(items)} URLs"))
        return []
    good: list[str] = []
    for i, url in enumerate(items):
        rule = _url_error(url, allow_data_video=allow_data_video, allow_local=True)
        if (
            rule is None
            and isinstance(url, str)
            and not url.isascii()
            and not is_local_ref(url)  # a file's name may hold undecodable bytes
            and not is_unicode_text(url)
        ):
            rule, url = NOT_UNICODE, ascii(url)
        if rule is not None:
            errors.append(FieldError(f"{name}[{i}]", rule, url))
        elif isinstance(url, str):  # always, when there is no rule broken
            good.append(url)
    return good


def _check_count(
    errors: list[FieldError],
    name: str,
    count: int,
    limits: tuple[int, int | None] | None,
    model: str,
    what: str,
) -> None:
    if limits is None:
        if count:
            errors.append(FieldError(name, f"{model} takes no reference {what}s", count))
        return
    low, high = limits
    if high is None:
        if count < low:
            errors.append(FieldError(name, f"{model} needs at least {low} {what}(s)", count))
        return
    if not low <= count <= high:
        if low == 0:
            rule = f"{model} takes at most {high} {what}{'s' if high != 1 else ''}"
        else:
            rule = f"{model} takes {low} to {high} {what}s"
        errors.append(FieldError(name, rule, count))


def check_request(req: VideoRequest) -> tuple[list[FieldError], list[str]]:
    """Every broken rule of ``req`` and the warnings it deserves (the service would silently
    ignore something). Generic checks apply to every model; the rest come from its spec."""
    errors: list[FieldError] = []
    notes: list[str] = []

    model = req.model
    if not isinstance(model, str) or not model.strip():
        errors.append(FieldError("model", "must be a non-empty string", model))
        return errors, notes
    spec = get_spec(model)

    prompt: Any = req.prompt  # Any: the caller may have passed anything
    if prompt is not None and not isinstance(prompt, str):
        errors.append(FieldError("prompt", "must be a string", prompt))
        prompt = None
    for name in ("model", "prompt", "resolution", "aspect_ratio", "extend_from_task_id"):
        text = getattr(req, name)
        if isinstance(text, str) and not text.isascii() and not is_unicode_text(text):
            errors.append(FieldError(name, NOT_UNICODE, ascii(text)))

    images = _check_url_list(errors, "image_urls", req.image_urls)
    videos = _check_url_list(errors, "video_urls", req.video_urls, allow_data_video=True)

    duration = req.duration
    if duration is not None and (not _is_int(duration) or duration <= 0):
        errors.append(
            FieldError("duration", "must be a positive whole number of seconds", duration)
        )
        duration = None
    for name in ("resolution", "aspect_ratio", "extend_from_task_id"):
        value = getattr(req, name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            errors.append(FieldError(name, "must be a non-empty string", value))
    if req.seed is not None and not _is_int(req.seed):
        errors.append(FieldError("seed", "must be an integer", req.seed))
    if req.webhook is not None:
        rule = url_rule(req.webhook)
        if rule is not None:
            errors.append(FieldError("webhook", rule, hide_userinfo(req.webhook)))
    _check_extra(errors, req)

    if spec is not None:
        _check_spec(errors, notes, spec, req, prompt, images, videos, duration)
    return errors, notes


#: How deep a value of ``extra`` may nest. json.loads takes a body nested ~900 deep; the
#: submit encodes it again from a handler a few hundred frames down, where that overflowed
#: the stack (a raw RecursionError after the journal recorded the submit).
MAX_EXTRA_DEPTH = 64
_TOO_DEEP = f"must be JSON at most {MAX_EXTRA_DEPTH} levels deep"
_DEEPER = f"more than {MAX_EXTRA_DEPTH} levels"


def _children(item: object) -> Iterator[object] | None:
    if isinstance(item, Mapping):
        return iter(cast("Mapping[object, object]", item).values())
    if isinstance(item, (list, tuple)):
        return iter(cast("Iterable[object]", item))
    return None  # a leaf


#: The most fields ``extra`` may hold, and JSON values (every item of every list or object,
#: at any depth) in all: a real model takes a few dozen fields; an untrusted body of 50,000
#: keys or a list of 200,000 numbers, checked value by value, held a server's event loop for
#: 250-500 ms (refused by its size instead, as image_urls is by MAX_URLS).
MAX_EXTRA_FIELDS: Final = 200
MAX_EXTRA_VALUES: Final = 10_000


def _too_deep(value: object, budget: list[int] | None = None) -> bool:
    """Whether ``value`` nests lists/dicts more than ``MAX_EXTRA_DEPTH`` deep (a cycle is
    endless). Without recursion; a container shared between branches is measured once.
    ``budget``: ``[values left]``, lowered by every item walked; below 0 the walk stops
    (the caller reports the size, not the depth)."""
    children = _children(value)
    if children is None:
        return False
    path: list[tuple[int, Iterator[object]]] = [(id(value), children)]
    on_path = {id(value)}
    height: dict[int, int] = {}  # the levels of each container measured, by id
    tallest = [0]  # per open container: the tallest child measured so far
    while path:
        key, rest = path[-1]
        child = next(rest, _END)
        if budget is not None and child is not _END:
            budget[0] -= 1
            if budget[0] < 0:
                return False  # too large to walk on: the caller says so
        if child is _END:  # this container is measured
            path.pop()
            on_path.discard(key)
            height[key] = levels = tallest.pop() + 1
            if tallest:
                tallest[-1] = max(tallest[-1], levels)
            continue
        grand = _children(child)
        if grand is None:
            continue
        if id(child) in on_path:
            return True
        if id(child) in height:
            tallest[-1] = max(tallest[-1], height[id(child)])
        elif len(path) >= MAX_EXTRA_DEPTH:
            return True
        else:
            path.append((id(child), grand))
            on_path.add(id(child))
            tallest.append(0)
        if len(path) + tallest[-1] > MAX_EXTRA_DEPTH:
            return True
    return False


_END = object()


def _check_extra(errors: list[FieldError], req: VideoRequest) -> None:
    extra: Any = req.extra
    if not isinstance(extra, Mapping):
        errors.append(FieldError("extra", "must be a mapping of field names to JSON values", extra))
        return
    fields = cast("Mapping[object, object]", extra)
    if len(fields) > MAX_EXTRA_FIELDS:  # one error, before any of them is looked at
        rule = f"must hold at most {MAX_EXTRA_FIELDS} fields"
        errors.append(FieldError("extra", rule, f"{len(fields)} fields"))
        return
    budget = [MAX_EXTRA_VALUES - len(fields)]
    for key, value in fields.items():
        if not isinstance(key, str) or not key:
            errors.append(FieldError("extra", "keys must be non-empty strings", key))
            continue
        if key == "model":
            errors.append(FieldError(f"extra[{key!r}]", "set the model with model=", value))
            continue
        if key in _TYPED_FIELDS and getattr(req, key) not in (None, ()):
            errors.append(FieldError(f"extra[{key!r}]", f"{key} is already set as a field", value))
            continue
        if _too_deep(value, budget):
            errors.append(FieldError(f"extra[{key!r}]", _TOO_DEEP, _DEEPER))
            continue
        if budget[0] < 0:
            rule = f"must hold at most {MAX_EXTRA_VALUES} JSON values in all"
            errors.append(FieldError(f"extra[{key!r}]", rule, f"more than {MAX_EXTRA_VALUES}"))
            return
        try:
            json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            errors.append(FieldError(f"extra[{key!r}]", NOT_UNICODE, ascii(value)))
        except (TypeError, ValueError):
            errors.append(FieldError(f"extra[{key!r}]", "must be JSON-serialisable", value))


def _check_choice(
    errors: list[FieldError],
    name: str,
    value: Any,
    choices: tuple[str, ...] | None,
    model: str,
    noun: str,
    *,
    fallback: str | None = None,
) -> None:
    if not isinstance(value, str):
        return  # unset, or already reported as not a string
    if choices is None:
        errors.append(FieldError(name, f"{model} does not take {noun}", value))
    elif value not in choices:
        rule = f"{model} takes {_choices(choices)}"
        if fallback:
            rule += f" (the service would silently use {fallback})"
        errors.append(FieldError(name, rule, value))


def _check_spec(
    errors: list[FieldError],
    notes: list[str],
    spec: ModelSpec,
    req: VideoRequest,
    prompt: str | None,
    images: Sequence[str],
    videos: Sequence[str],
    duration: int | None,
) -> None:
    model = spec.name
    has_prompt = prompt is not None and prompt.strip() != ""
    if spec.prompt == "required" and not has_prompt:
        errors.append(FieldError("prompt", f"{model} requires a prompt", prompt))
    elif spec.prompt == "required_or_media" and not (
        has_prompt or req.image_urls or req.video_urls
    ):
        errors.append(
            FieldError(
                "prompt",
                f"{model} needs a prompt or reference media (image_urls / video_urls)",
                prompt,
            )
        )
    limit = spec.prompt_max_chars
    if prompt is not None and limit is not None and len(prompt) > limit:
        errors.append(
            FieldError(
                "prompt", f"{model} takes at most {limit} characters", f"{len(prompt)} characters"
            )
        )

    if isinstance(req.image_urls, tuple):
        _check_count(errors, "image_urls", len(req.image_urls), spec.image_count, model, "image")
    if isinstance(req.video_urls, tuple):
        _check_count(errors, "video_urls", len(req.video_urls), spec.video_count, model, "video")
    if spec.image_formats:
        allowed = ", ".join(sorted({f.upper() for f in spec.image_formats}))
        for i, url in enumerate(req.image_urls if isinstance(req.image_urls, tuple) else ()):
            if url not in images or is_local_ref(url):
                continue  # a local file's type is sniffed from its bytes (``_references``)
            ext = _extension(url)
            if ext is not None and ext not in spec.image_formats:
                errors.append(
                    FieldError(f"image_urls[{i}]", f"{model} takes {allowed} images", url)
                )

    if req.duration is not None and spec.durations is None:  # whatever the value
        errors.append(FieldError("duration", f"{model} does not take a duration", req.duration))
    elif duration is not None and spec.durations is not None:
        if isinstance(spec.durations, IntRange):
            if duration not in spec.durations:
                rule = f"{model} takes {spec.durations.describe()} seconds"
                errors.append(FieldError("duration", rule, duration))
        elif duration not in spec.durations:
            rule = f"{model} takes only {_choices(spec.durations)} seconds"
            errors.append(FieldError("duration", rule, duration))

    _check_choice(errors, "resolution", req.resolution, spec.resolutions, model, "a resolution")
    aspect = req.aspect_ratio
    _check_choice(
        errors,
        "aspect_ratio",
        aspect,
        spec.aspect_ratios,
        model,
        "an aspect ratio",
        fallback=spec.aspect_ratio_fallback,
    )

    if req.seed is not None and not spec.seed:
        errors.append(FieldError("seed", f"{model} does not take a seed", req.seed))
    if req.extend_from_task_id is not None:
        if not spec.extend:
            errors.append(
                FieldError(
                    "extend_from_task_id",
                    f"{model} cannot extend an earlier task",
                    req.extend_from_task_id,
                )
            )
        elif req.video_urls:
            errors.append(
                FieldError(
                    "extend_from_task_id",
                    "cannot be combined with video_urls",
                    req.extend_from_task_id,
                )
            )

    if spec.first_image_only and len(images) > 1:
        notes.append(
            f"image_urls: {model} uses only the first image; "
            f"the other {len(images) - 1} will be ignored by the service"
        )
    if spec.first_image_only and images and aspect is not None:
        notes.append(
            f"aspect_ratio: {model} takes the aspect ratio of the reference image; "
            f"aspect_ratio={aspect!r} will be ignored by the service"
        )
    if spec.video_overrides_aspect and videos and aspect is not None:
        notes.append(
            f"aspect_ratio: {model} ignores aspect_ratio when a reference video is given; "
            f"aspect_ratio={aspect!r} will be ignored by the service"
        )
