"""Reading a jobs file (JSONL or CSV) into requests, with every bad line reported by number.

JSONL: one JSON object per line, the fields of ``VideoRequest``, an optional ``name`` (the
file name of the video) and an optional ``extra`` object (fields this SDK does not model,
sent as given). For a model this SDK knows, any other key is an error ("did you mean ...");
for other models, other keys are sent as extra fields. Blank lines and lines starting with
``#`` are skipped.

CSV: a header row naming the same fields; list fields (``image_urls``, ``video_urls``) hold
URLs separated by ``|``; ``duration`` and ``seed`` are integers; other columns are sent as
written (numbers and true/false as such). Empty cells are left unset.

A model name a small edit away from a known one (``sora2-preview``) is an error unless
``allow_unknown_model``. Line numbers in errors start at 1.

Local reference files (``"image_urls": ["refs/bear.png"]``, absolute paths, ``file://`` URLs)
resolve against the jobs file's folder and must lie inside it or a ``media_root`` (symlinks
followed) unless ``allow_any_path``: a jobs file may come from someone else, and each file it
names is sent to the service. Each one is checked here (exists, regular file, size, type by
its content, the model's formats) and the request names it by path and sha256
(``_references``); ``JobLine.files`` lists them.
"""

from __future__ import annotations

import bisect
import csv
import functools
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, cast

import attrs

from ._errors import FieldError, JobsFileError, ValidationError
from ._jobs import file_stem
from ._json import is_object
from ._models import _TYPED_FIELDS, VideoRequest, is_local_ref, request_shape
from ._references import LocalFile, MediaPolicy, MediaRoot, has_local_refs, prepare_request
from ._specs import MODEL_SPECS

__all__ = ["JobCheck", "JobLine", "check_jobs", "read_jobs"]

MAX_LINE_BYTES = 1 << 20
MAX_FILE_BYTES = 512 << 20
_LIST_FIELDS = ("image_urls", "video_urls")
_INT_FIELDS = ("duration", "seed")


@attrs.frozen
class JobLine:
    """One job of a jobs file (``read_jobs``)."""

    line: int
    """Its line number in the file, from 1."""
    name: str | None
    """Its ``name``, if the line gave one."""
    request: VideoRequest
    """The validated request."""
    warnings: tuple[str, ...] = ()
    """What validation warned about (the service would ignore something)."""
    files: tuple[LocalFile, ...] = ()
    """The local reference files the line names (checked and hashed)."""


_KNOWN_KEYS = ("model", "name", "extra", *_TYPED_FIELDS)
_DECODER = json.JSONDecoder()
_Build = Callable[[], tuple[str | None, VideoRequest, tuple[str, ...]]]


