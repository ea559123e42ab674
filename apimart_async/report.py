"""An HTML gallery of a batch: every job's video(s) with its prompt, side by side.

``write_gallery(source, out_dir)`` writes ``out_dir/index.html`` from a manifest
(``manifest.jsonl``, or the folder that holds it), a journal (the SQLite file) or a list of
``GalleryJob``; ``render_gallery(jobs)`` returns the same page as a string (a web backend can
serve it). ``LiveGallery`` keeps the page current while a batch runs (``apimart-async run``).

The page is one static file: inline CSS and a short inline script (filters), nothing fetched
from anywhere, so it works from ``file://``. Every text is HTML-escaped, every file path
URL-encoded, and a Content-Security-Policy meta tag allows only the page's own style and script
(by hash) and media from the page's own folder: a prompt such as
``<script>alert(1)</script>`` is shown as text and runs nothing.

Uses the public API of ``apimart_async`` only.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import html
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import anyio
import anyio.abc
import attrs

import apimart_async as am
from apimart_async._errors import GalleryError
from apimart_async._json import is_array, is_object
from apimart_async._threads import run_sync

__all__ = [
    "GalleryError",
    "GalleryJob",
    "LiveGallery",
    "read_journal",
    "read_manifest",
    "render_gallery",
    "write_gallery",
]

logger: logging.Logger = logging.getLogger("apimart_async.report")

INDEX = "index.html"

PENDING_STATUSES = frozenset(
    {"queued", "submitting", "submitted", "pending", "processing", "in_progress", "running"}
    | {"downloading"}  # completed at the service, files still coming (journal)
    | {"not submitted"}  # the batch stopped (Ctrl-C, deadline) before sending it: a re-run does
)
"""Statuses of jobs that have not ended; "completed" is done; anything else counts as failed."""


@attrs.frozen
class GalleryJob:
    """One card of the gallery. ``files`` are paths of the job's videos (absolute, or
    relative to the gallery's folder); ``created``/``completed`` are the task's Unix times.

    The job: ``index`` (its position in the input), ``name``, ``status``; its request:
    ``prompt``, ``model``, ``duration``, ``resolution``, ``aspect_ratio``, ``seed``; its end:
    ``task_id``, ``cost`` (USD), ``error``.
    """

    index: int
    status: str
    name: str | None = None
    prompt: str | None = None
    model: str | None = None
    duration: int | float | None = None
    resolution: str | None = None
    aspect_ratio: str | None = None
    seed: int | None = None
    cost: float | None = None
    task_id: str | None = None
    error: str | None = None
    files: tuple[str, ...] = ()
    created: int | float | None = None
    completed: int | float | None = None

    @property
    def group(self) -> str:
        """``done``, ``failed`` or ``pending``: the header's totals."""
        if self.status == "completed":
            return "done"
        return "pending" if self.status in PENDING_STATUSES else "failed"

    @classmethod
    def from_body(
        cls, index: int, status: str, body: Mapping[str, Any] | None, **kw: Any
    ) -> GalleryJob:
        """A card from a submit body (``apimart_async.VideoRequest.to_body()``, the
        manifest's ``request``)."""
        body = body if isinstance(body, Mapping) else {}
        resolution = body.get("resolution", body.get("size"))
        return cls(
            index=index,
            status=status,
            prompt=_text(body.get("prompt")),
            model=_text(body.get("model")),
            duration=_number(body.get("duration")),
            resolution=_text(resolution),
            aspect_ratio=_text(body.get("aspect_ratio")),
            seed=seed if isinstance(seed := body.get("seed"), int) and seed is not True else None,
            **kw,
        )


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _number(value: object) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


# -- the page -------------------------------------------------------------------------------

