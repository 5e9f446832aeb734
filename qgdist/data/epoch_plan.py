"""How an epoch's jets are dealt to readers and drawn into batches, and re-dealt when the world size changes.

Everything here is derived from the seed, the epoch, the manifest's shard sizes and each layout's world size and
loader workers, so every rank computes the same plan without talking to the others:

1. ``plan_epoch`` shuffles the split's shards and deals them to ``slots`` (= ranks x loader workers), balanced by
   jets; with fewer shards than slots a shard is split into strided parts.
2. A slot's reader takes all its chunks in one seeded random order (``shuffled_chunks``) into a ``Pool`` that
   keeps at least ``buffer`` jets and draws each batch at random from it, without replacement.
3. A pool's draws need only each chunk's jet count, so any position can be *replayed* without reading data.

**A change of world size inside an epoch** (an elastic run that lost or regained workers, ``Layout``): the epoch so
far was read under earlier layouts, each for some steps. ``remaining_jets`` replays every slot of every earlier
layout up to the steps it ran and collects what its reader had not yet drawn -- the jets left in its pool (as
chunks with some rows selected) and the chunks it had not read -- and ``deal`` hands those to the new layout's
slots, balanced by jets. Within an epoch no jet is therefore drawn twice, whatever the resizes; the jets not
trained on are, as in any epoch, the tail the final layout leaves so that every slot yields the same number of
full batches (after a re-deal, balanced to within one chunk: less than one batch plus one chunk per slot).
"""

from __future__ import annotations

import hashlib
import heapq
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from qgdist.data.shards.manifest import Manifest
from qgdist.data.shards.read import ChunkRef, ShardPart, chunk_index
from qgdist.data.shards.schema import JetChunk, chunk_jets, decode_chunk

JET_BITS = 32  # a pool entry is (chunk sequence number << 32) | jet row within the chunk
Unit = Union[ShardPart, ChunkRef]  # what a slot holds: shard parts (first layout) or chunks (after a resize)


@dataclass(frozen=True)
class Layout:
    """How part of an epoch was read: ``world_size`` ranks x ``num_workers`` loader workers, for ``steps`` steps."""

    world_size: int
    num_workers: int
    steps: int

    @property
    def slots(self) -> int:
        return self.world_size * max(1, self.num_workers)