def _distance(a: str, b: str) -> int:
    """Levenshtein edit distance (insert, delete, substitute)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _closest(word: str, options: Iterable[str], *, within: int = 2) -> str | None:
    best = min(options, key=lambda o: _distance(word.lower(), o.lower()), default=None)
    if best is None or _distance(word.lower(), best.lower()) > within:
        return None
    return best


def _check_keys(data: dict[str, Any], allow_unknown_model: bool) -> None:
    model = data.get("model")
    if not isinstance(model, str):
        return  # VideoRequest names the rule
    if model not in MODEL_SPECS:
        near = _closest(model, MODEL_SPECS)
        if near is not None and not allow_unknown_model:
            raise ValueError(
                f"model: unknown model {model!r}; did you mean {near!r}?"
                " (--allow-unknown-model sends it as written)"
            )
        return  # a model this SDK does not know: other keys go out as its extra fields
    problems: list[FieldError] = []
    for key in (k for k in data if k not in _KNOWN_KEYS):
        near = _closest(key, [k for k in _KNOWN_KEYS if k != "extra"], within=3)
        hint = f"did you mean {near!r}? " if near else ""
        rule = f"{model} takes no such field ({hint}fields this SDK does not model go in extra)"
        problems.append(FieldError(key, rule, has_value=False))
    if problems:
        raise ValidationError(problems)
    if "extra" in data and not isinstance(data["extra"], dict):
        raise ValidationError([FieldError("extra", "must be a JSON object", data["extra"])])


def _request(
    data: Any, allow_unknown_model: bool = False
) -> tuple[str | None, VideoRequest, tuple[str, ...]]:
    if not is_object(data):
        raise ValueError(f"a job must be a JSON object, got {type(data).__name__}")
    data = dict(data)
    _check_keys(data, allow_unknown_model)
    name = data.pop("name", None)
    if name is not None and not isinstance(name, str):
        raise ValueError("name: must be a string")
    request, notes = VideoRequest._from_dict_noting(data)
    return name, request, notes


def _csv_value(key: str, text: str) -> Any:
    if key in _LIST_FIELDS:
        return [part.strip() for part in text.split("|") if part.strip()]
    if key in _INT_FIELDS:
        try:
            return int(text)
        except ValueError:
            return text  # validation names the field and the rule
    if key in (
        "prompt",
        "model",
        "name",
        "resolution",
        "aspect_ratio",
        "webhook",
        "extend_from_task_id",
    ):
        return text
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return json.loads(text) if text[:1] in "-0123456789" else text
    except ValueError:
        return text


def read_jobs(
    path: str | Path,
    *,
    allow_unknown_model: bool = False,
    media_root: MediaRoot | None = None,
    allow_any_path: bool = False,
) -> list[JobLine]:
    """Every job of the file, or JobsFileError listing every bad line (nothing is sent).

    ``allow_unknown_model``: send a model name close to a known one (``sora2-preview``)
    as written instead of refusing it as a likely typo. ``media_root``: a folder (or several)
    local reference files may also come from, besides the jobs file's own; ``allow_any_path``:
    from anywhere. Run the jobs with ``client.batch(media_root=[<the jobs file's folder>,
    *media_root])`` and the same ``allow_any_path``."""
    return list(
        iter_jobs(
            path,
            allow_unknown_model=allow_unknown_model,
            media_root=media_root,
            allow_any_path=allow_any_path,
        )
    )


def iter_jobs(
    path: str | Path,
    *,
    allow_unknown_model: bool = False,
    media_root: MediaRoot | None = None,
    allow_any_path: bool = False,
) -> Iterator[JobLine]:
    """``read_jobs`` one job at a time, reading the file as it goes: memory stays flat in the
    file's size (issue 16). The good jobs come out as they are read; JobsFileError, listing
    every bad line, comes at the end. So a caller that must send nothing from a file with a
    bad line reads it through once first (``apimart-async run`` does), then again to send."""
    p = Path(path)
    policy = media_policy(p, media_root, allow_any_path=allow_any_path)
    checked: dict[tuple[str, int, int, int], LocalFile] = {}
    problems: list[tuple[int, str]] = []
    names = _FileNames()
    count = 0
    with _open(p) as stream:
        if p.suffix.lower() == ".csv":
            rows = _csv_rows(p, stream, problems, allow_unknown_model)
        else:
            rows = _jsonl_rows(stream, problems, allow_unknown_model)
        for n, build in rows:
            done = _build_line(n, build, policy, checked, problems)
            if done is None:
                continue
            name, request, notes, files = done
            clash = names.add(count, n, name)
            if clash is not None:
                problems.append(clash)
            count += 1
            if not problems:
                yield JobLine(n, name, request, notes, files)
    _end(p, problems, count)


def _open(p: Path) -> BinaryIO:
    """The jobs file, opened for reading, or JobsFileError (too large, cannot be read)."""
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise JobsFileError(str(p), [(0, f"file is larger than {MAX_FILE_BYTES >> 20} MB")])
        return p.open("rb")
    except OSError as exc:
        raise JobsFileError(str(p), [(0, f"cannot read: {exc.strerror}")]) from None


def _end(p: Path, problems: list[tuple[int, str]], count: int) -> None:
    """JobsFileError listing every bad line, or saying there was no job; else nothing."""
    if problems:
        raise JobsFileError(str(p), sorted(problems, key=lambda problem: problem[0]))
    if not count:
        raise JobsFileError(str(p), [(0, "no jobs in the file")])


_Built = tuple[str | None, VideoRequest, tuple[str, ...], tuple[LocalFile, ...]]


def _build_line(
    n: int,
    build: _Build,
    policy: MediaPolicy,
    checked: dict[tuple[str, int, int, int], LocalFile],
    problems: list[tuple[int, str]],
) -> _Built | None:
    """Line ``n``'s name, request, warnings and local files, or None with its problems
    added to ``problems``."""
    files: tuple[LocalFile, ...] = ()
    try:
        name, request, notes = build()
        if has_local_refs(request):
            request, files = prepare_request(request, policy, checked)
    except ValidationError as exc:
        problems.extend((n, str(e)) for e in exc.errors)
        return None
    except (ValueError, TypeError, RecursionError) as exc:
        text = str(exc) if not isinstance(exc, RecursionError) else "JSON nested too deeply"
        problems.append((n, text))
        return None
    return name, request, notes, files


class JobCheck(NamedTuple):
    """One good job of a jobs file as ``check_jobs`` tells of it: what a dry run counts."""

    line: int
    """Its line number in the file, from 1."""
    name: str | None
    """Its ``name``, if the line gave one."""
    model: str
    duration: int | None
    resolution: str | None
    warnings: tuple[str, ...]
    """What validation warned about (as ``JobLine.warnings``)."""
    files: tuple[LocalFile, ...]
    """The local reference files the line names (checked and hashed)."""
    request: VideoRequest | None
    """The validated request; None where the line's shape had passed the checks already
    (unless ``check_jobs(requests=True)``)."""


#: The most shapes of lines ``check_jobs`` remembers as passed (emptied when full).
_PASSED_MAX = 1024
_PLAIN_KEYS = frozenset(("model", "name", *_TYPED_FIELDS))


def check_jobs(
    path: str | Path,
    *,
    allow_unknown_model: bool = False,
    media_root: MediaRoot | None = None,
    allow_any_path: bool = False,
    requests: bool = False,
) -> Iterator[JobCheck]:
    """``iter_jobs`` for a check that needs no request: the same lines accepted and refused,
    with the same problems and warnings (JobsFileError at the end), at a fraction of the cost
    (issue 16). A JSONL line whose fields are of plain types and whose shape (``request_shape``:
    every field but the prompt's text) passed on an earlier line is not built into a
    ``VideoRequest``: it gets that line's verdict. Anything else (a new shape, ``extra``, a
    local file, a CSV file) takes ``iter_jobs``' way. ``requests``: every line that way,
    with its request."""
    p = Path(path)
    if requests or p.suffix.lower() == ".csv":
        for job in iter_jobs(
            p,
            allow_unknown_model=allow_unknown_model,
            media_root=media_root,
            allow_any_path=allow_any_path,
        ):
            r = job.request
            yield JobCheck(
                job.line, job.name, r.model, r.duration, r.resolution, job.warnings, job.files, r
            )
        return
    policy = media_policy(p, media_root, allow_any_path=allow_any_path)
    checked: dict[tuple[str, int, int, int], LocalFile] = {}
    problems: list[tuple[int, str]] = []
    names = _FileNames()
    count = 0
    passed: dict[tuple[Any, ...], tuple[str, ...]] = {}  # shape -> its warnings
    decode = _DECODER.raw_decode
    with _open(p) as stream:
        for n, text in _jsonl_texts(stream, problems):
            shape = None
            data: Any = None
            try:  # ``json.loads`` without its two white-space scans: the text is stripped
                data, end = decode(text)
            except (ValueError, RecursionError):
                data = None
            else:
                if end != len(text):
                    data = None
            if type(data) is dict:
                data = cast("dict[str, Any]", data)
                shape = _line_shape(data)
                notes = passed.get(shape) if shape is not None else None
                if notes is not None:
                    name = data.get("name")
                    fast = JobCheck(
                        n,
                        name,
                        data["model"],
                        data.get("duration"),
                        data.get("resolution"),
                        notes,
                        (),
                        None,
                    )
                    clash = names.add(count, n, name)
                    if clash is not None:
                        problems.append(clash)
                    count += 1
                    if not problems:
                        yield fast
                    continue
                build: _Build = functools.partial(_request, data, allow_unknown_model)
            else:
                build = functools.partial(_parse_line, text, allow_unknown_model)
            done = _build_line(n, build, policy, checked, problems)
            if done is None:
                continue
            name, request, notes, files = done
            if shape is not None and not files and not any(map(is_local_ref, shape[2] + shape[3])):
                if len(passed) >= _PASSED_MAX:
                    passed.clear()
                passed[shape] = notes
            clash = names.add(count, n, name)
            if clash is not None:
                problems.append(clash)
            count += 1
            if not problems:
                yield JobCheck(
                    n, name, request.model, request.duration, request.resolution, notes, files,
                    request,
                )  # fmt: skip
    _end(p, problems, count)


def _line_shape(data: dict[str, Any]) -> tuple[Any, ...] | None:
    """The ``request_shape`` of a JSON line's object, as ``_request`` would build it; None
    when it holds anything but the plain fields (``extra``, other keys, a name that is not a
    string, values of other types)."""
    if not data.keys() <= _PLAIN_KEYS:
        return None
    name = data.get("name")
    if name is not None and type(name) is not str:
        return None
    model = data.get("model")
    if type(model) is not str:
        return None
    images: object = data.get("image_urls", ())
    if type(images) is list:
        images = tuple(cast("list[object]", images))
    videos: object = data.get("video_urls", ())
    if type(videos) is list:
        videos = tuple(cast("list[object]", videos))
    get = data.get
    return request_shape(
        MODEL_SPECS.get(model), model, get("prompt"), images, videos, get("duration"),
        get("resolution"), get("aspect_ratio"), get("seed"), get("extend_from_task_id"),
        get("webhook"),
    )  # fmt: skip


def _jsonl_texts(stream: BinaryIO, problems: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """Each job line of a JSONL file, numbered and stripped, read a line at a time (a line
    longer than ``MAX_LINE_BYTES`` is never held whole)."""
    n = 0
    readline = stream.readline
    while True:
        raw_line = readline(MAX_LINE_BYTES + 1)
        if not raw_line:
            return
        n += 1
        if n == 1 and raw_line.startswith(b"\xef\xbb\xbf"):
            raw_line = raw_line[3:]
        if len(raw_line) > MAX_LINE_BYTES and not raw_line.endswith(b"\n"):
            while raw_line and not raw_line.endswith(b"\n"):  # the rest of the long line
                raw_line = readline(MAX_LINE_BYTES)
            problems.append((n, f"line longer than {MAX_LINE_BYTES >> 10} KB"))
            continue
        stripped = raw_line.strip()
        if not stripped:
            continue
        try:  # a comment too: a binary file starting with "#" is not a file of no jobs
            text = stripped.decode("utf-8")
        except UnicodeDecodeError:
            problems.append((n, "not valid UTF-8"))
            continue
        if not text.startswith("#"):
            yield n, text


def _parse_line(
    text: str, allow_unknown_model: bool
) -> tuple[str | None, VideoRequest, tuple[str, ...]]:
    """A stripped JSONL line's job (``_request``), or ValueError naming what is wrong."""
    try:  # ``json.loads`` without its two white-space scans: the text is stripped
        data, end = _DECODER.raw_decode(text)
        if end != len(text):
            raise ValueError("extra data")
    except ValueError:
        try:  # json.loads says what is wrong, as it would have
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    return _request(data, allow_unknown_model)


