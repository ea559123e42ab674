"""The pytest plugin asks first: small test projects, each run by a pytest of its own.

Nothing is loaded unless a project opts in (``pytest_plugins = ["apimart_async.testing"]`` or
``-p apimart_async.testing``); once it does, the fixtures work under anyio's plugin and under
pytest-asyncio in strict and auto mode, and anyio's tests stay on asyncio.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TEST_BODY = """
import apimart_async as am
from apimart_async.emulator import Emulator, Fault


async def test_generate(apimart_client: am.AsyncApimart, apimart_emulator: Emulator) -> None:
    apimart_emulator.faults.inject("submit", Fault.lost_reply())
    task = await apimart_client.videos.generate(am.VideoRequest("sora-2-preview", "a cat"))
    assert task.ok
    assert apimart_emulator.tasks_created == 1


async def test_fresh_emulator_each_test(apimart_emulator: Emulator) -> None:
    assert apimart_emulator.tasks_created == 0
"""

ANYIO_TESTS = "import pytest\n\npytestmark = pytest.mark.anyio\n" + TEST_BODY
ASYNCIO_TESTS = "import pytest\n\npytestmark = pytest.mark.asyncio\n" + TEST_BODY
AUTO_TESTS = TEST_BODY  # pytest-asyncio's auto mode: no marker at all
OPT_IN = 'pytest_plugins = ["apimart_async.testing"]\n'

# pytest-asyncio (in the test extra) warns at start-up when this is not set
LOOP_SCOPE = "asyncio_default_fixture_loop_scope = function\n"


def run_project(
    root: Path, files: dict[str, str], *args: str, ini: str = LOOP_SCOPE
) -> subprocess.CompletedProcess[str]:
    (root / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\n" + ini)
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def passed(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The ids of the tests that passed, as pytest -v prints them."""
    return sorted(
        line.split(" ", 1)[0].split("::", 1)[1]
        for line in proc.stdout.splitlines()
        if " PASSED" in line and "::" in line
    )


EXPECTED = ["test_fresh_emulator_each_test", "test_generate"]


def test_no_entry_point_loads_the_plugin() -> None:
    for dist in importlib.metadata.distributions():
        if dist.metadata["Name"] == "apimart-async":
            assert [ep for ep in dist.entry_points if ep.group == "pytest11"] == []
            return
    pytest.fail("apimart-async is not installed")


def test_not_opted_in_no_fixture_and_nothing_imported(tmp_path: Path) -> None:
    probe = """
    def test_nothing_loaded(pytestconfig) -> None:
        plugins = pytestconfig.pluginmanager.list_name_plugin()
        assert [n for n, p in plugins if "apimart" in f"{n} {getattr(p, '__name__', '')}"] == []
    """
    proc = run_project(tmp_path, {"test_probe.py": probe, "test_app.py": ANYIO_TESTS})
    assert "test_probe.py::test_nothing_loaded PASSED" in proc.stdout, proc.stdout + proc.stderr
    assert "fixture 'apimart_client' not found" in proc.stdout


def test_importing_the_plugin_imports_no_sdk(tmp_path: Path) -> None:
    # Issue 16: a project that opts in pays for this import before its first test; the SDK,
    # the emulator and aiohttp are imported by the fixtures, when a test uses one.
    probe = """
    import sys

    import apimart_async.testing


    def test_probe() -> None:
        loaded = [m for m in sys.modules if m.startswith(("aiohttp", "apimart_async."))]
        assert loaded == ["apimart_async._version", "apimart_async.testing"]
    """
    # the probe's own module is imported before any fixture of the plugin runs
    proc = run_project(tmp_path, {"conftest.py": OPT_IN, "test_probe.py": probe})
    assert "test_probe.py::test_probe PASSED" in proc.stdout, proc.stdout + proc.stderr
    code = (
        "import sys, apimart_async.testing as t\n"
        "assert 'aiohttp' not in sys.modules and 'apimart_async._client' not in sys.modules\n"
        "assert t.FAST_POLL is t.FAST_POLL and t.FAST_POLL.first_check == 0.001\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("how", ["pytest_plugins", "-p"])
def test_anyio_plugin_on_asyncio_only(tmp_path: Path, how: str) -> None:
    files = {"test_app.py": ANYIO_TESTS}
    args: list[str] = []
    if how == "pytest_plugins":
        files["conftest.py"] = OPT_IN
    else:
        args = ["-p", "apimart_async.testing"]
    proc = run_project(tmp_path, files, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # one run per test, on asyncio: no [asyncio]/[trio] variants even where trio is installed
    assert passed(proc) == EXPECTED, proc.stdout


def test_anyio_backend_can_be_chosen_by_the_project(tmp_path: Path) -> None:
    conftest = OPT_IN + textwrap.dedent(
        """
        import pytest

        @pytest.fixture(params=["asyncio"])
        def anyio_backend(request):
            return request.param
        """
    )
    proc = run_project(tmp_path, {"conftest.py": conftest, "test_app.py": ANYIO_TESTS})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert passed(proc) == [f"{name}[asyncio]" for name in EXPECTED], proc.stdout


def test_pytest_asyncio_strict_mode(tmp_path: Path) -> None:
    proc = run_project(
        tmp_path,
        {"conftest.py": OPT_IN, "test_app.py": ASYNCIO_TESTS},
        ini="asyncio_mode = strict\n" + LOOP_SCOPE,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert passed(proc) == EXPECTED, proc.stdout


def test_pytest_asyncio_default_mode_is_strict_and_works(tmp_path: Path) -> None:
    proc = run_project(
        tmp_path,
        {"conftest.py": OPT_IN, "test_app.py": ASYNCIO_TESTS},
        "-W",
        "ignore::pytest.PytestDeprecationWarning",  # its warning that the loop scope is unset
        ini="",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert passed(proc) == EXPECTED, proc.stdout


def test_pytest_asyncio_auto_mode(tmp_path: Path) -> None:
    proc = run_project(
        tmp_path,
        {"conftest.py": OPT_IN, "test_app.py": AUTO_TESTS},
        "-p",
        "no:anyio",  # auto mode claims every async test; anyio's plugin would claim them too
        ini="asyncio_mode = auto\n" + LOOP_SCOPE,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert passed(proc) == EXPECTED, proc.stdout


def test_anyio_and_pytest_asyncio_tests_side_by_side(tmp_path: Path) -> None:
    proc = run_project(
        tmp_path,
        {"conftest.py": OPT_IN, "test_a.py": ANYIO_TESTS, "test_b.py": ASYNCIO_TESTS},
        ini="asyncio_mode = strict\n" + LOOP_SCOPE,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert passed(proc) == sorted(EXPECTED * 2), proc.stdout