_CSS = """
:root{color-scheme:light dark;--bg:#f6f6f4;--fg:#1c1c1c;--mute:#666;--card:#fff;--line:#ddd;
--ok:#17803d;--bad:#b42318;--wait:#9a6700;--code:#f0f0ee}
@media (prefers-color-scheme:dark){:root{--bg:#121212;--fg:#e8e8e8;--mute:#a0a0a0;
--card:#1e1e1e;--line:#333;--ok:#4ade80;--bad:#f87171;--wait:#fbbf24;--code:#2a2a2a}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.45 system-ui,-apple-system,
"Segoe UI",Roboto,sans-serif}
header{position:sticky;top:0;z-index:1;background:var(--bg);border-bottom:1px solid var(--line);
padding:.6rem 1rem}
h1{font-size:1.15rem;margin:0 0 .3rem}
.totals{display:flex;flex-wrap:wrap;gap:.3rem 1.1rem;margin:0;padding:0;list-style:none}
.totals b{font-variant-numeric:tabular-nums}
.filters{display:flex;flex-wrap:wrap;gap:.5rem 1rem;margin-top:.4rem;align-items:center}
select{font:inherit;padding:.15rem .3rem;max-width:100%}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,300px),1fr));
gap:1rem;padding:1rem}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;overflow:hidden;
display:flex;flex-direction:column;min-width:0}
.card[hidden]{display:none}
.card{content-visibility:auto;contain-intrinsic-size:auto 28rem}
.media{aspect-ratio:16/9;background:#000}
video{display:block;width:100%;height:100%}
a{color:inherit}
.body{padding:.6rem .75rem .75rem;display:flex;flex-direction:column;gap:.4rem}
.top{display:flex;justify-content:space-between;gap:.5rem;align-items:baseline}
h2{font-size:1rem;margin:0;overflow-wrap:anywhere}
.st{font-size:.8rem;font-weight:600;padding:.05rem .45rem;border-radius:99px;
border:1px solid currentColor;white-space:nowrap}
.g-done .st{color:var(--ok)}.g-failed .st{color:var(--bad)}.g-pending .st{color:var(--wait)}
.prompt{margin:0;white-space:pre-wrap;overflow-wrap:anywhere;max-height:9.5em;overflow:auto}
.none{color:var(--mute);font-style:italic}
.err{margin:0;padding:.5rem .75rem;color:var(--bad);background:var(--code);
white-space:pre-wrap;overflow-wrap:anywhere}
.wait{margin:0;padding:.5rem .75rem;color:var(--mute)}
dl{display:grid;grid-template-columns:auto 1fr;gap:.1rem .6rem;margin:0;font-size:.85rem}
dt{color:var(--mute)}dd{margin:0;overflow-wrap:anywhere}
code{font:.8rem ui-monospace,SFMono-Regular,Menlo,monospace}
footer{color:var(--mute);font-size:.8rem;padding:0 1rem 1rem}
"""

# Filters (kept in the address's #fragment, so a reload keeps them) and, while a batch runs,
# a reload every few seconds unless a video is playing. No data in here: the hash is constant.
_JS = """
(function(){
var st=document.getElementById('f-status'),md=document.getElementById('f-model'),
shown=document.getElementById('shown'),cards=document.querySelectorAll('.card');
function apply(){var n=0,s=st.value,m=md.value;
for(var i=0;i<cards.length;i++){var c=cards[i],ok=(!s||c.dataset.status===s)&&
(!m||c.dataset.model===m);if(c.hidden===ok)c.hidden=!ok;if(ok)n++}
shown.textContent=n;var h=new URLSearchParams();if(s)h.set('status',s);if(m)h.set('model',m);
history.replaceState(null,'',h.toString()?'#'+h:location.pathname+location.search)}
var q=new URLSearchParams(location.hash.slice(1));
function pick(el,v){for(var i=0;i<el.options.length;i++)if(el.options[i].value===v)el.value=v}
pick(st,q.get('status')||'');pick(md,q.get('model')||'');
st.addEventListener('change',apply);md.addEventListener('change',apply);
if(st.value||md.value)apply();
function show(m){var t=m.querySelector('template');if(t)m.replaceChild(t.content.cloneNode(true),t)}
setTimeout(function(){var media=document.querySelectorAll('.media');
if('IntersectionObserver' in window){var io=new IntersectionObserver(function(es){
es.forEach(function(e){if(e.isIntersecting){io.unobserve(e.target);show(e.target)}})},
{rootMargin:'800px 0px'});for(var i=0;i<media.length;i++)io.observe(media[i])}
else for(var i=0;i<media.length;i++)show(media[i])},0);
var every=+document.body.dataset.refresh;
if(every>0)setInterval(function(){var v=document.querySelectorAll('video');
for(var i=0;i<v.length;i++)if(!v[i].paused)return;location.reload()},every*1000);
})();
"""


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