def _jsonl_rows(
    stream: BinaryIO, problems: list[tuple[int, str]], allow_unknown_model: bool
) -> Iterator[tuple[int, _Build]]:
    """Each job line of a JSONL file, numbered, with the way to build its job."""
    for n, text in _jsonl_texts(stream, problems):
        yield n, functools.partial(_parse_line, text, allow_unknown_model)


def _csv_rows(
    p: Path, stream: BinaryIO, problems: list[tuple[int, str]], allow_unknown_model: bool
) -> Iterator[tuple[int, _Build]]:
    """Each row of a CSV file, numbered by its line, decoded as it is read."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    reader = csv.DictReader(text)
    try:
        fieldnames = reader.fieldnames
        if not fieldnames or "model" not in fieldnames:
            raise JobsFileError(str(p), [(1, "the header row must name the columns, with 'model'")])
        for row in reader:
            n = reader.line_num
            if None in row:
                problems.append((n, "more cells than header columns"))
                continue
            data = {k: _csv_value(k, v) for k, v in row.items() if k and v not in ("", None)}
            if "extra" in data and isinstance(data["extra"], str):
                try:
                    data["extra"] = json.loads(data["extra"])
                except ValueError:
                    problems.append((n, "extra: must be a JSON object"))
                    continue
            yield n, functools.partial(_request, data, allow_unknown_model)
    except UnicodeDecodeError:
        raise JobsFileError(str(p), [(_first_bad_utf8_line(p), "not valid UTF-8")]) from None
    finally:
        text.detach()


def _first_bad_utf8_line(p: Path) -> int:
    """The number of the first line of ``p`` that is not UTF-8 (read again, line by line:
    only for the error message)."""
    with p.open("rb") as stream:
        for n, raw_line in enumerate(stream, start=1):
            try:
                raw_line.decode("utf-8")
            except UnicodeDecodeError:
                return n
    return 0


def media_roots(path: str | Path, media_root: MediaRoot | None = None) -> list[Path]:
    """The folders a jobs file's local files may come from: its own folder, then
    ``media_root`` (give them to ``client.batch(media_root=...)``)."""
    roots = [Path(os.path.realpath(Path(path).parent))]
    if isinstance(media_root, (str, os.PathLike)):
        roots.append(Path(media_root))
    elif media_root is not None:
        roots.extend(Path(r) for r in media_root)
    return roots


def media_policy(
    path: str | Path, media_root: MediaRoot | None = None, *, allow_any_path: bool = False
) -> MediaPolicy:
    """Relative paths start at the jobs file's folder; files must lie under ``media_roots``."""
    return MediaPolicy.of(media_roots(path, media_root), allow_any_path=allow_any_path)


