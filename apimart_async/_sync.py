"""``Apimart``: a synchronous facade over ``AsyncApimart``, for scripts and notebooks.

The async client runs in an event loop of its own, on a thread started through an anyio
blocking portal (``anyio.from_thread.start_blocking_portal``); each sync method hands its call
to that loop and waits for the result. Nothing is written twice: a method of the facade is
``_blocking(AsyncClass.method)``, a descriptor that forwards the call with the same signature
and docstring. Because the loop is on its own thread, the facade also works where an event loop
is already running in the calling thread (Jupyter), which ``asyncio.run`` cannot.

Ctrl-C (KeyboardInterrupt) while a call waits cancels that call in the loop; leaving a batch
early (``break``, an exception, Ctrl-C) leaves the async batch as ``async with`` would;
``close()`` closes the client, then stops the loop and its thread (a client never closed is
closed when collected, or at interpreter exit).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import inspect
import os
import signal
import ssl as _ssl
import threading
import weakref
from collections.abc import Awaitable, Callable, Generator, Iterator
from types import TracebackType
from typing import Any, Concatenate, Final, Generic, ParamSpec, Self, TypeVar, overload

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._client import DEFAULT_WAIT_UNREACHABLE, AsyncApimart, Tasks, Uploads, Videos
from ._config import DEFAULT_TIMEOUT, Timeout
from ._errors import ApimartError, ClientClosedError
from ._handle import Batch
from ._interrupt import refuse, sigint_is_ours_to_take
from ._journal import SqliteJournal
from ._options import BatchOptions
from ._outcomes import Failure, Success
from ._pg_journal import PostgresJournal
from ._poll_schedule import PollPolicy
from ._references import UploadStats
from ._threads import refused

__all__ = ["Apimart", "SyncBatch"]

P = ParamSpec("P")
T = TypeVar("T")
W = TypeVar("W")
R = TypeVar("R")


class _Loop:
    """The event loop thread of one ``Apimart``, shared by its facades."""

    def __init__(self, portal: BlockingPortal) -> None:
        self.portal = portal
        self.closed = False
        #: ``close()`` has begun: a call its loop's stop cancels ends with ClientClosedError
        self.closing = False
        #: Set when ``close()`` has ended: a second ``close()`` (another thread) waits for it.
        self.ended: threading.Event = threading.Event()
        #: The loop's thread (a ``close()`` called there cannot wait for one elsewhere).
        self.thread_id: int = portal.call(threading.get_ident)

    @property
    def stopped_by_close(self) -> bool:
        """Whether ``close()`` (from another thread, maybe) has begun or ended: a call its
        stop cancelled or refused ends with ClientClosedError, not anyio's own error."""
        return self.closing or self.closed

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` in the loop and wait for its result. If the wait is interrupted
        (Ctrl-C), the call is cancelled in the loop, and has ended there, before the
        interruption goes on: a download cut so has let its ``.part`` go (brk16f: a retry at
        once found it still locked)."""
        if self.closed:
            raise ClientClosedError("the client is closed")
        ended = threading.Event()

        async def run() -> T:
            try:
                return await fn()
            finally:
                ended.set()

        try:
            with _ctrl_c_held() as held:  # a Ctrl-C in here would lose the future
                future = self.portal.start_task_soon(run)
        except RuntimeError:  # anyio: "This portal is not running"
            if self.stopped_by_close:  # close() (another thread) stopped it just now
                raise ClientClosedError("the client is closed") from None
            raise
        try:
            if held:
                raise KeyboardInterrupt
            return future.result()
        except concurrent.futures.CancelledError:
            # Nobody here cancelled it: ``close()`` (from another thread, e.g. a web app's
            # shutdown while a sync endpoint calls) stopped the loop while it still ran.
            if self.stopped_by_close:
                raise ClientClosedError("the client was closed while this call ran") from None
            raise
        except BaseException:
            future.cancel()
            # its cleanup runs in the loop (shielded, short); a second Ctrl-C ends this wait
            while not ended.wait(0.25) and not self.stopped_by_close:
                pass
            raise

    def call_sync(self, fn: Callable[[], T]) -> T:
        """Run a plain function in the loop's thread (to read state the loop owns)."""

        async def run() -> T:
            return fn()

        return self.call(run)


@contextlib.contextmanager
def _ctrl_c_held() -> Generator[list[int], None, None]:
    """Ctrl-C held back while a call is handed to the loop (brk16h: one landing in anyio's
    ``start_task_soon`` lost the call's future, and the call ran on in the loop, never
    cancelled). Only on the main thread and over Python's own handler, which is put back;
    the list says whether one came (the caller then raises KeyboardInterrupt itself)."""
    held: list[int] = []
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield held
        return
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class _Facade:
    """A sync front for one async object (``_target``) living in ``_loop``. ``_owner``, the
    ``Apimart`` it came from, is kept alive by it: ``Apimart(...).videos`` or a batch must not
    see its client collected, and closed, while it is in use."""

    def __init__(self, loop: _Loop, target: Any, owner: _Facade | None = None) -> None:
        self._loop = loop
        self._target = target
        self._owner = owner


class _Forward(Generic[P, R]):
    """A method of a ``_Facade`` that forwards to the same method of its target, with that
    method's parameters (``inspect.signature``, type checkers) and docstring."""

    def __init__(self, method: Callable[Concatenate[Any, P], Any]) -> None:
        self._method = method
        self.__doc__ = method.__doc__
        sig = inspect.signature(method)
        self._signature = sig.replace(parameters=list(sig.parameters.values())[1:])

    def _run(self, obj: _Facade, fn: Callable[[], Any]) -> R:
        raise NotImplementedError

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(self, obj: _Facade, owner: type[Any]) -> Callable[P, R]: ...
    def __get__(self, obj: _Facade | None, owner: type[Any]) -> Self | Callable[P, R]:
        if obj is None:
            return self
        method = self._method

        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            # ``obj`` (not only its loop and target) is held for the call: ``Apimart().balance()``
            return self._run(obj, functools.partial(method, obj._target, *args, **kwargs))

        functools.update_wrapper(call, method)
        call.__signature__ = self._signature  # type: ignore[attr-defined]
        return call


class _blocking(_Forward[P, T]):
    """``name = _blocking(AsyncClass.method)``: runs the coroutine method in the facade's
    loop and waits for its result."""

    def __init__(self, method: Callable[Concatenate[Any, P], Awaitable[T]]) -> None:
        super().__init__(method)

    def _run(self, obj: _Facade, fn: Callable[[], Any]) -> T:
        return obj._loop.call(fn)  # type: ignore[no-any-return]


class _in_loop(_Forward[P, T]):
    """``name = _in_loop(AsyncClass.method)`` for a plain method: it runs in the loop's
    thread, which owns the state it reads."""

    def __init__(self, method: Callable[Concatenate[Any, P], T]) -> None:
        super().__init__(method)

    def _run(self, obj: _Facade, fn: Callable[[], Any]) -> T:
        return obj._loop.call_sync(fn)  # type: ignore[no-any-return]


class _reader(_in_loop[P, T]):
    """``_in_loop`` for reading state, which also works once the client is closed (then
    nothing runs in the loop any more, and the state is read here)."""

    def _run(self, obj: _Facade, fn: Callable[[], Any]) -> T:
        if obj._loop.closed:
            return fn()  # type: ignore[no-any-return]
        return obj._loop.call_sync(fn)  # type: ignore[no-any-return]


class _in_loop_as(_Forward[P, W], Generic[P, T, W]):
    """``_in_loop`` whose result is wrapped in a facade: ``wrap(loop, result, owner)``."""

    def __init__(
        self,
        method: Callable[Concatenate[Any, P], T],
        wrap: Callable[[_Loop, T, _Facade], W],
    ) -> None:
        super().__init__(method)
        self._wrap = wrap

    def _run(self, obj: _Facade, fn: Callable[[], Any]) -> W:
        return self._wrap(obj._loop, obj._loop.call_sync(fn), obj)


class SyncVideos(_Facade):
    """``client.videos``: submit generations and wait for them (blocking)."""

    submit: Final = _blocking(Videos.submit)
    generate: Final = _blocking(Videos.generate)


class SyncTasks(_Facade):
    """``client.tasks``: status of submitted tasks (blocking)."""

    get: Final = _blocking(Tasks.get)
    get_many: Final = _blocking(Tasks.get_many)
    wait: Final = _blocking(Tasks.wait)
    unfinished: Final = _blocking(Tasks.unfinished)
    recover: Final = _blocking(Tasks.recover)
    notify: Final = _blocking(Tasks.notify)
    webhook_counts: Final = _reader(Tasks.webhook_counts)


class SyncUploads(_Facade):
    """``client.uploads``: images to use as reference media (blocking)."""

    image: Final = _blocking(Uploads.image)
    create: Final = _blocking(Uploads.create)


class SyncBatch(_Facade):
    """A batch, iterated synchronously; outcomes in completion order::

        for outcome in client.batch(jobs):          # enters and leaves the batch itself
            ...
        with client.batch(jobs) as results:         # or keep it, for stats() afterwards
            for outcome in results:
                ...
            print(results.stats())

    Leaving early (``break``, an exception, Ctrl-C) leaves the batch as ``async with`` would:
    nothing more is submitted; tasks already submitted keep running at the service
    (``pending_task_ids()``), and a journal resumes them on the next run. With
    ``sigint_grace`` (and on the main thread), Ctrl-C inside ``with`` or the loop works as for
    ``AsyncApimart``: the first stops submitting and follows running tasks for that many
    seconds, the second ends the iteration; ``interrupted`` counts them.
    """

    _target: Batch

    def __init__(self, loop: _Loop, batch: Batch, owner: _Facade | None = None) -> None:
        super().__init__(loop, batch, owner)
        self._cm: contextlib.AbstractContextManager[Batch] | None = None
        self._entered = False
        self._saved_sigint: Any = None
        self._sigint_installed = False

    def __enter__(self) -> Self:
        if self._entered:
            raise RuntimeError("a Batch can be entered only once")
        if self._loop.closed:
            raise ClientClosedError("the client is closed")
        self._entered = True
        # __aenter__ and __aexit__ run in one task of the loop (the batch's task group
        # lives there); this thread waits for each.
        cm = self._loop.portal.wrap_async_context_manager(self._target)
        self._target._forward_sigint()  # this thread handles Ctrl-C, not the loop's
        # The handler goes in before the batch starts: once started, its submitters run in
        # the loop's thread while this one may not be scheduled yet, and a Ctrl-C meanwhile
        # would hit Python's default handler (a KeyboardInterrupt, the batch left entered).
        self._install_sigint()
        try:
            cm.__enter__()
        except BaseException:
            self._remove_sigint()
            raise
        self._cm = cm
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove_sigint()
        cm, self._cm = self._cm, None
        # After close() the loop is gone; stopping it cancelled the batch, which left then.
        if cm is not None and not self._loop.closed:
            try:
                cm.__exit__(exc_type, exc, tb)
            except (RuntimeError, concurrent.futures.CancelledError):
                # anyio: "This portal is not running", or the exit itself cancelled
                if not self._loop.stopped_by_close:
                    raise
                # close() (another thread) stopped the loop just now, cancelling the batch
                if exc_type is None:
                    raise ClientClosedError("the client was closed during the batch") from None

    # With sigint_grace, Ctrl-C works as with AsyncApimart: the first stops submitting and
    # follows running tasks for the grace period, the second ends the iteration. The batch
    # cannot install that handler itself: its loop is not on the main thread.

    def _install_sigint(self) -> None:
        # the same rule as AsyncApimart's batches (_interrupt.py): main thread only, and only
        # over Python's own handler; otherwise a warning and nothing installed
        if self._target.sigint_grace is None:
            return
        reason = sigint_is_ours_to_take()
        if reason is not None:
            refuse(reason)
            return
        loop, target = self._loop, self._target

        def on_sigint(signum: int, frame: object) -> None:
            loop.portal.start_task_soon(target._on_sigint)

        # a function, not a bound method: signal.getsignal() makes the repr of a handler it
        # does not know, and a batch's repr asks the loop (from a call: a recursion)
        self._saved_sigint = signal.signal(signal.SIGINT, on_sigint)
        self._sigint_installed = True

    def _remove_sigint(self) -> None:
        if self._sigint_installed:
            self._sigint_installed = False
            saved = self._saved_sigint
            signal.signal(signal.SIGINT, signal.default_int_handler if saved is None else saved)

    def __iter__(self) -> Iterator[Success | Failure]:
        if self._cm is not None:
            yield from self._outcomes()
            return
        with self:
            yield from self._outcomes()

    def _outcomes(self) -> Iterator[Success | Failure]:
        while self._cm is not None:
            item = self._loop.call(self._next)
            if item is None:
                return
            yield item

    async def _next(self) -> Success | Failure | None:
        try:
            return await self._target.__anext__()
        except StopAsyncIteration:
            return None

    stats: Final = _reader(Batch.stats)
    pending_task_ids: Final = _reader(Batch.pending_task_ids)
    unread: Final = _reader(Batch.unread)
    unconfirmed_submissions: Final = _reader(Batch.unconfirmed_submissions)
    stop: Final = _blocking(Batch.stop)

    @property
    def stopped(self) -> str | None:
        """Why the batch stopped submitting, if it did."""
        return self._target.stopped

    @property
    def options(self) -> BatchOptions:
        """What this batch was asked to do (frozen: read from any thread)."""
        return self._target.options

    @property
    def interrupted(self) -> int:
        """How many times Ctrl-C reached this batch (with ``sigint_grace``)."""
        return self._target.interrupted

    @property
    def uploads(self) -> UploadStats:
        """What this batch did with local reference files: uploaded, reused, failed."""
        return self._target.uploads

    def __repr__(self) -> str:
        if self._loop.closed:
            return repr(self._target)
        return self._loop.call_sync(self._target.__repr__)


class Apimart(_Facade):
    """Synchronous client for the APIMart video API, for scripts and notebooks::

        with Apimart() as client:                   # key from APIMART_API_KEY
            task = client.videos.generate(VideoRequest("sora-2-preview", "a cat"))
            for outcome in client.batch(jobs, concurrency=16):
                ...

    The same engine as ``AsyncApimart`` (same arguments, same behaviour), running in an event
    loop on a thread of its own, so it works where a loop already runs (Jupyter). The client
    is open once made; ``close()`` (or leaving ``with``) closes it and stops that thread.
    ``on_event`` callbacks of a batch run on that thread.
    """

    _target: AsyncApimart

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        timeout: Timeout | float | None = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        language: str = "en",
        status_concurrency: int = 8,
        max_status_concurrency: int | None = None,
        poll: PollPolicy | None = None,
        requests_per_second: float | None = None,
        download_concurrency: int = 4,
        ssl: _ssl.SSLContext | None = None,
        proxy: str | None = None,
        trust_env: bool = True,
        wait_unreachable: float | None = DEFAULT_WAIT_UNREACHABLE,
        journal: str | os.PathLike[str] | SqliteJournal | PostgresJournal | None = None,
    ) -> None:
        stack = contextlib.ExitStack()
        try:
            loop = _Loop(stack.enter_context(start_blocking_portal()))
        except RuntimeError as exc:
            if not refused(exc):
                raise
            raise ApimartError(
                f"cannot start the client's event loop: the system refused a new thread ({exc})"
            ) from None
        try:
            # Made and opened in the loop that runs it: its events belong to that loop.
            client = loop.call(
                functools.partial(
                    _open_client,
                    api_key,
                    base_url=base_url,
                    timeout=timeout,
                    max_retries=max_retries,
                    language=language,
                    status_concurrency=status_concurrency,
                    max_status_concurrency=max_status_concurrency,
                    poll=poll,
                    requests_per_second=requests_per_second,
                    download_concurrency=download_concurrency,
                    ssl=ssl,
                    proxy=proxy,
                    trust_env=trust_env,
                    wait_unreachable=wait_unreachable,
                    journal=journal,
                )
            )
        except BaseException:
            loop.closed = True
            stack.close()
            raise
        super().__init__(loop, client)
        # Closed by close(), or when the object is collected, or at interpreter exit (while
        # the loop's thread still runs; later it could not, and the exit would hang).
        self._finalizer = weakref.finalize(self, _close, loop, client, stack)
        self.videos: SyncVideos = SyncVideos(loop, client.videos, self)
        """Submit and generate videos (``AsyncApimart.videos``, blocking)."""
        self.tasks: SyncTasks = SyncTasks(loop, client.tasks, self)
        """Read, wait for and watch tasks (``AsyncApimart.tasks``, blocking)."""
        self.uploads: SyncUploads = SyncUploads(loop, client.uploads, self)
        """Upload reference images (``AsyncApimart.uploads``, blocking)."""

    def close(self) -> None:
        """Close the client (waits and batches still running end with ``ClientClosedError``),
        then stop its event loop thread. Closing twice is harmless; a ``close()`` from another
        thread while one runs returns when the client is closed."""
        self._finalizer()  # runs once; a second call returns at once
        if threading.get_ident() != self._loop.thread_id:  # in the loop it would wait for ever
            self._loop.ended.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has run (the client and its loop thread are gone)."""
        return self._loop.closed

    @property
    def base_url(self) -> str:
        """The API's base URL."""
        return self._target.base_url

    def __repr__(self) -> str:
        return f"<Apimart {self.base_url} [{'closed' if self.closed else 'open'}]>"

    batch: Final = _in_loop_as(AsyncApimart.batch, SyncBatch)
    balance: Final = _blocking(AsyncApimart.balance)
    download: Final = _blocking(AsyncApimart.download)
    request_counts: Final = _reader(AsyncApimart.request_counts)


def _close(loop: _Loop, client: AsyncApimart, stack: contextlib.ExitStack) -> None:
    if loop.closed:
        return
    if threading.get_ident() == loop.thread_id:
        # close() in a callback the loop runs (on_event), or the client collected there: the
        # loop cannot wait for itself, nor its thread join itself. A thread of its own closes
        # it once the callback returns (it raised RuntimeError, and the client stayed open).
        threading.Thread(
            target=_close, args=(loop, client, stack), name="apimart-async close"
        ).start()
        return
    loop.closing = True
    try:
        loop.call(client.aclose)
        # Whatever still runs there (a batch left open) is cancelled, so it leaves cleanly.
        loop.portal.call(loop.portal.stop, True)
    finally:
        loop.closed = True
        try:
            stack.close()
        finally:
            loop.ended.set()


async def _open_client(api_key: str | None, **options: Any) -> AsyncApimart:
    client = AsyncApimart(api_key, **options)
    await client.open()
    return client
