"""The console relay on a real local Ray: rank 0's lines reach the driver in order, and keep reaching it after
the relay's actor process dies (Ray restarts it; the driver goes on collecting).

tests/cluster/test_multinode.py checks, on several nodes, that the relay lives on the driver's node and that a
whole training run keeps its terminal through a lost relay process and a lost node.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from qgdist.train.console import Console, Relay

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from qgdist.core.ray import ensure_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ensure_ray(num_cpus=1)
    yield
    ray.shutdown()


class RecordingRelay(Relay):
    """The relay, also keeping each line it prints. Polling ``capfd`` instead would race: its read-then-truncate
    loses what the relay thread writes in between (seen in CI as a torn line and 78 lines missing)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.lines: list[str] = []

    def say(self, text: str) -> None:
        super().say(text)
        self.lines.append(text)


def _wait_printed(relay: RecordingRelay, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in list(relay.lines)):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never printed; got {relay.lines[-20:]!r}")


def test_one_senders_lines_arrive_in_order(ray_local, capfd):
    import ray

    @ray.remote(num_cpus=0)
    def rank0(mailbox) -> None:
        console = Console(mailbox=mailbox)
        for i in range(300):
            console.say(f"line {i:03d}")

    with RecordingRelay() as relay:
        ray.get(rank0.remote(relay.mailbox))
        _wait_printed(relay, "line 299")
    assert relay.lines == [f"line {i:03d}" for i in range(300)]
    printed = [line for line in capfd.readouterr().out.splitlines() if line.startswith("line ")]
    assert printed == relay.lines     # and they reached the terminal, in that order


def test_lines_go_on_after_the_relay_process_is_killed(ray_local):
    import ray

    with RecordingRelay() as relay:
        console = Console(mailbox=relay.mailbox)
        console.say("before the kill")
        _wait_printed(relay, "before the kill")
        pid = ray.get(relay.mailbox.__ray_call__.remote(lambda self: os.getpid()))
        os.kill(pid, signal.SIGKILL)
        console.say("during the restart")         # in flight while Ray restarts the actor: sent again
        _wait_printed(relay, "during the restart")
        assert ray.get(relay.mailbox.__ray_call__.remote(lambda self: os.getpid())) != pid
        console.say("after the restart")
        _wait_printed(relay, "after the restart")


def test_a_failing_event_handler_does_not_silence_rank_0(ray_local):
    def broken(message: tuple) -> None:
        raise KeyError("nodes")

    with RecordingRelay(on_other=broken) as relay:
        console = Console(mailbox=relay.mailbox)
        relay.mailbox.post.remote(("cluster", "group", {}))
        console.say("still here")
        _wait_printed(relay, "still here")
    assert "note: could not tell a cluster event (KeyError: 'nodes')" in relay.lines
