"""Benchmarks (``qgdist bench ...``): ratios measured side by side in one run, never timed tests.

Each module holds a frozen config dataclass (its fields are the flags, see ``qgdist.core.config``) and the
function that runs it; ``qgdist.cli.bench`` builds the parsers. Heavy libraries are imported when a bench runs.
"""

from __future__ import annotations


def comma_names(text: str) -> tuple[str, ...]:
    """``"a, b,c"`` -> ``("a", "b", "c")``: the parser of comma-separated list flags (``--model A,B``)."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def comma_ints(text: str) -> tuple[int, ...]:
    """``"2,32,128"`` -> ``(2, 32, 128)``."""
    return tuple(int(v) for v in comma_names(text))


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as benchmarks record them next to their figures."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def joined_ray() -> str | None:
    """The line a Ray bench prints when ``$RAY_ADDRESS`` names a cluster its runs join instead of starting a
    private Ray each; None when they start their own."""
    import os

    address = os.environ.get("RAY_ADDRESS")
    if not address:
        return None
    return (f"Ray: every Ray run joins the cluster at RAY_ADDRESS={address} instead of starting a private Ray: Ray's "
            "start-up is the join, and the cluster's own processes are outside the memory figures")
