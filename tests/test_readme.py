"""Every code block of README.md runs, as written, against the emulator (no key, no network).

Python blocks run as scripts in a fresh interpreter, in an empty directory, with
``APIMART_API_KEY`` and ``APIMART_BASE_URL`` pointing at an emulator; a block that defines
``test_`` functions runs under pytest instead, with the README's ``conftest.py`` block beside it
(which itself must make the packaged fixtures available); a ``text`` block right after a python
block is that block's exact output.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import anyio
import attrs
import pytest

import apimart_async
from apimart_async.emulator import Emulator

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@attrs.frozen
class Block:
    lang: str
    code: str
    line: int
    #: The exact output, from a ``text`` block right after this one.
    output: str | None = None


def readme_blocks(text: str | None = None) -> list[Block]:
    """The fenced code blocks of README.md in order, each python block with its output."""
    text = README.read_text(encoding="utf-8") if text is None else text
    blocks: list[Block] = []
    end = -1
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        block = Block(m.group(1), m.group(2), line)
        if (
            block.lang == "text"
            and blocks
            and blocks[-1].lang == "python"
            and not text[end : m.start()].strip()
        ):
            blocks[-1] = attrs.evolve(blocks[-1], output=block.code)
        blocks.append(block)
        end = m.end() + 1
    return blocks


PYTHON = [b for b in readme_blocks() if b.lang == "python"]
CONFTEST = [b for b in PYTHON if re.search(r"^pytest_plugins\b", b.code, re.MULTILINE)]


def _kind(block: Block) -> str:
    if block in CONFTEST:
        return "conftest"
    if re.search(r"^(async )?def test_", block.code, re.MULTILINE):
        return "pytest"
    return "script"


def test_every_block_is_tagged_and_run() -> None:
    assert len(CONFTEST) <= 1
    blocks = readme_blocks()
    outputs = {b.output for b in PYTHON if b.output is not None}
    for block in blocks:
        assert block.lang in ("python", "bash", "text"), f"README.md:{block.line}: {block.lang!r}"
        if block.lang == "text":
            assert block.code in outputs, f"README.md:{block.line}: output of no python block"
    assert len(PYTHON) >= 7


def test_the_extractor_pairs_outputs() -> None:
    text = "a\n```python\nprint(1)\n```\n\n```text\n1\n```\nb\n```bash\nls\n```\n"
    assert readme_blocks(text) == [
        Block("python", "print(1)\n", 2, "1\n"),
        Block("text", "1\n", 6),
        Block("bash", "ls\n", 10),
    ]


@pytest.mark.parametrize("block", PYTHON, ids=[f"README.md:{b.line}" for b in PYTHON])
async def test_python_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    async with Emulator(task_duration=0.1, estimate_error=0.0) as emu:
        env = {
            **os.environ,
            "APIMART_API_KEY": emu.api_key,
            "APIMART_BASE_URL": emu.base_url,
            "PYTHONPATH": str(ROOT),
        }
        kind = _kind(block)
        if kind == "conftest":
            (tmp_path / "conftest.py").write_text(block.code)
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--fixtures"]
        elif kind == "pytest":
            (tmp_path / "test_readme_block.py").write_text(block.code)
            for conftest in CONFTEST:
                (tmp_path / "conftest.py").write_text(conftest.code)
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        else:
            (tmp_path / "readme_block.py").write_text(block.code)
            cmd = [sys.executable, "readme_block.py"]
        with anyio.fail_after(120):  # a bound for a hang, not a timing assertion
            proc = await anyio.run_process(cmd, cwd=tmp_path, env=env, check=False)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, f"README.md:{block.line}\n{out}\n{err}"
    assert "TaskStatus." not in out  # statuses print as words: completed
    if kind == "script":
        assert err == ""
        if block.output is not None:
            assert out == block.output
        else:
            assert out  # every example shows something
    elif kind == "conftest":
        assert "apimart_client" in out and "apimart_emulator" in out
    else:
        assert " passed" in out and "failed" not in out and "error" not in out


#: Where the package index shows this README, a relative link or image points nowhere: every
#: one is absolute, and one into this repository names a file that exists.
_REPO = "https://github.com/apimart-async/apimart-async/blob/main/"
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


def test_links_and_images_are_absolute_for_the_package_index() -> None:
    text = _FENCE.sub("", README.read_text(encoding="utf-8"))
    targets = [m.group(1) or m.group(2) for m in _LINK.finditer(text)]
    assert targets, "no links found: the pattern is wrong"
    relative = [t for t in targets if not t.startswith(("https://", "http://", "#"))]
    assert relative == []
    # a link into the package's source: the tree here, or the installed package (CI tests the
    # wheel in a tree without the source folder)
    installed = Path(apimart_async.__file__).resolve().parent.parent
    missing = [
        t
        for t in targets
        if t.startswith(_REPO)
        and not any(
            (base / t[len(_REPO) :].split("?")[0].split("#")[0]).exists()
            for base in (ROOT, installed)
        )
    ]
    assert missing == []