CSP = (
    "default-src 'none'; "
    f"script-src {_csp_hash(_JS)}; "
    f"style-src {_csp_hash(_CSS)}; "
    "media-src 'self'; "
    "base-uri 'none'; form-action 'none'"
)


# Characters a text must not obey: C0/C1 controls (but tab, newline and carriage return) and
# the explicit direction embeddings, overrides and isolates. An unclosed U+202E in a prompt or
# a model name (echoed in an error) would turn the rest of its line backwards ("Trojan
# Source"); they are shown as their code point instead. Natural RTL text and the RLM/LRM marks
# need none of them and are left alone.
_UNSHOWN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _e(value: object) -> str:
    text = _UNSHOWN.sub(lambda m: f"[U+{ord(m.group()):04X}]", str(value))
    return html.escape(text, quote=True)


class _Links:
    """Links from the page in ``base_dir`` to video files (the folder resolved once)."""

    def __init__(self, base_dir: str | os.PathLike[str] | None) -> None:
        self.base = os.path.realpath(base_dir) if base_dir is not None else None

    def __call__(self, path: str) -> str:
        p = os.fspath(path)
        if self.base is not None and os.path.isabs(p):
            name = os.path.basename(p)
            try:
                rel: str | None = os.path.relpath(p, self.base)
            except ValueError:  # another drive (Windows)
                rel = None
            outside = rel is None or rel == os.pardir or rel.startswith(os.pardir + os.sep)
            if outside and os.path.exists(os.path.join(self.base, name)):
                # The folder was moved or copied: the video next to the page, not the one
                # where the manifest says it was written (gone, or the original of a copy).
                rel = name
            if rel is not None:  # else (another drive, nothing next to the page): as given
                p = rel
        if os.path.isabs(p):
            return Path(p).as_uri()
        parts = p.replace(os.sep, "/").split("/")
        return "/".join(quote(part, safe="") for part in parts if part not in ("", ".")) or "."

    def missing(self, path: str) -> bool:
        """A recorded (absolute) video that is neither where it was written nor next to the
        page: deleted. Relative paths and pages without a folder are not checked."""
        p = os.fspath(path)
        if self.base is None or not os.path.isabs(p) or os.path.exists(p):
            return False
        return not os.path.exists(os.path.join(self.base, os.path.basename(p)))


def file_url(path: str, base_dir: str | os.PathLike[str] | None = None) -> str:
    """The page's link to a video: relative to ``base_dir`` (the gallery's folder), each part
    percent-encoded (spaces, ``#``, ``?``, ``%``, non-ASCII), so no file name can change what
    the link means."""
    return _Links(base_dir)(path)


def _money(value: float) -> str:
    if not math.isfinite(value):
        return "–"
    return f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:.4f}"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


def _elapsed_of(jobs: Sequence[GalleryJob]) -> float | None:
    starts = [j.created for j in jobs if j.created is not None]
    ends = [j.completed for j in jobs if j.completed is not None]
    if not starts or not ends:
        return None
    elapsed = max(0.0, float(max(ends)) - float(min(starts)))
    return elapsed if math.isfinite(elapsed) else None