class _FileNames:
    """The video file names of the jobs read so far: a line whose video would get the file of
    an earlier line is refused (the CLI names each video after its job: the same name in
    another case, ``a/b`` and ``a_b``, a name that is another line's default ``000001``).

    Named jobs are remembered by name; unnamed ones only as runs of consecutive lines, so a
    file of unnamed jobs costs no memory per line."""

    def __init__(self) -> None:
        self._named: dict[str, int] = {}  # file stem (lower case) -> line
        # runs of unnamed jobs on consecutive lines: (first index, its line, end index)
        self._starts: list[int] = []
        self._runs: list[tuple[int, int, int]] = []

    def _unnamed_line(self, index: int) -> int | None:
        """The line of job ``index`` if it had no name."""
        at = bisect.bisect_right(self._starts, index) - 1
        if at < 0:
            return None
        start, line, end = self._runs[at]
        return line + (index - start) if index < end else None

    def add(self, index: int, line: int, name: str | None) -> tuple[int, str] | None:
        """Job ``index`` (on ``line``): the problem, if its file is an earlier job's."""
        if name is None and not self._named and self._runs:  # a file of unnamed jobs
            start, first_line, end = self._runs[-1]
            if end == index and first_line + (index - start) == line:
                self._runs[-1] = (start, first_line, end + 1)
                return None
        stem = file_stem(index, name).lower()  # the batch's own rule (_jobs.FileNames)
        first = self._named.get(stem)
        if first is None and name is not None and stem.isascii() and stem.isdigit():
            other = int(stem)  # the default name of job ``other``
            if other < index and f"{other:06d}" == stem:
                first = self._unnamed_line(other)
        if first is not None:
            return (
                line,
                f"name: gives the same file as line {first} ({stem}.mp4); names must differ,"
                f" got {name!r}",
            )
        if name is not None:
            self._named[stem] = line
            return None
        if self._runs:
            start, first_line, end = self._runs[-1]
            if end == index and first_line + (index - start) == line:
                self._runs[-1] = (start, first_line, end + 1)
                return None
        self._starts.append(index)
        self._runs.append((index, line, index + 1))
        return None
