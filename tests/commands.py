"""Run a ``qgdist`` command as a user does (a subprocess) and read back what it printed or wrote.

Used by the tests that keep every command and every bench from rotting (issue 20): each runs the real command at a
tiny size and parses its table or JSON (expected columns, finite numbers).
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


def qgdist(*args: object, timeout: float = 600, expect: int = 0,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m qgdist ARGS...`` in a fresh process (no inherited Ray address; ``env`` added to the
    environment); it must exit ``expect``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (env or {})
    done = subprocess.run([sys.executable, "-m", "qgdist", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert done.returncode == expect, (f"qgdist {' '.join(map(str, args))} exited {done.returncode}:\n"
                                  f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done


class Terminal:
    """A running command's terminal: its merged stdout and stderr (not a TTY), read in a thread as it comes."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.raw = bytearray()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while chunk := self.proc.stdout.read1(65536):
            self.raw += chunk

    @property
    def text(self) -> str:
        return bytes(self.raw).decode(errors="replace")

    def lines(self) -> list[str]:
        """The non-blank lines so far; tqdm's carriage returns split lines too."""
        return [line.strip() for line in re.split(r"[\r\n]+", self.text) if line.strip()]

    def wait_for(self, done: Callable[[Terminal], bool], timeout: float) -> None:
        """Block until ``done(self)``; the command must still be running meanwhile (its output's tail says why not)."""
        deadline = time.monotonic() + timeout
        while not done(self):
            assert self.proc.poll() is None, self.text[-4000:]
            assert time.monotonic() < deadline, f"not seen within {timeout} s:\n{self.text[-4000:]}"
            time.sleep(0.2)

    def finish(self, timeout: float) -> int:
        """The exit code, once the command ends; killed (its whole session) if it outlasts ``timeout``."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._thread.join(timeout=10)
        return rc

    def kill(self) -> None:
        """SIGKILL the command and every process of its session, unless it has ended."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


def leaves(doc: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, value) of every scalar in a JSON document (``a/b/0``); ``null`` is a leaf (NaN is written as null)."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from leaves(v, f"{path}/{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from leaves(v, f"{path}/{i}")
    else:
        yield path, doc


def assert_finite(doc: Any, what: str = "") -> int:
    """Every number in ``doc`` is finite and nothing is ``null`` (the project writes NaN and inf as null);
    returns how many numbers there were."""
    bad = [(p, v) for p, v in leaves(doc) if v is None or (isinstance(v, float) and not math.isfinite(v))]
    assert not bad, f"{what}: not finite: {bad[:10]}"
    return sum(isinstance(v, (int, float)) and not isinstance(v, bool) for _, v in leaves(doc))


def number(cell: str) -> float:
    """A printed figure (``1,234``, ``0.45x``, ``+3.0%``) as a float that must be finite."""
    text = cell.strip().replace(",", "").rstrip("x%")
    value = float(text)
    assert math.isfinite(value), f"{cell!r} is not a finite number"
    return value


def markdown_rows(text: str, header: list[str]) -> list[dict[str, str]]:
    """The rows of the markdown table in ``text`` whose header row is ``header`` (cells stripped), as dicts."""
    lines = [ln.strip() for ln in text.splitlines()]
    want = "| " + " | ".join(header) + " |"
    assert want in lines, f"no table with header {want!r} in:\n{text[-3000:]}"
    rows = []
    for ln in lines[lines.index(want) + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == len(header), f"{len(cells)} cells, {len(header)} columns: {ln}"
        rows.append(dict(zip(header, cells)))
    return rows