def _card(job: GalleryJob, link: _Links) -> str:
    title = job.name or f"job {job.index}"
    model = job.model or "?"
    out = [
        f'<article class="card g-{job.group}" id="job-{job.index}" '
        f'data-status="{_e(job.status)}" data-model="{_e(model)}">'
    ]
    urls = [link(path) for path in job.files]
    for n, (url, path) in enumerate(zip(urls, job.files, strict=True)):
        label = title if len(urls) == 1 else f"{title} ({n + 1}/{len(urls)})"
        if link.missing(path):  # deleted since: say so rather than show a player of nothing
            out.append(f'<p class="wait">video file not found: {_e(Path(path).name)}</p>')
            continue
        # Inert until the card nears the screen (the script puts it in place): a thousand
        # live <video> elements take Chromium many seconds to build.
        out.append(
            f'<div class="media"><template><video controls preload="metadata" src="{_e(url)}" '
            f'title="{_e(label)}"></video></template></div>'
        )
    if job.error:
        kind = "wait" if job.group == "pending" else "err"  # why it is not sent yet: no failure
        out.append(f'<p class="{kind}">{_e(job.error)}</p>')
    elif not job.files:
        text = "waiting…" if job.group == "pending" else "no video"
        out.append(f'<p class="wait">{text}</p>')
    out.append(
        f'<div class="body"><div class="top"><h2>{_e(title)}</h2>'
        f'<span class="st">{_e(job.status)}</span></div>'
    )
    if job.prompt:
        out.append(f'<p class="prompt">{_e(job.prompt)}</p>')
    else:
        out.append('<p class="prompt none">(no prompt)</p>')
    rows = [("model", _e(model))]
    if job.duration is not None:
        rows.append(("duration", f"{_e(job.duration)} s"))
    if job.resolution is not None:
        rows.append(("resolution", _e(job.resolution)))
    if job.aspect_ratio is not None:
        rows.append(("aspect", _e(job.aspect_ratio)))
    if job.seed is not None:
        rows.append(("seed", _e(job.seed)))
    if job.cost is not None:
        rows.append(("cost", _money(job.cost)))
    if job.task_id:
        rows.append(("task", f"<code>{_e(job.task_id)}</code>"))
    if urls:
        links = " ".join(
            f'<a href="{_e(url)}">{_e(Path(path).name)}</a>'
            for url, path in zip(urls, job.files, strict=True)
        )
        rows.append(("file" if len(urls) == 1 else "files", links))
    out.append("<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>")
    out.append("</div></article>")
    return "".join(out)


def _options(label: str, ident: str, values: Iterable[str], counts: Mapping[str, int]) -> str:
    opts = "".join(
        f'<option value="{_e(v)}">{_e(v)} ({counts[v]})</option>' for v in sorted(values)
    )
    return (
        f'<label>{label} <select id="{ident}"><option value="">all</option>{opts}</select></label>'
    )


