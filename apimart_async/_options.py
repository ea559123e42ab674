"""``BatchOptions``: the keywords of ``client.batch(...)``, checked once, frozen.

``AsyncApimart.batch`` spells the keywords out for readers and type checkers, and hands its
arguments over with ``BatchOptions.of(locals())``; this class is the one list the batch driver
reads (a test keeps the two lists equal, defaults included). To add a batch option: a field
here (with its check in ``__attrs_post_init__``), the keyword and its line in the docstring of
``AsyncApimart.batch``, and the code in ``_batch`` that reads it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs

from ._admission import Budget
from ._checks import (
    check_non_negative_seconds,
    check_positive_int,
    check_positive_number,
    check_seconds,
    path_rule,
    shown_path,
)
from ._download import RateFloor
from ._errors import FieldError, ValidationError
from ._hints import check_webhook_url
from ._jobs import Intake, download_deadline
from ._journal import JobRecord, Journal, SqliteJournal
from ._models import VideoRequest
from ._outcomes import BatchEvent
from ._pg_journal import is_postgres_url, is_url, journal_url_problem, redact_url
from ._poll_schedule import PollPolicy

__all__ = ["BatchOptions"]

_JOURNAL_METHODS = ("open", "close", "add", "set_task", "finish")


@attrs.frozen(kw_only=True)
class BatchOptions:
    """What one batch was asked to do (see ``AsyncApimart.batch`` for each keyword)."""

    concurrency: int = 8
    max_pending: int | None = None
    requests_per_second: float | None = None
    poll: PollPolicy | None = None
    job_timeout: float | None = None
    timeout: float | None = None
    stop_on_error: bool = False
    on_event: Callable[[BatchEvent], None] | None = None
    journal: str | os.PathLike[str] | Journal | None = attrs.field(
        default=None, repr=lambda j: repr(redact_url(j) if isinstance(j, str) else j)
    )
    name: str | None = None
    download_dir: str | os.PathLike[str] | None = None
    manifest: str | os.PathLike[str] | None = None
    max_bytes: int | None = None
    max_cost: float | None = None
    cost_estimate: Callable[[VideoRequest], float | None] | None = None
    check_balance: bool = False
    replay_finished: bool = True
    retry_failed: bool = False
    sigint_grace: float | None = None
    media_root: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None
    allow_any_path: bool = False
    min_download_rate: float | None = 10 * 1024
    download_rate_window: float = 30.0
    webhook_url: str | None = None
    lease: float = 30.0

    def __attrs_post_init__(self) -> None:
        check_positive_int("concurrency", self.concurrency)
        check_positive_int("max_pending", self.max_pending, allow_none=True)
        check_positive_int("max_bytes", self.max_bytes, allow_none=True)
        check_seconds("job_timeout", self.job_timeout)
        check_seconds("timeout", self.timeout)
        check_positive_number(
            "requests_per_second", self.requests_per_second, allow_none=True, finite=True
        )
        if self.poll is not None and not isinstance(self.poll, PollPolicy):
            raise ValidationError([FieldError("poll", "must be a PollPolicy", self.poll)])
        if self.max_cost is not None:
            Budget(self.max_cost)  # its own check
        check_non_negative_seconds("sigint_grace", self.sigint_grace)
        roots = self.media_root
        if roots is not None and not (
            isinstance(roots, (str, os.PathLike))
            or (
                isinstance(roots, Sequence)
                and roots
                and all(isinstance(r, (str, os.PathLike)) for r in roots)
            )
        ):
            rule = "must be a folder, or a non-empty list of folders"
            raise ValidationError([FieldError("media_root", rule, roots)])
        check_positive_number(
            "min_download_rate",
            self.min_download_rate,
            unit="of bytes per second",
            allow_none=True,
            finite=True,
        )
        check_positive_number(
            "download_rate_window", self.download_rate_window, unit="of seconds", finite=True
        )
        check_webhook_url(self.webhook_url)
        check_positive_number("lease", self.lease, unit="of seconds", finite=True)
        self._check_kinds()

    def _check_kinds(self) -> None:
        """Paths, the journal and the callables: of the right kind, or refused by name here
        (not as a raw error when the batch starts, nor quietly later)."""
        bad: list[FieldError] = []
        for name in ("download_dir", "manifest"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                bad.append(FieldError(name, "must be a path (str or os.PathLike)", value))
        roots = self.media_root
        paths: dict[str, list[object]] = {
            "download_dir": [self.download_dir],
            "manifest": [self.manifest],
            "media_root": [roots] if isinstance(roots, (str, os.PathLike)) else list(roots or ()),
            "journal": [self.journal] if isinstance(self.journal, (str, os.PathLike)) else [],
        }
        for name, values in paths.items():
            for value in values:  # a NUL, a lone surrogate: no file system takes one
                rule = path_rule(value)
                if rule is not None:
                    bad.append(FieldError(name, rule, shown_path(value)))
                    break
        journal = self.journal
        if not (
            journal is None
            or isinstance(journal, (str, os.PathLike))
            or all(callable(getattr(journal, m, None)) for m in _JOURNAL_METHODS)
        ):
            bad.append(FieldError("journal", "must be a path or a Journal", journal))
        elif isinstance(journal, str) and is_url(journal):
            problem = journal_url_problem(journal)
            if problem is not None:  # never a file path with the password in its name
                bad.append(FieldError("journal", problem, redact_url(journal)))
        # the batch's name: the key of a PostgreSQL journal, which holds many batches
        if is_postgres_url(journal):
            if not isinstance(self.name, str) or not self.name.strip():
                rule = "is required with a postgresql:// journal (one database holds many batches)"
                bad.append(FieldError("name", rule, self.name))
        elif self.name is not None:
            rule = "is for a postgresql:// journal only (a file or a Journal holds one batch)"
            bad.append(FieldError("name", rule, self.name))
        for name in ("on_event", "cost_estimate"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                bad.append(FieldError(name, "must be callable", value))
        if bad:
            raise ValidationError(bad)

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> BatchOptions:
        """The options among ``arguments`` (a call's ``locals()``): every field by name."""
        return cls(**{field.name: arguments[field.name] for field in attrs.fields(cls)})

    def intake(self, records: dict[int, JobRecord], *, downloads: bool) -> Intake:
        """The ``Intake`` of this batch's input items (``records``: what a journal holds)."""
        return Intake(
            records, downloads=downloads, retry_failed=self.retry_failed, webhook=self.webhook_url
        )

    def make_journal(self) -> Journal | None:
        """The ``Journal`` to record in: the one given, a ``PostgresJournal`` for a
        ``postgresql://`` URL (batch ``name``, schema ``apimart``), or an ``SqliteJournal``
        at the path."""
        journal = self.journal
        if is_postgres_url(journal):
            from ._pg_journal import PostgresJournal  # asyncpg, imported only for this

            assert isinstance(journal, str)
            assert self.name is not None
            return PostgresJournal(journal, name=self.name)
        if journal is None or isinstance(journal, (str, os.PathLike)):
            return SqliteJournal(os.fspath(journal)) if journal is not None else None
        return journal

    def paths(self) -> tuple[Path | None, Path | None]:
        """The download directory and the manifest (``<download_dir>/manifest.jsonl`` unless
        given), or None for each."""
        folder = Path(self.download_dir) if self.download_dir is not None else None
        manifest = self.manifest
        if manifest is None and folder is not None:
            manifest = folder / "manifest.jsonl"
        return folder, Path(manifest) if manifest is not None else None

    def download_floor(self) -> RateFloor | None:
        """The slowest a download may go before it is cut and resumed (None: no floor)."""
        if self.min_download_rate is None:
            return None
        return RateFloor(float(self.min_download_rate), float(self.download_rate_window))

    def download_deadline(
        self, since_submit: float | None, time_scale: float, batch_ends_at: float
    ) -> tuple[float, str]:
        """When a job's download must end, on anyio's clock, and which limit says so
        (``_jobs.download_deadline``)."""
        return download_deadline(
            self.timeout,
            self.job_timeout,
            now=anyio.current_time(),
            batch_ends_at=batch_ends_at,
            since_submit=since_submit,
            time_scale=time_scale,
        )

    def budget(self) -> Budget | None:
        """A fresh ``Budget`` for ``max_cost`` (None without it)."""
        if self.max_cost is None:
            return None
        return Budget(self.max_cost, self.cost_estimate)
