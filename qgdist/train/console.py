"""What rank 0 tells the user: messages and a progress bar, on this terminal or relayed to the Ray driver.

In the plain loop the console prints here. Under Ray Train the workers' own output is not forwarded to the
driver (it would arrive prefixed, interleaved with Ray's internal lines and, for tqdm, as carriage-return
noise); rank 0 instead puts its messages on a small Ray queue and the driver's ``Relay`` prints them and draws
one progress bar with rates. Bar updates are batched (at most one message a second), so the queue costs
nothing next to a training step.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from tqdm import tqdm

_BAR_SECONDS = 1.0


class Console:
    """Rank 0's messages; ``queue`` (a ``ray.util.queue.Queue``) relays them to the driver, else they print here."""

    def __init__(self, enabled: bool = True, queue: Any = None):
        self.enabled, self.queue = enabled, queue

    def say(self, text: str) -> None:
        """One line for the user (epoch metrics, resume notes)."""
        if not self.enabled:
            return
        if self.queue is None:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()
        else:
            self._send(("say", text))

    def bar(self, total: int, initial: int, desc: str, show: bool = True) -> Bar:
        """A progress bar in jets (``update(n)``, ``set_postfix(**kw)``, ``close()``)."""
        return Bar(self if self.enabled and show else None, total, initial, desc)

    def _send(self, message: tuple) -> None:
        try:
            self.queue.put_nowait(message)
        except Exception:  # noqa: BLE001 -- a full or gone queue must never stop training
            pass


class Bar:
    """A tqdm bar drawn here, or its updates batched and sent to the driver."""

    def __init__(self, console: Console | None, total: int, initial: int, desc: str):
        self.console, self.pending, self.postfix, self.last = console, 0, {}, time.monotonic()
        self.local = None
        if console is not None and console.queue is None:
            self.local = tqdm(total=total, initial=initial, unit="jet", unit_scale=True, desc=desc,
                              mininterval=2.0, file=sys.stdout)
        elif console is not None:
            console._send(("bar", desc, total, initial))

    def update(self, n: int) -> None:
        if self.local is not None:
            self.local.update(n)
        elif self.console is not None:
            self.pending += n
            if time.monotonic() - self.last >= _BAR_SECONDS:
                self._flush()

    def set_postfix(self, **kw: Any) -> None:
        if self.local is not None:
            self.local.set_postfix(**kw)
        else:
            self.postfix = kw

    def _flush(self) -> None:
        if self.console is not None and self.local is None:
            self.console._send(("update", self.pending, dict(self.postfix)))
            self.pending, self.last = 0, time.monotonic()

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
        elif self.console is not None:
            self._flush()
            self.console._send(("close",))


class Relay:
    """Driver side: prints what rank 0 sends, in a thread, until ``stop()``; used as a context manager."""

    def __init__(self) -> None:
        from ray.util.queue import Queue

        # Zero CPUs: the queue must never take a CPU the training workers need to be scheduled.
        self.queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qgdist-console-relay", daemon=True)
        self._bar: tqdm | None = None

    def __enter__(self) -> Relay:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._bar is not None:
            self._bar.close()
        try:
            self.queue.shutdown()
        except Exception:  # noqa: BLE001 -- Ray may already be shutting down
            pass

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                message = self.queue.get(block=True, timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except Exception:  # noqa: BLE001 -- the queue actor is gone (Ray shut down)
                return
            self._show(message)

    def _show(self, message: tuple) -> None:
        kind = message[0]
        if kind == "say":
            tqdm.write(message[1], file=sys.stdout)
            sys.stdout.flush()
        elif kind == "bar":
            if self._bar is not None:
                self._bar.close()
            _, desc, total, initial = message
            self._bar = tqdm(total=total, initial=initial, unit="jet", unit_scale=True, desc=desc,
                             mininterval=2.0, file=sys.stdout)
        elif kind == "update" and self._bar is not None:
            self._bar.update(message[1])
            if message[2]:
                self._bar.set_postfix(**message[2])
        elif kind == "close" and self._bar is not None:
            self._bar.close()
            self._bar = None