def render_gallery(
    jobs: Iterable[GalleryJob],
    *,
    base_dir: str | os.PathLike[str] | None = None,
    title: str = "apimart-async gallery",
    elapsed: float | None = None,
    refresh: float | None = None,
    now: datetime.datetime | None = None,
) -> str:
    """The gallery page as a string.

    Args:
        jobs: the cards, shown in ``index`` order.
        base_dir: the folder the page will live in; absolute video paths are linked relative
            to it (default: paths are linked as given).
        elapsed: seconds for the header (default: from the tasks' created/completed times).
        refresh: reload the page every this many seconds while no video plays (a running
            batch); None for a finished one.
        now: the "written at" time (default: now, UTC).
    """
    cards = sorted(jobs, key=lambda j: j.index)
    link = _Links(base_dir)
    groups = {"done": 0, "failed": 0, "pending": 0}
    statuses: dict[str, int] = {}
    models: dict[str, int] = {}
    cost = 0.0
    for job in cards:
        groups[job.group] += 1
        statuses[job.status] = statuses.get(job.status, 0) + 1
        model = job.model or "?"
        models[model] = models.get(model, 0) + 1
        if job.cost is not None and math.isfinite(job.cost):
            cost += job.cost
    if elapsed is None:
        elapsed = _elapsed_of(cards)
    written = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%d %H:%M:%S UTC")
    refresh_attr = f' data-refresh="{refresh:g}"' if refresh else ""
    totals = [
        ("jobs", str(len(cards))),
        ("done", str(groups["done"])),
        ("failed", str(groups["failed"])),
        ("pending", str(groups["pending"])),
        ("cost", _money(cost)),
        ("elapsed", _duration(elapsed)),
    ]
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n',
        '<meta name="viewport" content="width=device-width,initial-scale=1">\n',
        '<meta name="color-scheme" content="light dark">\n',
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n",
        f'<body{refresh_attr}>\n<header><h1>{_e(title)}</h1>\n<ul class="totals">',
        "".join(f'<li id="t-{k}">{k} <b>{v}</b></li>' for k, v in totals),
        '</ul>\n<div class="filters">',
        _options("status", "f-status", statuses, statuses),
        _options("model", "f-model", models, models),
        '<span>showing <b id="shown">',
        str(len(cards)),
        "</b></span></div><noscript><p>JavaScript is off: the videos are not embedded; each "
        "card links its files.</p></noscript></header>\n<main>\n",
        "\n".join(_card(job, link) for job in cards),
        "\n</main>\n<footer>written ",
        written,
        " by apimart-async",
        " · updating while the batch runs" if refresh else "",
        "</footer>\n<script>",
        _JS,
        "</script>\n</body></html>\n",
    ]
    return "".join(parts)


# -- sources ------------------------------------------------------------------------------


def _manifest_job(line: Mapping[str, Any]) -> GalleryJob:
    index = line.get("index")
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError("no job index")
    listed: object = line.get("files") or []  # JSON: a list, or nothing
    if not is_array(listed):
        raise ValueError("files is not a list")
    files: tuple[str, ...] = tuple(
        f["path"] for f in listed if is_object(f) and isinstance(f.get("path"), str)
    )
    return GalleryJob.from_body(
        index,
        _text(line.get("status")) or "error",
        line.get("request"),
        name=_text(line.get("name")),
        cost=_number(line.get("cost")),
        task_id=_text(line.get("task_id")),
        error=_text(line.get("error")),
        files=files,
        created=_number(line.get("created")),
        completed=_number(line.get("completed")),
    )


def read_manifest(path: str | os.PathLike[str]) -> list[GalleryJob]:
    """The cards of a ``manifest.jsonl`` (the last line of a job wins). A cut-off last line
    (a crash while writing) is skipped; any other unreadable line is an error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GalleryError(f"cannot read manifest {path}: {exc}") from None
    jobs: dict[int, GalleryJob] = {}
    lines = text.split("\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            try:
                line = json.loads(raw)
            except RecursionError:
                raise ValueError("nested too deeply") from None
            if not is_object(line):
                raise ValueError("not a JSON object")
            job = _manifest_job(line)
        except ValueError as exc:
            if number == len(lines):  # no newline after it: cut off mid-write
                logger.warning("%s:%d: skipped a cut-off last line", path, number)
                continue
            raise GalleryError(f"{path}:{number}: not a manifest line ({exc})") from None
        jobs[job.index] = job
    return list(jobs.values())


def read_journal(path: str | os.PathLike[str]) -> list[GalleryJob]:
    """The cards of a batch journal (SQLite): every job it recorded, pending ones included."""
    records = am.SqliteJournal.read(Path(path))
    jobs: list[GalleryJob] = []
    for rec in records.values():
        task = rec.task or {}
        if rec.state == "done":
            status = rec.status or "error"
        elif rec.state == "downloading":
            status = "downloading"
        else:
            status = "submitting" if rec.state == "submitting" else "pending"
        jobs.append(
            GalleryJob.from_body(
                rec.index,
                status,
                rec.request,
                name=rec.name,
                cost=rec.cost,
                task_id=rec.task_id,
                error=rec.error,
                files=tuple(f.path for f in rec.files),
                created=_number(task.get("created")),
                completed=_number(task.get("completed")),
            )
        )
    return jobs


def _load(source: str | os.PathLike[str]) -> list[GalleryJob]:
    path = Path(source)
    if path.is_dir():
        path = path / "manifest.jsonl"
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise GalleryError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head == b"SQLite format 3\x00":
        return read_journal(path)
    return read_manifest(path)


# -- writing --------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, whole:
    a temporary file in the same folder, flushed to disk, then renamed over it."""
    data = text.encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".index-", suffix=".html.tmp", dir=path.parent)
    except OSError as exc:
        raise GalleryError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise GalleryError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_gallery(
    manifest_or_journal: str | os.PathLike[str] | Iterable[GalleryJob],
    out_dir: str | os.PathLike[str],
    *,
    title: str | None = None,
    elapsed: float | None = None,
    refresh: float | None = None,
) -> Path:
    """Write ``out_dir/index.html`` atomically and return its path.

    Args:
        manifest_or_journal: a ``manifest.jsonl``, a folder holding one, a journal file
            (SQLite; pending jobs show too) or the cards themselves.
        out_dir: the folder of the page; video links are relative to it.

    Raises:
        GalleryError: the source cannot be read or the page cannot be written.
        JournalError: the journal cannot be read.
    """
    out = Path(out_dir)
    if isinstance(manifest_or_journal, (str, os.PathLike)):
        jobs = _load(manifest_or_journal)
    else:
        jobs = list(manifest_or_journal)
    page = render_gallery(
        jobs,
        base_dir=out,
        title=title or f"apimart-async · {out.resolve().name or out}",
        elapsed=elapsed,
        refresh=refresh,
    )
    target = out / INDEX
    _write_atomic(target, page)
    return target


