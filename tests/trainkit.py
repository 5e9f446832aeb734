"""Test helpers: toy shard datasets of a given layout (``qgdist.pipelines.toy_data.toy_shards``) and strict JSON."""

from __future__ import annotations

import json

from qgdist.pipelines.toy_data import toy_shards as write_dataset

__all__ = ["strict_json", "write_dataset"]


def strict_json(text: str) -> dict:
    """Parse as a strict JSON reader would: NaN and Infinity are not JSON."""
    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)
