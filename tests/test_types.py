"""Types for every editor: pyright strict on the package, ``--verifytypes`` at 100 %, and every
Python block of README.md (and a file of typing cases) checked by mypy and pyright in strict mode.

The checkers run in subprocesses; both are in the ``test`` extra (pyright's PyPI package
fetches its node program on first use). A missing checker fails these tests, never skips them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest

pytestmark = pytest.mark.static

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Lines marked "# error" must be errors for both checkers; "# error: pyright" for pyright only.
CASES = """\
from __future__ import annotations

import apimart_async as am
from apimart_async.emulator import Emulator
from apimart_async.testing import ClientOptions, emulated_api


def requests() -> None:
    am.VideoRequest("viduq3", "x", image_urls=["https://e.com/a.png"], video_urls=("b",))
    am.VideoRequest("viduq3", "x", image_urls=42)  # error
    am.VideoRequest("viduq3", "x", video_urls=[1, 2])  # error
    am.VideoRequest("viduq3", "x", extra=3)  # error
    am.VideoRequest("viduq3", "x", duraton=8)  # error


def testing() -> None:
    emulated_api(mode="manual", task_duration=(1.0, 2.0), failure_rate=0.1)
    emulated_api(mode="manaul")  # error
    emulated_api(client_options={"max_retries": 0})
    emulated_api(client_options={"max_retry": 0})  # error
    options: ClientOptions = {"timeout": 5.0}
    emulated_api(client_options=options)


async def outcomes(client: am.AsyncApimart, jobs: list[am.VideoRequest]) -> None:
    async with client.batch(jobs) as results:
        async for outcome in results:
            if isinstance(outcome, am.Success):
                urls: list[str] = outcome.task.video_urls
                print(urls)
            else:
                error: am.ApimartError = outcome.error
                print(error)
            if outcome.ok:  # mypy narrows on ok; pyright only on isinstance or match
                print(outcome.task.video_urls)  # error: pyright
            match outcome:
                case am.Success(task=task):
                    print(task.video_urls)
                case am.Failure(error=error):
                    print(error)
            base: am.Outcome = outcome
            print(base)
        budget: am.Budget | None = results.budget
        print(budget)


def sync_outcomes(client: am.Apimart, jobs: list[am.VideoRequest]) -> None:
    for outcome in client.batch(jobs):
        if isinstance(outcome, am.Success):
            urls: list[str] = outcome.task.video_urls
            print(urls)
        else:
            error: am.ApimartError = outcome.error
            print(error)
    with client.batch(jobs) as results:
        for outcome in results:
            match outcome:
                case am.Success(task=task):
                    print(task.video_urls)
                case am.Failure(error=error):
                    print(error)


def resources(client: am.AsyncApimart, emulator: Emulator) -> None:
    videos: am.Videos = client.videos
    tasks: am.Tasks = client.tasks
    uploads: am.Uploads = client.uploads
    throttle: am.Throttle = client.throttle
    print(videos, tasks, uploads, throttle, emulator.base_url)
