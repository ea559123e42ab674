"""Local reference files in a batch (issue 18): resolve, check, dedupe, upload, cache.

A ``VideoRequest`` may name local files in ``image_urls`` (and ``video_urls``): a
``pathlib.Path``, a path string or a ``file://`` URL (``_models.is_local_ref``). The service
takes URLs only, so a batch handles them in two steps, both in ``References``:

1. ``prepare(request)``, when the job is read (before it is admitted, before anything is
   sent): each local entry is resolved (relative to ``MediaPolicy.base``, symlinks followed),
   must lie under one of the allowed roots (unless ``allow_any_path``), be a regular file,
   within the size limit, of a type the upload endpoint and the model take (sniffed from its
   bytes, not its name). Its sha256 is taken. The request is rewritten with a canonical entry,
   ``file:///abs/path#sha256=<hex>``, so the job's fingerprint (and its journal row) keep the
   path and the hash: a file changed between runs is a changed job. A broken rule is a
   ``ValidationError`` naming the field (``image_urls[1]``).
2. ``materialize(request)``, right before the job's submit: each canonical entry is replaced
   by a URL. Images are uploaded (``POST /v1/uploads/images``) once per distinct sha256: jobs
   that need a file being uploaded wait for that upload; the URL is kept in memory and in the
   ``UploadCache`` (the journal's file) with its expiry, and reused until ``REUPLOAD_MARGIN``
   before it. The bytes sent are checked against the hash first, so a job never points at a
   file other than the one checked. Local videos are sent as ``data:`` URIs (no video upload
   exists) up to ``MAX_DATA_VIDEO_BYTES``. An upload that fails for good (after the
   transport's retries) is an ``UploadError`` naming the file; a later job needing the same
   file tries again.

Which paths are allowed (``MediaPolicy``): in the Python API, files under ``media_root`` when
it is given, else under the current working directory; relative paths resolve against the same
folder. The CLI resolves relative paths against the jobs file's folder and allows that folder
and ``--media-root``. ``allow_any_path`` lifts the root rule (never the file checks).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final, Literal, cast
from urllib.parse import unquote_to_bytes, urlsplit

import anyio
import attrs

from ._api import MAX_UPLOAD_BYTES, Api, sniff_image
from ._errors import (
    ApimartError,
    BadRequestError,
    ClientClosedError,
    FieldError,
    JournalError,
    UploadError,
    ValidationError,
)
from ._models import VideoRequest, is_local_ref
from ._outcomes import Failure, outcome_of
from ._threads import run_sync
from ._upload_cache import CachedUpload, UploadCache

__all__ = [
    "MAX_DATA_VIDEO_BYTES",
    "REUPLOAD_MARGIN",
    "UPLOAD_TTL",
    "LocalFile",
    "MediaPolicy",
    "MediaRoot",
    "References",
    "UploadStats",
    "check_file",
    "has_local_refs",
    "prepare_request",
]

logger = logging.getLogger("apimart_async")

UPLOAD_TTL: Final = 72 * 3600.0
"""How long an uploaded image's URL lives, counted from the reply's ``created_at`` [docs]."""
REUPLOAD_MARGIN: Final = 3600.0
"""A cached URL closer than this to its end is uploaded again (the service may fetch the
reference some time after the submit)."""
MAX_DATA_VIDEO_BYTES: Final = 10 * 1024 * 1024
"""[assumed] The largest local video sent as a ``data:`` URI (no size is documented)."""

_FIELDS: Final = ("image_urls", "video_urls")
_CANONICAL_TAG: Final = "#sha256="
Kind = Literal["image", "video"]
MediaRoot = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def has_local_refs(request: VideoRequest) -> bool:
    """Whether ``request`` names any local file (cheap: no file system access)."""
    if not (request.image_urls or request.video_urls):  # the common case, without a generator
        return False
    return any(is_local_ref(ref) for field in _FIELDS for ref in getattr(request, field))


@attrs.frozen
class MediaPolicy:
    """Which local files a batch may send, and where relative paths start."""

    base: Path
    """The folder relative paths resolve against."""
    roots: tuple[Path, ...]
    """Files must resolve (symlinks followed) inside one of these folders."""
    allow_any_path: bool = False
    """Lift the roots rule (the file checks still apply)."""

    @classmethod
    def of(cls, media_root: MediaRoot | None, *, allow_any_path: bool = False) -> MediaPolicy:
        """Files under ``media_root`` (a folder, or several: relative paths start at the
        first), else under the current folder."""
        if media_root is None:
            given: list[str | os.PathLike[str]] = [Path.cwd()]
        elif isinstance(media_root, (str, os.PathLike)):
            given = [media_root]
        else:
            given = list(media_root)
        roots = tuple(Path(os.path.realpath(Path(r).expanduser())) for r in given)
        return cls(base=roots[0], roots=roots, allow_any_path=allow_any_path)


@attrs.frozen
class LocalFile:
    """A local reference file, checked and hashed."""

    path: Path
    """Its resolved path."""
    sha256: str
    """The hex sha256 of its content."""
    size: int
    """Its size in bytes."""
    content_type: str
    """Its MIME type, sniffed from its bytes."""
    kind: Kind
    """``"image"`` or ``"video"``."""

    @property
    def canonical(self) -> str:
        """The entry that stands for it in a prepared request: path and hash."""
        return self.path.as_uri() + _CANONICAL_TAG + self.sha256


@attrs.define
class UploadStats:
    """What a batch did with local files."""

    uploaded: int = 0
    """Files uploaded by this run (one per distinct content, plus re-uploads of expired URLs)."""
    reused: int = 0
    """Files whose URL came from an earlier run's journal (no upload)."""
    bytes_uploaded: int = 0
    """Bytes uploaded by this run."""
    failed: int = 0
    """Uploads that failed for good."""
    uploading: int = 0
    """Uploads under way now."""


