"""The shape ARCHITECTURE.md promises, checked on the package's source so it stays true: imports
point one way (no cycle, ``TYPE_CHECKING`` imports included), no class over 500 lines, the
batch driver under 500 lines, every exception class of the SDK in ``_errors.py``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import apimart_async as am

PACKAGE = Path(am.__file__).resolve().parent
MAX_CLASS_LINES = 500
MAX_DRIVER_LINES = 500


def _sources(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package under ``root``, by dotted name (a package by its own)."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Which module of the package imports which, from the source: every ``import`` and
    ``from ... import`` anywhere in a module (under ``if TYPE_CHECKING:`` and inside
    functions too), relative or absolute."""
    modules = _sources(root)
    top = root.name

    def known(name: str) -> str | None:  # the module itself, else the package it is in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges.update(known(a.name) for a in node.names if a.name.split(".")[0] == top)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = parts[: len(parts) - node.level + 1]
                    target = ".".join([*base, node.module] if node.module else base)
                elif (node.module or "").split(".")[0] == top:
                    target = node.module or ""
                else:
                    continue
                for alias in node.names:  # ``from . import _x`` names a module
                    full = f"{target}.{alias.name}"
                    edges.add(full if full in modules else known(target))
        graph[name] = {e for e in edges if e is not None and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles of ``graph``: each strongly connected group of more than one module."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in order:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], order[nxt])
        if low[node] == order[node]:
            group: list[str] = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return found


def class_lengths(root: Path = PACKAGE) -> dict[str, int]:
    """Lines of every class in the package (nested ones too), by ``module:Class``."""
    lengths: dict[str, int] = {}
    for name, path in _sources(root).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                lengths[f"{name}:{node.name}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_the_import_graph_has_no_circle() -> None:
    graph = import_graph()
    # the walk sees what it must: a plain import, a TYPE_CHECKING one, the emulator package
    assert "apimart_async._roster" in graph["apimart_async._batch"]
    assert "apimart_async._options" in graph["apimart_async._handle"]  # under TYPE_CHECKING
    assert "apimart_async.emulator._routes" in graph["apimart_async.emulator._server"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle_through_type_checking(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import B\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\nB = 1\n"
    )
    (pkg / "c.py").write_text("def f():\n    from pkg import a\n")
    (pkg / "d.py").write_text("from . import a\n")
    graph = import_graph(pkg)
    assert graph["pkg.d"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_no_class_is_over_500_lines() -> None:
    lengths = class_lengths()
    assert lengths["apimart_async.emulator._server:Emulator"] > 100  # the walk sees them
    over = {name: n for name, n in lengths.items() if n > MAX_CLASS_LINES}
    assert over == {}


def test_the_batch_driver_is_under_500_lines() -> None:
    lines = (PACKAGE / "_batch.py").read_text(encoding="utf-8").count("\n")
    assert 100 < lines < MAX_DRIVER_LINES


def test_every_exception_class_of_the_sdk_lives_in_errors() -> None:
    """The emulator is left out: it imports nothing of the SDK (its ``RuleError`` says why)."""
    errors = _sources()["apimart_async._errors"]
    defined = {n.id for n in ast.walk(ast.parse(errors.read_text())) if isinstance(n, ast.Name)}
    outside: list[str] = []
    for name, path in _sources().items():
        if path == errors or name.startswith("apimart_async.emulator"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {ast.unparse(b).rpartition(".")[2] for b in node.bases}
            if bases & ({"Exception", "BaseException", "Warning"} | defined):
                outside.append(f"{name}:{node.name}")
    assert outside == []


def test_moved_exceptions_are_importable_where_they_were() -> None:
    from apimart_async import _errors, cli, report

    assert cli.UsageError is _errors.UsageError
    assert report.GalleryError is _errors.GalleryError
    assert issubclass(report.GalleryError, am.ApimartError)
    assert "GalleryError" in report.__all__


# -- numbers: one check of each kind, one error type ---------------------------------------------


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: am.AsyncApimart("sk-test", max_retries=-1), "max_retries"),
        (lambda: am.AsyncApimart("sk-test", download_concurrency=0), "download_concurrency"),
        (lambda: am.AsyncApimart("sk-test", requests_per_second=0), "requests_per_second"),
        (lambda: am.Timeout(read=-1), "Timeout.read"),
        (lambda: am.PollPolicy(min_interval=0), "PollPolicy.min_interval"),
        (lambda: am.PollPolicy(hard_error_tries=0), "PollPolicy.hard_error_tries"),
        (lambda: _options(concurrency=0), "concurrency"),
        (lambda: _options(job_timeout=-1), "job_timeout"),
        (lambda: _options(requests_per_second=float("inf")), "requests_per_second"),
        (lambda: _options(max_cost=float("nan")), "max_cost"),
        (lambda: am.Budget(-1.0), "max_cost"),
    ],
)
def test_every_numeric_check_raises_option_error_naming_the_field(make: object, field: str) -> None:
    with pytest.raises(am.OptionError) as info:
        make()  # type: ignore[operator]
    assert info.value.field == field
    # whatever a caller caught for a bad setting before still catches it
    assert isinstance(info.value, am.ConfigurationError)
    assert isinstance(info.value, am.ValidationError)
    assert isinstance(info.value, ValueError)


def _options(**kwargs: object) -> object:
    from apimart_async._options import BatchOptions

    return BatchOptions(**kwargs)  # type: ignore[arg-type]


def test_architecture_md_names_every_module() -> None:
    text = (Path(__file__).resolve().parent.parent / "ARCHITECTURE.md").read_text("utf-8")
    missing = [
        path.name
        for path in sorted(PACKAGE.glob("*.py"))
        if path.name != "_version.py" and f"`{path.name}`" not in text
    ]
    missing += [
        f"emulator/{path.name}"
        for path in sorted((PACKAGE / "emulator").glob("_*.py"))
        if path.name not in ("__init__.py", "__main__.py", "_json.py") and path.name not in text
    ]
    assert missing == []


# The layers of ARCHITECTURE.md's diagram, top first; modules on one row may import each other
# (acyclically), a module may import any row below its own, never one above.
LAYERS: list[set[str]] = [
    {"cli", "_doctor", "report", "webhooks"},
    {"_sync", "testing"},
    {"_client"},
    {"_handle"},
    {"_batch"},
    {
        "_options", "_ledger", "_roster", "_interrupt", "_jobs", "_jobsfile", "_client_journal",
        "_pg_claims", "_fleet", "_batch_view", "_pg_submits",
    },
    {
        "_poller", "_download", "_journal", "_pg_journal", "_manifest", "_admission",
        "_references", "_upload_cache",
    },
    {"_api"},
    {"_transport"},
    {"_pacing", "_watchdog"},
    {
        "_poll_schedule", "_priors", "_status_window", "_prior_store", "_outcomes", "_models",
        "_results", "_converter", "_retry", "_checks", "_config", "_specs", "_errors", "_json",
        "_version", "_slices", "_hints", "_channel", "_threads",
    },
]  # fmt: skip


def test_every_import_points_down_the_layers_of_the_diagram() -> None:
    rank = {f"apimart_async.{m}": i for i, layer in enumerate(LAYERS) for m in layer}
    modules = [m for m in _sources() if m.count(".") == 1 and ".emulator" not in m]
    assert sorted(m for m in modules if m not in rank) == []
    upward = sorted(
        f"{source} -> {target}"
        for source, targets in import_graph().items()
        if source in rank
        for target in targets
        if target in rank and rank[target] < rank[source]
    )
    assert upward == []


def test_the_diagram_of_architecture_md_shows_every_module() -> None:
    text = (Path(__file__).resolve().parent.parent / "ARCHITECTURE.md").read_text("utf-8")
    diagram = text.split("```")[1]
    missing = [
        path.name
        for path in sorted(PACKAGE.glob("_*.py"))
        if path.name not in ("__init__.py", "_version.py") and path.name not in diagram
    ]
    assert missing == []
