from __future__ import annotations

import contextlib
import os
import random
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

import apimart_async as am
from apimart_async.emulator import Emulator

# A suite started in the background by a non-interactive shell (`cmd &` in a script) inherits
# SIGINT ignored, and so would every process it starts: the Ctrl-C tests would send SIGINT to
# workers that cannot receive it. Python's own handler here gives them what a terminal gives.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_retry_waits() -> Iterator[None]:
    am.set_testing(True)
    yield
    am.set_testing(False)


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APIMART_API_KEY", raising=False)
    monkeypatch.delenv("APIMART_BASE_URL", raising=False)


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    """An emulator whose clock moves only when a test advances it; tasks take 10 s."""
    async with Emulator(frozen_clock=True, task_duration=10.0, estimate_error=0.0) as emulator:
        yield emulator


@pytest.fixture
async def manual_emu() -> AsyncIterator[Emulator]:
    """An emulator where tasks move only when the test says so."""
    async with Emulator(mode="manual", frozen_clock=True) as emulator:
        yield emulator


#: Polls within milliseconds, so tests driven by the emulator's controls finish at once.
FAST_POLL = am.PollPolicy(
    first_check=0.001, min_interval=0.001, max_interval=0.005, jitter=0.0, not_found_grace=0.005
)


@pytest.fixture
async def client(emu: Emulator) -> AsyncIterator[am.AsyncApimart]:
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as c:
        yield c


@pytest.fixture
async def manual_client(manual_emu: Emulator) -> AsyncIterator[am.AsyncApimart]:
    async with am.AsyncApimart(
        manual_emu.api_key, base_url=manual_emu.base_url, poll=FAST_POLL
    ) as c:
        yield c


# -- the reliability suite: short by default, full size with --long ---------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run tests/reliability at full size (3,000-job chaos soak, 20 SIGKILLs, "
        "10,000 examples per fuzz test)",
    )


#: The seed of the randomized exploration under ``--long`` (None: the deterministic default).
_LONG_SEED: int | None = None


@pytest.hookimpl(tryfirst=True)  # before hypothesis's own pytest_configure reads the seed
def pytest_configure(config: pytest.Config) -> None:
    global _LONG_SEED
    from hypothesis import HealthCheck, Phase, settings

    common: dict[str, Any] = {
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow],
        # no "explain" phase: its line tracing makes each example many times slower
        "phases": [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        # nothing carried over from earlier runs on this machine: a run's result depends on the
        # code alone (a failure found under --long is replayed by its seed, printed below)
        "database": None,
    }
    # Every ordinary run (CI included) draws the same examples: derandomized, so a test that
    # passes once passes on every run of the same code.
    settings.register_profile("apimart-short", max_examples=150, derandomize=True, **common)
    # --long explores: new examples on every run, from a seed it prints so a failure replays
    # with --hypothesis-seed.
    settings.register_profile("apimart-long", max_examples=10_000, **common)
    if config.getoption("--long"):
        settings.load_profile("apimart-long")
        seed = config.getoption("--hypothesis-seed", None)
        if seed is None:
            seed = str(random.SystemRandom().randrange(2**32))
            config.option.hypothesis_seed = seed
        _LONG_SEED = int(seed)
    else:
        settings.load_profile("apimart-short")


def _replay_line() -> str:
    return (
        f"hypothesis seed {_LONG_SEED} (replay: python -m pytest tests/reliability --long "
        f"--hypothesis-seed={_LONG_SEED})"
    )


def pytest_report_header(config: pytest.Config) -> str | None:
    return _replay_line() if _LONG_SEED is not None else None


# -- static checks: once per CI run -----------------------------------------------------------

#: Set by CI on every Python but one: the ``static`` tests (type checkers over the package, the
#: API reference build, the benchmark smoke run) check the source, which is the same on every
#: Python, and take about two minutes; CI runs them once, on Python 3.11 (see .ci/run).
STATIC_ELSEWHERE = "APIMART_TESTS_STATIC_ELSEWHERE"
#: Set by CI on every suite: the ``bench`` test (the benchmark smoke run, about 90 s) runs once,
#: in CI's dev lane, where matplotlib is installed for its plot.
BENCH_ELSEWHERE = "APIMART_TESTS_BENCH_ELSEWHERE"
_deselected: dict[str, int] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for variable, marker in ((STATIC_ELSEWHERE, "static"), (BENCH_ELSEWHERE, "bench")):
        if os.environ.get(variable) != "1":
            continue
        chosen = [item for item in items if item.get_closest_marker(marker) is not None]
        if chosen:
            config.hook.pytest_deselected(items=chosen)
            items[:] = [item for item in items if item.get_closest_marker(marker) is None]
            _deselected[variable] = len(chosen)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _LONG_SEED is not None:
        terminalreporter.write_line(_replay_line())
    if _deselected.get(STATIC_ELSEWHERE):
        terminalreporter.write_line(
            f"{_deselected[STATIC_ELSEWHERE]} static checks deselected ({STATIC_ELSEWHERE}=1): "
            "CI runs them once, on Python 3.11"
        )
    if _deselected.get(BENCH_ELSEWHERE):
        terminalreporter.write_line(
            f"the benchmark smoke run deselected ({BENCH_ELSEWHERE}=1): "
            "CI runs it once, in its dev lane"
        )


@pytest.fixture
def long_run(request: pytest.FixtureRequest) -> bool:
    """True under ``--long``: reliability tests run at full size."""
    return bool(request.config.getoption("--long"))


@contextlib.asynccontextmanager
async def ticking(emu: Emulator, step: float = 0.001) -> AsyncIterator[None]:
    """Move a frozen emulator clock ``step`` seconds each real millisecond while the body
    runs, as a running clock would. A test that moves the clock once while a status read is
    in flight can leave the next check due just after the frozen time, for good (a read sent
    before ``complete()`` and answered after ``advance()``: seen on Python 3.12+)."""
    async with anyio.create_task_group() as tg:

        async def tick() -> None:
            while True:
                await anyio.sleep(0.001)
                emu.advance(step)

        tg.start_soon(tick)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()


# -- a real PostgreSQL server, once per test run (tests/_pg.py) --------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A PostgreSQL 18 server of this test run (``tests/_pg.py``): ``.url``, ``.stop()``,
    ``.start()`` (same data, same port). Stopped at the end of the run, whatever happens."""
    from ._pg import PgServer

    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_schema() -> str:
    """A schema of its own for one test: no test sees another's rows."""
    import secrets

    return f"t_{secrets.token_hex(6)}"