def sniff_video(data: bytes) -> str | None:
    """The MIME type of an MP4, QuickTime or WebM video, from its first bytes."""
    if len(data) >= 12 and data[4:8] == b"ftyp":
        return "video/quicktime" if data[8:10] == b"qt" else "video/mp4"
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm"
    return None


def _local_path(ref: str) -> str:
    """The file system path of a local entry (a ``file://`` URL is decoded)."""
    if ref[:7].lower() == "file://":
        parts = urlsplit(ref)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"names a file on another host ({parts.netloc})")
        return _unquote_path(parts.path)
    return os.path.expanduser(ref)


def _unquote_path(quoted: str) -> str:
    """A ``file://`` URL's path, its ``%XX`` escapes decoded as the file system's bytes (as
    ``Path.as_uri`` made them: a file name need not be UTF-8)."""
    return os.fsdecode(unquote_to_bytes(os.fsencode(quoted)))


def _canonical_hash(ref: str) -> tuple[str, str] | None:
    """(path, sha256) of a canonical entry made by ``prepare``, else None."""
    head, sep, digest = ref.rpartition(_CANONICAL_TAG)
    if not sep or len(digest) != 64 or not head.startswith("file://"):
        return None
    return _unquote_path(urlsplit(head).path), digest


def prepare_request(
    request: VideoRequest,
    policy: MediaPolicy,
    checked: dict[tuple[str, int, int, int], LocalFile] | None = None,
) -> tuple[VideoRequest, tuple[LocalFile, ...]]:
    """``request`` with each local entry checked (``check_file``) and made canonical, and the
    files it names. Blocking (file reads). ``checked`` remembers files already read.

    Raises:
        ValidationError: every broken rule, naming the field (``image_urls[0]``).
    """
    if not has_local_refs(request):
        return request, ()
    errors: list[FieldError] = []
    changes: dict[str, tuple[str, ...]] = {}
    files: list[LocalFile] = []
    spec = request.spec
    for field in _FIELDS:
        refs: Sequence[str] = getattr(request, field)
        out: list[str] = []
        kind: Kind = "image" if field == "image_urls" else "video"
        for i, ref in enumerate(refs):
            if not is_local_ref(ref):
                out.append(ref)
                continue
            name = f"{field}[{i}]"
            canonical = _canonical_hash(ref)
            try:
                local = check_file(canonical[0] if canonical else ref, kind, policy, checked)
                if canonical is not None and canonical[1] != local.sha256:
                    raise _refused("the file changed since this request was made (sha256)")
            except ValidationError as exc:
                errors.append(FieldError(name, exc.errors[0].rule, ref))
                out.append(ref)
                continue
            limit = spec.image_max_bytes if spec is not None and kind == "image" else None
            if limit is not None and local.size > limit:
                rule = f"{spec.name if spec else ''} takes images up to {limit // 2**20} MB"
                errors.append(FieldError(name, f"{rule}; this file is {local.size} bytes", ref))
            if kind == "image" and spec is not None and spec.image_formats:
                ext = local.content_type.split("/")[1]
                if ext not in spec.image_formats:
                    allowed = ", ".join(sorted({f.upper() for f in spec.image_formats}))
                    rule = f"{spec.name} takes {allowed} images; this file is {ext.upper()}"
                    errors.append(FieldError(name, rule, ref))
            files.append(local)
            out.append(local.canonical)
        if tuple(out) != tuple(refs):
            changes[field] = tuple(out)
    if errors:
        raise ValidationError(errors)
    return attrs.evolve(request, **changes), tuple(files)  # type: ignore[arg-type]