def plan_epoch(manifest: Manifest, data: str, split: str, seed: int, epoch: int,
               slots: int) -> list[list[ShardPart]]:
    """Deal the split's shards to ``slots`` slots for ``epoch``: disjoint, balanced by samples, seeded."""
    shards = manifest.shards_of(split)
    if not shards:
        raise ValueError(f"{data}: manifest lists no {split!r} shards")
    parts = -(-slots // len(shards))  # ceil: split shards only when there are fewer than slots
    if parts == 1:
        units = [ShardPart(os.path.join(data, s.name), 0, 1, s.samples, tuple(s.index), s.sha256) for s in shards]
    else:  # few shards: their chunk indexes tell each part's jets
        units = []
        for s in shards:
            path = os.path.join(data, s.name)
            jets = chunk_index(path, tuple(s.index), s.sha256)[:, 2]
            units += [ShardPart(path, j, parts, int(jets[j::parts].sum()), tuple(s.index), s.sha256)
                      for j in range(parts)]
    units = [u for u in units if u.samples > 0]
    rng = random.Random(f"{seed}-{epoch}")
    rng.shuffle(units)
    units.sort(key=lambda u: -u.samples)  # stable: equal sizes keep their shuffled order
    plan: list[list[ShardPart]] = [[] for _ in range(slots)]
    load = [0] * slots
    for unit in units:
        target = min(range(slots), key=lambda i: (load[i], i))
        plan[target].append(unit)
        load[target] += unit.samples
    for units_of_slot in plan:
        rng.shuffle(units_of_slot)
    return plan


def deal(pieces: list[ChunkRef], slots: int, seed: int, epoch: int, layout: int) -> list[list[ChunkRef]]:
    """Hand ``pieces`` (what earlier layouts left of the epoch) to ``slots`` slots: seeded, balanced by jets."""
    rng = random.Random(f"{seed}-{epoch}-layout{layout}")
    order = list(range(len(pieces)))
    rng.shuffle(order)
    order.sort(key=lambda i: -pieces[i].jets)  # stable: equal sizes keep their shuffled order
    plan: list[list[ChunkRef]] = [[] for _ in range(slots)]
    heap = [(0, i) for i in range(slots)]
    for i in order:
        load, target = heapq.heappop(heap)
        plan[target].append(pieces[i])
        heapq.heappush(heap, (load + pieces[i].jets, target))
    return plan


def slot_jets(units: Sequence[Unit]) -> int:
    """Jets held by one slot's units."""
    return sum(u.samples if isinstance(u, ShardPart) else u.jets for u in units)


def seed_of(tag: str) -> int:
    """A 64-bit seed from a text tag (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.blake2b(tag.encode(), digest_size=8).digest(), "little")


def slot_rng(seed: int, epoch: int, layout: int, rank: int, worker: int) -> np.random.Generator:
    """The generator of one reader: its chunk order and its pool draws."""
    tag = f"{seed}-{epoch}-{rank}-{worker}" if layout == 0 else f"{seed}-{epoch}-layout{layout}-{rank}-{worker}"
    return np.random.default_rng(seed_of(tag))


def shuffled_chunks(units: Sequence[Unit], rng: np.random.Generator) -> Iterator[ChunkRef]:
    """Every chunk of ``units`` in one seeded random order across all of them (shard order and chunk order)."""
    refs: list[ChunkRef] = []
    for u in units:
        if isinstance(u, ChunkRef):
            refs.append(u)
        else:
            refs += [ChunkRef(u.path, int(a), int(b), int(k))
                     for a, b, k in chunk_index(u.path, u.index, u.sha256)[u.part::u.parts].tolist()]
    for i in rng.permutation(len(refs)).tolist():
        yield refs[i]


class _Entry:
    """A chunk in the pool: its raw members (or a ``ChunkRef``) until first needed, then the decoded columns."""

    __slots__ = ("raw", "decoded")

    def __init__(self, raw: Any):
        self.raw, self.decoded = raw, None

    def chunk(self) -> JetChunk:
        if self.decoded is None:
            raw = self.raw.read() if isinstance(self.raw, ChunkRef) else self.raw
            self.decoded, self.raw = decode_chunk(raw), None
        return self.decoded


class Pool:
    """Batches of jet ids ``(chunk << 32) | row`` drawn from a stream of chunks, with the chunks they come from.

    With ``rng`` the pool keeps at least ``buffer + batch_size`` jets (while the stream lasts) and each batch is
    ``batch_size`` jets drawn at random without replacement; without it, jets come in stream order. Only each
    chunk's jet count is read while drawing, so replaying draws (a resume) decodes nothing. The last batch may be
    short. Iterating yields ``(ids, entries)``; ``remainder()`` is what has not been drawn yet.
    """

    def __init__(self, stream: Iterator[Any], batch_size: int, buffer: int, rng: np.random.Generator | None):
        self.stream, self.batch_size, self.rng = stream, batch_size, rng
        self.target = buffer + batch_size if rng is not None else batch_size
        self.entries: dict[int, _Entry] = {}
        self.ids = np.zeros(0, np.int64)
        self._left: dict[int, int] = {}
        self._seq = 0

    def _fill(self) -> None:
        added, have = [], len(self.ids)
        while have < self.target:
            raw = next(self.stream, None)
            if raw is None:
                break
            rows = raw.row_ids() if isinstance(raw, ChunkRef) else np.arange(chunk_jets(raw), dtype=np.int64)
            if not len(rows):
                continue
            self.entries[self._seq], self._left[self._seq] = _Entry(raw), len(rows)
            added.append((self._seq << JET_BITS) | rows)
            have += len(rows)
            self._seq += 1
        if added:
            self.ids = np.concatenate([self.ids, *added])

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict[int, _Entry]]]:
        while True:
            self._fill()
            if not len(self.ids):
                return
            if self.rng is not None:
                self.ids = self.ids[self.rng.permutation(len(self.ids))]
            take, self.ids = self.ids[:self.batch_size], self.ids[self.batch_size:]
            yield take, self.entries
            chunks, counts = np.unique(take >> JET_BITS, return_counts=True)
            for c, k in zip(chunks.tolist(), counts.tolist()):
                self._left[c] -= k
                if not self._left[c]:
                    del self._left[c], self.entries[c]

    def remainder(self) -> list[ChunkRef]:
        """The jets not drawn yet: the pool's, grouped by chunk (rows selected), then the chunks never read."""
        out = []
        seqs = self.ids >> JET_BITS
        for seq in np.unique(seqs).tolist():
            raw = self.entries[seq].raw
            if not isinstance(raw, ChunkRef):
                raise RuntimeError("remainder() of a pool whose chunks were read: replay draws without decoding")
            out.append(raw.with_rows(self.ids[seqs == seq] & ((1 << JET_BITS) - 1)))
        return out + list(self.stream)


def delivered(steps: int, workers: int, worker: int) -> int:
    """Batches loader worker ``worker`` has delivered after ``steps`` steps (batch i comes from worker i % W)."""
    return steps // workers + (1 if worker < steps % workers else 0)


def remaining_jets(manifest: Manifest, data: str, split: str, seed: int, epoch: int, batch_size: int,
                   buffer: int, earlier: Sequence[Layout]) -> list[ChunkRef]:
    """What ``earlier`` layouts (each run for its ``steps``) left undrawn of ``epoch``: chunks with rows selected."""
    pieces: list[ChunkRef] = []
    for k, layout in enumerate(earlier):
        plan: Sequence[Sequence[Unit]] = (plan_epoch(manifest, data, split, seed, epoch, layout.slots) if k == 0
                                          else deal(pieces, layout.slots, seed, epoch, k))
        per_worker = min(slot_jets(units) for units in plan) // batch_size
        workers = max(1, layout.num_workers)
        rest: list[ChunkRef] = []
        for slot, units in enumerate(plan):
            rank, w = divmod(slot, workers)
            rng = slot_rng(seed, epoch, k, rank, w)
            pool = Pool(shuffled_chunks(units, rng), batch_size, buffer, rng)
            draws = iter(pool)
            for _ in range(min(delivered(layout.steps, workers, w), per_worker)):
                next(draws)
            rest += pool.remainder()
        pieces = rest
    return pieces