# -- live -----------------------------------------------------------------------------------


class _Throttle:
    """When to write next: at once after a quiet spell, else ``interval`` after the last
    write, or ten times what that write took if longer (a page of 200,000 jobs takes seconds
    to render: the gallery keeps to a tenth of the time). Sans-IO: ``wait(now)`` says how
    long to hold a pending change."""

    SHARE = 10  # a write, then at least nine times its length without one

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last: float | None = None
        self.spacing = interval

    def wait(self, now: float) -> float:
        if self.last is None:
            return 0.0
        return max(0.0, self.last + self.spacing - now)

    def wrote(self, now: float, took: float = 0.0) -> None:
        self.last = now
        self.spacing = max(self.interval, took * self.SHARE)


def _outcome_status(outcome: am.Outcome) -> str:
    if outcome.ok:
        return "completed"
    if isinstance(outcome.error, am.BatchStoppedError):
        return "not submitted"
    task = outcome.task
    if isinstance(outcome.error, am.TaskFailedError) and task is not None:
        return task.raw_status or task.status.value
    if task is not None and task.ok:
        return "download_failed"
    return "error"


class LiveGallery:
    """``out_dir/index.html`` kept current while a batch runs::

        async with LiveGallery(out, jobs) as gallery:
            async with client.batch(jobs, ..., on_event=gallery.event) as results:
                async for outcome in results:
                    gallery.outcome(outcome)

    Every job has a card from the start (queued, then running, then its outcome). Changes
    wake one writer task, which renders and writes on a worker thread at most once every
    ``interval`` seconds, and once more on exit, so a 1,000-job batch does not rewrite the page
    1,000 times. A failed write is logged (``error`` keeps it) and never stops the batch.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        jobs: Sequence[am.VideoRequest | tuple[str | None, am.VideoRequest]],
        *,
        interval: float = 1.0,
        refresh: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out_dir: Path = Path(out_dir)
        """The gallery's folder."""
        self.path: Path = self.out_dir / INDEX
        """The page: ``out_dir/index.html``."""
        self.refresh = refresh
        """Seconds between the page's reloads while the batch runs."""
        self.writes: int = 0
        """How many times the page was written."""
        self.error: GalleryError | None = None
        self._clock = clock
        self._throttle = _Throttle(interval)
        self._cards: dict[int, GalleryJob] = {}
        for index, item in enumerate(jobs):
            name, request = item if isinstance(item, tuple) else (None, item)
            self._cards[index] = GalleryJob.from_body(index, "queued", request.to_body(), name=name)
        self._started = clock()
        self._changed: anyio.Event | None = None  # made on entry, inside the event loop
        self._tg: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        groups: dict[str, int] = {}
        for card in self._cards.values():
            groups[card.group] = groups.get(card.group, 0) + 1
        counts = ", ".join(f"{k} {v}" for k, v in sorted(groups.items()))
        return f"<LiveGallery {str(self.path)!r} [{counts}] writes={self.writes}>"

    @property
    def jobs(self) -> list[GalleryJob]:
        """The cards, in input order."""
        return list(self._cards.values())

    def event(self, event: am.BatchEvent) -> None:
        """Feed ``on_event``: submitted and running jobs change their card."""
        card = self._cards.get(event.index)
        if card is None or card.group != "pending":
            return
        if event.kind == "submitted":
            self._set(attrs.evolve(card, status="submitted", task_id=event.task_id))
        elif event.kind == "progress" and card.status != "running":
            self._set(attrs.evolve(card, status="running", task_id=event.task_id))

    def outcome(self, outcome: am.Outcome) -> None:
        """A job ended (or was replayed from the journal): its card gets the result."""
        card = self._cards.get(outcome.index)
        if card is None:
            body = outcome.request.to_body() if outcome.request is not None else None
            card = GalleryJob.from_body(outcome.index, "queued", body, name=outcome.name)
        task = outcome.task
        self._set(
            attrs.evolve(
                card,
                status=_outcome_status(outcome),
                task_id=outcome.task_id,
                cost=task.cost if task is not None else None,
                error=str(outcome.error) if outcome.error is not None else None,
                files=tuple(f.path for f in outcome.files),
                created=task.created if task is not None else None,
                completed=task.completed if task is not None else None,
            )
        )

    def _set(self, card: GalleryJob) -> None:
        self._cards[card.index] = card
        if self._changed is not None:
            self._changed.set()

    def render(self, *, final: bool = False) -> str:
        """The page as it would be written now (``final``: the batch has ended)."""
        return self._page(self.jobs, self._clock() - self._started, final)

    def _page(self, jobs: list[GalleryJob], ran: float, final: bool) -> str:
        # This run's time, or the tasks' span when longer (a resumed batch replays its
        # finished jobs at once: "0:00" would be wrong).
        elapsed = max(ran, _elapsed_of(jobs) or 0.0)
        return render_gallery(
            jobs,
            base_dir=self.out_dir,
            title=f"apimart-async · {self.out_dir.resolve().name or self.out_dir}",
            elapsed=elapsed,
            refresh=None if final else self.refresh,
        )

    def _render_and_write(self, jobs: list[GalleryJob], ran: float, final: bool) -> None:
        _write_atomic(self.path, self._page(jobs, ran, final))

    async def write(self, *, final: bool = False) -> None:
        """Render and write on a worker thread (the cards as they are now: a page of many
        jobs takes long to render, never on the event loop)."""
        start = self._clock()
        jobs = self.jobs  # the cards are the loop's: a copy of the list for the thread
        try:
            await run_sync(self._render_and_write, jobs, start - self._started, final)
        except GalleryError as exc:
            if self.error is None:
                logger.warning("the gallery was not updated: %s", exc)
            self.error = exc
        else:
            self.writes += 1
        finally:
            self._throttle.wrote(start, took=self._clock() - start)

    async def _writer(self) -> None:
        while True:
            assert self._changed is not None
            await self._changed.wait()
            delay = self._throttle.wait(self._clock())
            if delay > 0:
                await anyio.sleep(delay)
            self._changed = anyio.Event()
            await self.write()

    async def __aenter__(self) -> LiveGallery:
        self._changed = anyio.Event()
        await self.write()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._writer, name="apimart-async gallery writer")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        with anyio.CancelScope(shield=True):
            await self.write(final=True)
