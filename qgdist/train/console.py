"""What rank 0 tells the user: messages and a progress bar, on this terminal or relayed to the Ray driver.

In the plain loop the console prints here. Under Ray Train the workers' own output is not forwarded to the
driver (it would arrive prefixed, interleaved with Ray's internal lines and, for tqdm, as carriage-return
noise); rank 0 instead posts its messages to a small Ray actor, the ``Mailbox``, and the driver's ``Relay``
collects them, prints them and draws one progress bar with rates. Bar updates are batched (at most one message
a second), so the mailbox costs nothing next to a training step; they are posted without waiting for a reply, so
a slow or restarting mailbox never holds a step up. A synchronous actor runs one sender's posts in the order
they were sent (an asyncio actor, such as ``ray.util.queue``'s, need not).

The mailbox must outlive every restart of the worker group: it is pinned to the driver's node (where Ray Train
keeps its own controller, so it adds no failure of its own: that node lost, the run is lost anyway), restarted
there by Ray if its process dies, the posts in flight then sent again, and the driver's thread goes on
collecting through such a restart. Left to Ray's scheduler, a zero-CPU actor may land on any node, and with that
node the driver heard nothing more for the rest of the run.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

_BAR_SECONDS = 1.0
_POLL_SECONDS = 0.2    # between the driver's collections when the mailbox was empty
MAILBOX_SIZE = 10_000  # messages held for the driver; more are dropped (a driver that stopped collecting)


class Console:
    """Rank 0's messages; ``mailbox`` (the driver's ``Mailbox`` actor) relays them to the driver, else they print
    here."""

    def __init__(self, enabled: bool = True, mailbox: Any = None):
        self.enabled, self.mailbox = enabled, mailbox

    def say(self, text: str) -> None:
        """One line for the user (epoch metrics, resume notes)."""
        if not self.enabled:
            return
        if self.mailbox is None:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()
        else:
            self._send(("say", text))

    def bar(self, total: int, initial: int, desc: str, show: bool = True) -> Bar:
        """A progress bar in jets (``update(n)``, ``set_postfix(**kw)``, ``close()``)."""
        return Bar(self if self.enabled and show else None, total, initial, desc)

    def _send(self, message: tuple) -> None:
        send(self.mailbox, message)


def send(mailbox: Any, message: tuple) -> None:
    """Post ``message`` to the driver's ``mailbox`` (an actor handle) without waiting for the reply."""
    try:
        mailbox.post.remote(message)
    except Exception:  # noqa: BLE001 -- a gone mailbox must never stop training
        pass


class Mailbox:
    """The Ray actor between rank 0 (and Ray Train's controller) and the driver: ``post`` one message, ``take``
    all of them. Synchronous on purpose: one sender's posts are kept in order."""

    def __init__(self, size: int = MAILBOX_SIZE) -> None:
        self.size, self.messages, self.dropped = size, [], 0

    def post(self, message: tuple) -> None:
        if len(self.messages) < self.size:
            self.messages.append(message)
        else:
            self.dropped += 1

    def take(self) -> list[tuple]:
        messages, self.messages = self.messages, []
        return messages


class Bar:
    """A tqdm bar drawn here, or its updates batched and sent to the driver."""

    def __init__(self, console: Console | None, total: int, initial: int, desc: str):
        self.console, self.pending, self.postfix, self.last = console, 0, {}, time.monotonic()
        self.local = None
        if console is not None and console.mailbox is None:
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
    """Driver side: prints what rank 0 sends, in a thread, until ``stop()``; used as a context manager.

    Messages whose kind is not the console's own (``say``, ``bar``, ``update``, ``close``) go to ``on_other``
    (the run's cluster events, ``qgdist.train.events``). ``say`` prints a line from any driver thread.
    """

    def __init__(self, on_other: Callable[[tuple], None] | None = None) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # Zero CPUs: the mailbox must never take a CPU the training workers need to be scheduled. On the driver's
        # node, like Ray Train's controller; restarted there if its process dies, the calls in flight then sent
        # again to the new one (what the old one held and had not handed out is lost).
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.mailbox = ray.remote(Mailbox).options(num_cpus=0, max_restarts=-1, max_task_retries=-1,
                                                 scheduling_strategy=here).remote()
        self.on_other = on_other
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qgdist-console-relay", daemon=True)
        self._bar: tqdm | None = None
        self._desc, self._done = "", 0     # the bar's title ("epoch 3") and jets done, for position()

    def __enter__(self) -> Relay:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray

        self._stop.set()
        self._thread.join(timeout=10)
        if self._bar is not None:
            self._bar.close()
        try:
            ray.kill(self.mailbox)
        except Exception:  # noqa: BLE001 -- Ray may already be shutting down
            pass

    def say(self, text: str) -> None:
        """Print one line above the bar."""
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()

    def close_bar(self) -> None:
        """Close rank 0's bar (its workers stopped: a bar left standing would show a stale rate); the next group
        draws a new one. Its position is kept for ``position()``. Called in the relay thread (``on_other``)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def position(self) -> tuple[str, int]:
        """The last progress rank 0 sent: the bar's title and the jets done in it (``("", 0)`` before any)."""
        return self._desc, self._done

    def _run(self) -> None:
        """Collect and show until ``stop`` and an empty mailbox. A collection is never abandoned (its messages
        would be lost): while the mailbox restarts, the same call is waited on, and Ray sends it again."""
        import ray

        pending = None
        while True:
            stopping = self._stop.is_set()
            if pending is None:
                pending = self.mailbox.take.remote()
            ready, _ = ray.wait([pending], timeout=1.0)
            if not ready:
                if stopping:
                    return   # a mailbox that does not answer at the end: nothing more to wait for
                continue
            try:
                messages = ray.get(pending)
            except Exception:  # noqa: BLE001 -- gone for good (its node lost, Ray shutting down): nothing will come
                return
            pending = None
            for message in messages:
                self._show(message)
            if not messages:
                if stopping:
                    return
                self._stop.wait(_POLL_SECONDS)

    def _show(self, message: tuple) -> None:
        kind = message[0]
        if kind == "say":
            self.say(message[1])
        elif kind == "bar":
            if self._bar is not None:
                self._bar.close()
            _, desc, total, initial = message
            self._desc, self._done = desc, initial
            self._bar = tqdm(total=total, initial=initial, unit="jet", unit_scale=True, desc=desc,
                             mininterval=2.0, file=sys.stdout)
        elif kind == "update" and self._bar is not None:
            self._done += message[1]
            self._bar.update(message[1])
            if message[2]:
                self._bar.set_postfix(**message[2])
        elif kind == "close" and self._bar is not None:
            self._bar.close()
            self._bar = None
        elif kind not in ("update", "close") and self.on_other is not None:
            try:
                self.on_other(message)
            except Exception as err:  # noqa: BLE001 -- an event that cannot be told must not silence rank 0
                self.say(f"note: could not tell a cluster event ({type(err).__name__}: {err})")