def check_file(
    ref: str,
    kind: Kind,
    policy: MediaPolicy,
    checked: dict[tuple[str, int, int, int], LocalFile] | None = None,
) -> LocalFile:
    """Resolve, check and hash one local entry (``ValidationError`` with the rule it breaks)."""
    try:
        given = Path(_local_path(ref))
        if "\x00" in str(given):
            raise ValueError("is not a valid path (it holds a NUL character)")
        try:
            os.fsencode(given)
        except UnicodeEncodeError:
            raise ValueError("is not a valid path (no file name holds its characters)") from None
    except ValueError as exc:
        raise _refused(str(exc)) from None
    path = Path(os.path.realpath(policy.base / given))
    if not policy.allow_any_path and not any(path.is_relative_to(r) for r in policy.roots):
        roots = " or ".join(str(r) for r in policy.roots)
        raise _refused(
            f"resolves to {path}, outside {roots}: a file is only sent from there unless any"
            " path is allowed (a jobs file can name any file, and it would be uploaded)"
        )
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _refused(f"file not found ({path})") from None
    except OSError as exc:
        raise _refused(f"cannot be read ({exc.strerror or exc}: {path})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _refused(f"is not a regular file ({path})")
    limit = MAX_UPLOAD_BYTES if kind == "image" else MAX_DATA_VIDEO_BYTES
    if st.st_size > limit:
        what = "the upload endpoint takes" if kind == "image" else "a data: video may be"
        raise _refused(f"is {st.st_size} bytes; {what} at most {limit // 2**20} MB")
    if st.st_size == 0:
        raise _refused(f"is empty ({path})")
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    known = checked.get(key) if checked is not None else None
    if known is not None and known.kind == kind:
        return known
    try:
        data = _read_regular(path)
    except OSError as exc:
        raise _refused(f"cannot be read ({exc.strerror or exc}: {path})") from None
    if data is None:
        raise _refused(f"is not a regular file ({path})")
    if kind == "image":
        sniffed = sniff_image(data)
        if sniffed is None:
            raise _refused("is not a JPEG, PNG, WebP or GIF image (judged by its content)")
        content_type = sniffed[0]
    else:
        video_type = sniff_video(data)
        if video_type is None:
            raise _refused("is not an MP4, QuickTime or WebM video (judged by its content)")
        content_type = video_type
    local = LocalFile(path, _sha256(data), len(data), content_type, kind)
    if checked is not None:
        checked[key] = local
    return local


class References:
    """The local files of one batch: prepared when read, uploaded once when first needed."""

    def __init__(
        self,
        api: Api,
        policy: MediaPolicy,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self.policy = policy
        self._wall = wall
        self.cache: UploadCache | None = None
        """Where URLs outlive the run (the journal's file), once ``attach``-ed."""
        self.stats = UploadStats()
        #: Files checked so far, by (path, size, mtime, inode): each file is read once.
        self._checked: dict[tuple[str, int, int, int], LocalFile] = {}
        #: Files by sha256 (the first path seen for each content).
        self.files: dict[str, LocalFile] = {}
        self._urls: dict[str, CachedUpload] = {}
        self._inflight: dict[str, anyio.Event] = {}
        #: Contents whose URL an earlier run uploaded and this run has not used yet.
        self._earlier: set[str] = set()
        #: URLs read from the journal (url -> sha256), until a refused submit forgets one.
        self._remembered: dict[str, str] = {}
        #: Contents sent again by resends (``materialize(resend=True)``) under a URL that is
        #: not their live one, and those URLs.
        self._resent: set[str] = set()
        self._stale: set[str] = set()
        self._loaded = False
        self._loading = anyio.Lock()

    def attach(self, cache: UploadCache | None) -> None:
        """Keep URLs in ``cache`` (None: for this run only)."""
        self.cache = cache

    # -- step 1: when a job is read ------------------------------------------------------------

    async def prepare(self, request: VideoRequest) -> VideoRequest:
        """``request`` with each local entry checked and made canonical (path and hash).

        Raises:
            ValidationError: every broken rule, naming the field (``image_urls[0]``).
        """
        if not has_local_refs(request):
            return request
        prepared, files = await run_sync(prepare_request, request, self.policy, self._checked)
        for local in files:
            self.files.setdefault(local.sha256, local)
        return prepared

    async def prepare_item(self, index: int, item: object) -> tuple[object, Failure | None]:
        """An input item (``VideoRequest`` or ``(name, VideoRequest)``) with its request
        prepared, or the outcome refusing it (a local file breaks a rule; nothing sent)."""
        name: str | None = None
        given: object = item  # returned as given (pyright narrows ``item`` below)
        request: object = item
        if isinstance(item, tuple):
            pair = cast("tuple[object, ...]", item)
            if len(pair) == 2 and isinstance(pair[0], str):
                name, request = pair[0], pair[1]
        if not isinstance(request, VideoRequest) or not has_local_refs(request):
            return given, None
        try:
            prepared = await self.prepare(request)
        except ValidationError as exc:
            failure = outcome_of(index, request, error=exc, name=name)
            assert isinstance(failure, Failure)
            return given, failure
        out: object = prepared if name is None else (name, prepared)
        return out, None

    # -- step 2: right before a job's submit ---------------------------------------------------

    async def materialize(
        self, request: VideoRequest, *, key: str | None = None, resend: bool = False
    ) -> VideoRequest:
        """``request`` as sent: each canonical entry replaced by its URL (uploading each
        distinct file once). Raises ``UploadError`` naming the file when an upload fails.

        With ``key``, the URLs are kept under it (``UploadCache.keep_sent``) before the submit.
        ``resend``: the job is sent again under the key of an earlier run's submit whose
        outcome is unknown; the URLs that submit named are sent again, expired or not, so the
        body is the same and the service answers the task it may have created (``submit``
        handles the refusal of an expired URL)."""
        if not has_local_refs(request):
            return request
        earlier = await self._sent(key) if resend and key is not None else {}
        urls: dict[str, str] = {}
        changes: dict[str, tuple[str, ...]] = {}
        for field in _FIELDS:
            refs: tuple[str, ...] = getattr(request, field)
            out: list[str] = []
            for i, ref in enumerate(refs):
                parsed = _canonical_hash(ref)
                if parsed is None:
                    out.append(ref)  # a URL (prepare refused any other local entry)
                    continue
                path, digest = parsed
                kind: Kind = "image" if field == "image_urls" else "video"
                if kind == "image" and ref in earlier:
                    urls[ref] = await self._resent_url(earlier[ref], digest)
                    out.append(urls[ref])
                    continue
                try:
                    url = await self._url(Path(path), digest, kind)
                except UploadError as exc:  # the file is gone or changed since its check
                    raise UploadError(f"{field}[{i}]", exc.path, exc.reason) from exc
                except ClientClosedError:
                    raise  # a closed client stops the batch as it does on a submit
                except ApimartError as exc:
                    raise UploadError(f"{field}[{i}]", path, exc) from exc
                out.append(url)
                if kind == "image":
                    urls[ref] = url
            changes[field] = tuple(out)
        if key is not None and urls and urls != earlier and self.cache is not None:
            try:
                await self.cache.keep_sent(key, urls)
            except JournalError as exc:  # a resend of this job will upload again
                logger.warning("URLs sent under a key not kept in the journal: %s", exc)
        return attrs.evolve(request, **changes)  # type: ignore[arg-type]

    async def _sent(self, key: str) -> dict[str, str]:
        """The URLs an earlier run's submit under ``key`` named (empty: none kept)."""
        if self.cache is None:
            return {}
        try:
            return await self.cache.sent(key)
        except JournalError as exc:
            logger.warning("URLs sent under a key not read from the journal: %s", exc)
            return {}

    async def _resent_url(self, url: str, digest: str) -> str:
        """``url``, named again by a resend; noted as stale when it is not (or no longer) the
        live URL of its content, so that a refusal of it may upload again (``submit``)."""
        await self._load()
        cached = self._urls.get(digest)
        if cached is not None and cached.url == url:
            if digest in self._earlier:  # first use in this run of an earlier run's URL
                self._earlier.discard(digest)
                self.stats.reused += 1
        else:
            self._stale.add(url)
            if digest not in self._resent:
                self._resent.add(digest)
                self.stats.reused += 1
        return url

    async def _url(self, path: Path, digest: str, kind: Kind) -> str:
        if kind == "video":
            data = await self._read_verified(path, digest)
            content_type = sniff_video(data) or "video/mp4"
            return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"
        await self._load()
        while True:
            cached = self._urls.get(digest)
            if cached is not None and cached.expires_at - REUPLOAD_MARGIN > self._wall():
                if digest in self._earlier:  # first use in this run of an earlier run's URL
                    self._earlier.discard(digest)
                    self.stats.reused += 1
                return cached.url
            event = self._inflight.get(digest)
            if event is None:
                break  # nobody uploads it (or the upload waited for failed): this job does
            await event.wait()  # another job is uploading this content: use its URL
        event = anyio.Event()
        self._inflight[digest] = event
        try:
            return await self._upload(path, digest)
        finally:
            del self._inflight[digest]
            event.set()

    async def _upload(self, path: Path, digest: str) -> str:
        data = await self._read_verified(path, digest)
        self.stats.uploading += 1
        try:
            reply = await self._api.upload_image(data, filename=path.name)
        except ApimartError:
            self.stats.failed += 1
            raise
        finally:
            self.stats.uploading -= 1
        entry = CachedUpload(digest, reply.url, _expiry(reply.created_at, self._wall()), len(data))
        self._urls[digest] = entry
        self._earlier.discard(digest)
        self.stats.uploaded += 1
        self.stats.bytes_uploaded += len(data)
        if self.cache is not None:
            try:
                await self.cache.put(entry)
            except JournalError as exc:  # the URL works; a later run uploads it again
                logger.warning("upload of %s not kept in the journal: %s", path, exc)
        return reply.url

    def submit(self, request: VideoRequest, sent: VideoRequest, key: str) -> Awaitable[str]:
        """``Api.submit(sent)`` under ``key``, ``sent`` being ``materialize(request)``: that
        very coroutine when ``sent`` names no image (nothing below applies; one coroutine
        less on every submit's path, issue 16)."""
        if not sent.image_urls:
            return self._api.submit(sent, idempotency_key=key)
        return self._submit(request, sent, key)

    async def _submit(self, request: VideoRequest, sent: VideoRequest, key: str) -> str:
        """``submit`` of a request naming images.

        When it is refused as a bad request, the upload URLs of earlier runs that ``sent``
        names are forgotten (``refused``). If ``sent`` was a resend naming URLs that are no
        longer their contents' live URLs (expired), the refusal means the earlier submit under
        ``key`` created no task (the service answers a repeated key and body with the task it
        created): the files are uploaded again and the job sent once more, under ``key``."""
        try:
            return await self._api.submit(sent, idempotency_key=key)
        except BadRequestError:
            if any(url in self._remembered for url in sent.image_urls):
                with anyio.CancelScope(shield=True):  # the job's outcome is recorded next
                    await self.refused(sent)
            if not any(url in self._stale for url in sent.image_urls):
                raise
        fresh = await self.materialize(request, key=key)
        return await self._api.submit(fresh, idempotency_key=key)

    async def refused(self, sent: VideoRequest) -> None:
        """The submit of ``sent`` was refused as a bad request. An upload URL it named that came
        from an earlier run (the journal) may be gone at the service before its 72 h: each is
        forgotten, here and in the journal, so the next job that needs the file, or the next
        run, uploads it again (at most one upload more per file and run; a URL this run
        uploaded is kept)."""
        for url in sent.image_urls:
            digest = self._remembered.pop(url, None)
            cached = self._urls.get(digest) if digest is not None else None
            if cached is None or cached.url != url:
                continue
            del self._urls[cached.sha256]
            if self.cache is not None:
                try:
                    await self.cache.put(attrs.evolve(cached, expires_at=0.0))
                except JournalError as exc:
                    logger.warning("a refused upload URL not forgotten by the journal: %s", exc)

    async def _read_verified(self, path: Path, digest: str) -> bytes:
        """The file's bytes, refused if they are no longer those checked by ``prepare``."""
        try:
            data = await run_sync(_read_regular, path)
        except OSError as exc:
            raise UploadError("file", str(path), exc) from None
        if data is None:
            raise UploadError("file", str(path), "is no longer a regular file")
        if await run_sync(_sha256, data) != digest:
            raise UploadError(
                "file", str(path), "the file changed after it was checked; run the batch again"
            )
        return data

    async def _load(self) -> None:
        """Read the URLs kept by earlier runs, once (jobs that come meanwhile wait for it)."""
        if self._loaded:
            return
        async with self._loading:
            if self._loaded or self.cache is None:
                self._loaded = True
                return
            try:
                entries = await self.cache.load()
            except JournalError as exc:  # the cache only saves uploads: go on without it
                logger.warning("uploads kept by earlier runs not read: %s", exc)
                entries = []
            now = self._wall()
            for entry in entries:
                if entry.expires_at - REUPLOAD_MARGIN > now and entry.sha256 not in self._urls:
                    self._urls[entry.sha256] = entry
                    self._earlier.add(entry.sha256)
                    self._remembered[entry.url] = entry.sha256
            self._loaded = True


def _expiry(created_at: int | None, now: float) -> float:
    """When an upload's URL stops working: ``UPLOAD_TTL`` after the reply's ``created_at``. A
    time that cannot be the upload's (ahead of our clock, so milliseconds or a clock far ahead;
    or older than a URL lives) counts from now: it would keep the URL past its end, or make
    every job upload the file again."""
    if created_at is None or not now - UPLOAD_TTL < created_at <= now:
        return now + UPLOAD_TTL
    return created_at + UPLOAD_TTL


def _read_regular(path: Path) -> bytes | None:
    """The bytes of the regular file at ``path``, None if it is not one (a folder, a pipe). It
    is opened without waiting: a named pipe put in its place after a check would block the
    read for good."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb") as f:
        return f.read() if stat.S_ISREG(os.fstat(fd).st_mode) else None


def _refused(rule: str) -> ValidationError:
    """A local entry breaks ``rule`` (``prepare_request`` names the field)."""
    return ValidationError([FieldError("file", rule, has_value=False)])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
