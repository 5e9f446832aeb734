"""The console relay on a real local Ray: rank 0's lines reach the driver in order, and keep reaching it after
the relay's actor process dies (Ray restarts it; the driver goes on collecting).

tests/cluster/test_node_loss.py checks, on several nodes, that the relay lives on the driver's node and that a
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


def _wait_printed(capfd, text: str, seen: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(capfd.readouterr().out)
        if text in "".join(seen):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never printed; got {''.join(seen)[-2000:]!r}")


def test_one_senders_lines_arrive_in_order(ray_local, capfd):
    import ray

    @ray.remote(num_cpus=0)
    def rank0(mailbox) -> None:
        console = Console(mailbox=mailbox)
        for i in range(300):
            console.say(f"line {i:03d}")

    seen: list[str] = []
    with Relay() as relay:
        ray.get(rank0.remote(relay.mailbox))
        _wait_printed(capfd, "line 299", seen)
    printed = [line for line in "".join(seen).splitlines() if line.startswith("line ")]
    assert printed == [f"line {i:03d}" for i in range(300)]


def test_lines_go_on_after_the_relay_process_is_killed(ray_local, capfd):
    import ray

    seen: list[str] = []
    with Relay() as relay:
        console = Console(mailbox=relay.mailbox)
        console.say("before the kill")
        _wait_printed(capfd, "before the kill", seen)
        pid = ray.get(relay.mailbox.__ray_call__.remote(lambda self: os.getpid()))
        os.kill(pid, signal.SIGKILL)
        console.say("during the restart")         # in flight while Ray restarts the actor: sent again
        _wait_printed(capfd, "during the restart", seen)
        assert ray.get(relay.mailbox.__ray_call__.remote(lambda self: os.getpid())) != pid
        console.say("after the restart")
        _wait_printed(capfd, "after the restart", seen)


def test_a_failing_event_handler_does_not_silence_rank_0(ray_local, capfd):
    def broken(message: tuple) -> None:
        raise KeyError("nodes")

    seen: list[str] = []
    with Relay(on_other=broken) as relay:
        console = Console(mailbox=relay.mailbox)
        relay.mailbox.post.remote(("cluster", "group", {}))
        console.say("still here")
        _wait_printed(capfd, "still here", seen)
    assert "note: could not tell a cluster event (KeyError: 'nodes')" in "".join(seen)
