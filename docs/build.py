"""Build the API reference (HTML, with pdoc) and fail on a broken reference.

    python docs/build.py [--out DIR]        # default: docs/_build

The reference is built from the docstrings of the public modules (``apimart_async`` and
its modules whose names have no leading underscore, except the command line: ``cli`` and
``__main__``, documented by ``--help``). The build fails (exit 1, the problems listed) when:

- a public name (in a module's ``__all__``) or a public method or attribute of a public
  class has no docstring (``missing_docstrings()``; an attribute may instead be described in
  its class's docstring, named in backticks);
- pdoc warns (an annotation it cannot resolve, a name in ``__all__`` that does not exist...);
- a docstring names an API object in backticks (a capitalised name such as ``Task`` or
  ``Tasks.watch``, or a dotted ``apimart_async.x`` path) that is not documented, so pdoc
  could not link it: a renamed or removed name, or a private one;
- a signature or annotation shows a private type (``apimart_async._x.Y``) that users cannot
  look up.
"""

from __future__ import annotations

import argparse
import builtins
import html
import importlib
import pkgutil
import re
import sys
import warnings
from pathlib import Path
from typing import Any

PACKAGE = "apimart_async"
#: Public modules left out of the reference: the command line documents itself (--help).
NOT_REFERENCE = {"apimart_async.cli", "apimart_async.emulator.__main__"}

#: Private types the reference shows on purpose, and why.
ALLOWED_PRIVATE = {
    # Emulator.state: the emulator's internals, for white-box assertions, not a stable API.
    "apimart_async.emulator._state.State",
    # TaskWatch(poller, ids), Tasks(api, poller), Batch(requests, options, api=, poller=,
    # downloader=, pacing=): built by the client only, from the engines it wires (see
    # ARCHITECTURE.md); users never construct them. Batch.options shows what the batch was
    # asked, as the keywords of AsyncApimart.batch.
    "apimart_async._poller.Poller",
    "apimart_async._api.Api",
    "apimart_async._download.Downloader",
    "apimart_async._options.BatchOptions",
    "apimart_async._pacing.Pacing",
    # Tasks(api, poller, journal): the client's journal of its submits, wired by the client
    # from AsyncApimart(journal=...); users never build one.
    "apimart_async._client_journal.ClientJournal",
    # Emulator.ca: the private CA of tls=True, an internal helper (use ca_file or
    # client_ssl_context()).
    "apimart_async.emulator._network.LocalCA",
    # Emulator.network_profile: the middleware of network="real", read for its counts.
    "apimart_async.emulator._network.NetworkProfile",
    # SyncBatch(loop, batch): built by Apimart.batch() only; users never construct one. Its
    # base class is the sync facades' shared plumbing.
    "apimart_async._sync._Loop",
    "apimart_async._sync._Facade",
    # pdoc names a base class from another module by the module that defines it; the class
    # itself is documented as apimart_async.ApimartError.
    "apimart_async._errors.ApimartError",
    # SqliteJournal.load_priors()/save_priors(): what the poll schedule learned per kind of
    # task; the batch stores and loads it, users never build one.
    "apimart_async._priors.KindPrior",
}
#: Capitalised words in backticks that are not API names.
NOT_NAMES = {
    "APIMART_API_KEY",
    "APIMART_BASE_URL",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "SSL_CERT_DIR",
    "SSL_CERT_FILE",
}

_CODE = re.compile(r"<code>(.*?)</code>", re.S)
_API_NAME = re.compile(r"(?:[A-Z]\w*|apimart_async)(?:\.\w+)*(?:\(\))?")
_PRIVATE_PATH = re.compile(r"apimart_async(?:\.\w+)*\._\w+(?:\.\w+)*")


def public_modules() -> list[str]:
    """The modules the reference documents."""
    package = importlib.import_module(PACKAGE)
    for name in package.__all__:
        # the package imports a name's module on its first use (PEP 562); pdoc reads the
        # names of the module's __dict__
        getattr(package, name)
    names = [PACKAGE]
    for info in pkgutil.walk_packages(package.__path__, PACKAGE + "."):
        parts = info.name.split(".")
        if any(p.startswith("_") for p in parts) or info.name in NOT_REFERENCE:
            continue
        names.append(info.name)
    return sorted(names)


def missing_docstrings() -> tuple[list[str], int]:
    """Public names with no docstring, and how many public names there are.

    Public: every name in a public module's ``__all__``; for a class, its members whose names
    do not start with ``_`` (methods, properties, attributes), as pdoc sees them.
    """
    import pdoc.doc

    def members(doc: Any) -> list[Any]:
        if isinstance(doc, pdoc.doc.Module):
            exported = getattr(doc.obj, "__all__", None)
            return [
                m
                for m in doc.members.values()
                if not isinstance(m, pdoc.doc.Module) and (exported is None or m.name in exported)
            ]
        if isinstance(doc, pdoc.doc.Class):
            return [m for m in doc.own_members if not m.name.startswith("_")]
        return []

    missing: list[str] = []
    total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # build() reports pdoc's warnings
        modules = [pdoc.doc.Module.from_name(name) for name in public_modules()]
    for module in modules:
        for member in members(module):
            total += 1
            if not member.docstring.strip():
                missing.append(member.fullname)
            for sub in members(member):
                total += 1
                if sub.docstring.strip():
                    continue
                described = re.search(rf"``{re.escape(sub.name)}``", member.docstring)
                if isinstance(sub, pdoc.doc.Variable) and described:
                    continue
                missing.append(sub.fullname)
    return missing, total


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def check_page(page: Path) -> list[str]:
    """The broken references of one rendered page."""
    source = page.read_text(encoding="utf-8")
    source = re.sub(r"<script\b.*?</script>", "", source, flags=re.S)
    problems: list[str] = []
    prose = re.sub(r"<pre\b.*?</pre>", "", source, flags=re.S)  # code examples are not links
    for code in _CODE.findall(prose):
        if "<a " in code:
            continue
        name = _text(code).strip()
        if not _API_NAME.fullmatch(name) or name in NOT_NAMES:
            continue
        if hasattr(builtins, name.removesuffix("()")):
            continue
        problems.append(f"{page.name}: ``{name}`` in a docstring is not a documented name")
    unlinked = re.sub(r"<a\b[^>]*>.*?</a>", " ", source, flags=re.S)
    unlinked = _text(re.sub(r"</?(?:pre|div|p|code|li|td|th|h\d)\b[^>]*>", " ", unlinked))
    for path in sorted(set(_PRIVATE_PATH.findall(unlinked)) - ALLOWED_PRIVATE):
        problems.append(f"{page.name}: the private type {path} is shown but not documented")
    return problems


def build(out: Path) -> list[str]:
    """Render the reference into ``out``; returns the problems found (empty: all good)."""
    try:
        import pdoc
        import pdoc.render
    except ImportError:
        return ["pdoc is not installed: pip install -e '.[test]'"]

    missing, _ = missing_docstrings()
    problems = [f"{name}: no docstring" for name in missing]
    pdoc.render.configure(docformat="google", show_source=False, search=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*public_modules(), output_directory=out)
    problems += [f"pdoc: {w.message}" for w in caught]
    for page in sorted(out.rglob("*.html")):
        problems += check_page(page)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "_build")
    args = parser.parse_args(argv)
    problems = build(args.out)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} broken reference(s)", file=sys.stderr)
        return 1
    print(f"API reference written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