"""


def _tool_env() -> dict[str, str]:
    # pyright finds the packages of the python first on PATH: this interpreter's
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _run(tool: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", tool, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_tool_env(),
        check=False,
    )
    if f"No module named {tool}" in proc.stderr:
        pytest.fail(f"{tool} is not installed (it is in the test extra: pip install -e '.[test]')")
    return proc


def _pyright(args: list[str], cwd: Path) -> dict[str, Any]:
    proc = _run("pyright", [*args, "--outputjson"], cwd)
    try:
        result: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"pyright did not run:\n{proc.stdout}\n{proc.stderr}")
    return result


def readme_blocks() -> list[str]:
    """Every ```python block of README.md."""
    text = README.read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@attrs.frozen
class Checked:
    """Lines with an error, by checker and file; and each checker's output."""

    errors: dict[str, dict[str, set[int]]]
    output: dict[str, str]


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> Checked:
    """Both checkers, strict, over the README blocks and the typing cases."""
    work = tmp_path_factory.mktemp("typecheck")
    files = {f"readme_{i}.py": block for i, block in enumerate(readme_blocks(), start=1)}
    files["cases.py"] = CASES
    for name, text in files.items():
        (work / name).write_text(text, encoding="utf-8")
    (work / "pyrightconfig.json").write_text(
        json.dumps({"typeCheckingMode": "strict", "pythonVersion": "3.11"}), encoding="utf-8"
    )
    found: dict[str, dict[str, set[int]]] = {
        "mypy": {n: set() for n in files},
        "pyright": {n: set() for n in files},
    }
    mypy = _run("mypy", ["--strict", "--no-incremental", "--python-version", "3.11", *files], work)
    for line in mypy.stdout.splitlines():
        m = re.match(r"(\w+\.py):(\d+): error:", line)
        if m:
            found["mypy"][m[1]].add(int(m[2]))
    if mypy.returncode not in (0, 1) or (mypy.returncode == 1 and not any(found["mypy"].values())):
        pytest.fail(f"mypy did not run:\n{mypy.stdout}\n{mypy.stderr}")
    result = _pyright(list(files), work)
    for diag in result["generalDiagnostics"]:
        if diag["severity"] == "error":
            found["pyright"][Path(diag["file"]).name].add(diag["range"]["start"]["line"] + 1)
    return Checked(found, {"mypy": mypy.stdout, "pyright": json.dumps(result, indent=1)})


def test_readme_has_python_blocks() -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 5
    assert any("client.batch(" in b for b in blocks)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("checker", ["mypy", "pyright"])
def test_readme_code_blocks_pass_strict_mode(checked: Checked, checker: str) -> None:
    errors = {n: lines for n, lines in checked.errors[checker].items() if n.startswith("readme")}
    assert not any(errors.values()), f"{errors}\n{checked.output[checker]}"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("checker", ["mypy", "pyright"])
def test_typing_cases(checked: Checked, checker: str) -> None:
    expected = {
        n
        for n, line in enumerate(CASES.splitlines(), start=1)
        if line.endswith(("# error", f"# error: {checker}"))
    }
    assert checked.errors[checker]["cases.py"] == expected, checked.output[checker]


@pytest.mark.timeout(900)
def test_pyright_strict_on_the_package(tmp_path: Path) -> None:
    # The package as imported (the installed wheel in CI, the source tree in a dev install),
    # with the settings of [tool.pyright] in pyproject.toml: strict, two rules off (reasons
    # there).
    import apimart_async

    settings = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    config = {k: v for k, v in settings["tool"]["pyright"].items() if k != "include"}
    assert config["typeCheckingMode"] == "strict"
    (tmp_path / "pyrightconfig.json").write_text(json.dumps(config), encoding="utf-8")
    package = Path(apimart_async.__file__).parent
    result = _pyright(["-p", str(tmp_path / "pyrightconfig.json"), str(package)], tmp_path)
    errors = [d for d in result["generalDiagnostics"] if d["severity"] == "error"]
    assert result["summary"]["filesAnalyzed"] > 20
    assert errors == []


@pytest.mark.timeout(900)
def test_verifytypes_is_complete(tmp_path: Path) -> None:
    result = _pyright(["--verifytypes", "apimart_async", "--ignoreexternal"], tmp_path)
    completeness = result["typeCompleteness"]
    unknown = [
        s["name"]
        for s in completeness["symbols"]
        if s["isExported"] and s["diagnostics"] != [] and s["category"] != "module"
    ]
    assert completeness["completenessScore"] == 1.0, unknown
    assert completeness["exportedSymbolCounts"]["withUnknownType"] == 0
    assert completeness["exportedSymbolCounts"]["withAmbiguousType"] == 0


def test_emulated_api_takes_the_emulator_options_by_name() -> None:
    import inspect
    import os
    import ssl

    import apimart_async.testing
    from apimart_async import PollPolicy
    from apimart_async.emulator import Emulator, RealisticProfile
    from apimart_async.testing import emulated_api

    # The plugin imports the names of its annotations for type checkers only (its import
    # stays cheap, issue 16): resolve them here.
    names = {
        **vars(apimart_async.testing),
        "os": os,
        "ssl": ssl,
        "PollPolicy": PollPolicy,
        "RealisticProfile": RealisticProfile,
    }
    ours = inspect.signature(emulated_api, eval_str=True, globals=names).parameters
    theirs = inspect.signature(Emulator, eval_str=True).parameters
    own = {"poll", "client_options"}
    # every emulator option that a test may want, with the emulator's default but one
    assert set(ours) - own <= set(theirs)
    assert set(theirs) - set(ours) == {"api_key", "host", "port"}
    for name in set(ours) - own:
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert ours[name].annotation == theirs[name].annotation, name
        if name == "task_duration":
            assert ours[name].default == 0.0  # tasks finish at once in tests
        else:
            assert ours[name].default == theirs[name].default, name
