"""Streaming reader of columnar jet files in the weaver / ParT layout: ROOT TTrees, jagged parquet and HDF5.

Physicists keep jets as one entry per jet with per-particle branches (``part_px``, ``part_py``, ``part_pz``,
``part_energy``, ``part_pid``, ...) and per-jet branches (``jet_pt``, ``jet_nparticles``, ``label``, ...): the
layout weaver-core trains from and the ParT authors' quark/gluon converter writes. ``Branches`` names the branches
(that layout by default); the reader turns each entry into a particle cloud of (pt, rapidity, phi, PDG id) and
hands it to the EnergyFlow encoder (``energyflow.decode_rows``), so the same particles give the same shards
whichever file they came from.

Nothing reads a file whole: ROOT by entry ranges (``TBranch.array(entry_start, entry_stop)``, uproot), parquet by
row groups (``ParquetFile.iter_batches``), HDF5 by slices (h5py). Per-particle branches may be jagged (ROOT, parquet,
HDF5 variable-length) or, in HDF5, zero-padded 2-D arrays whose real length is the ``counts`` branch (weaver's h5).

Bad input is named by file, entry and branch: a missing branch, or one with a list where a value is expected (or
the reverse), refuses the whole file; an entry whose per-particle branches disagree on its length (ragged), whose
values are NaN or infinite, whose label is not 0/1 or whose PDG id is unknown is a rejected row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from qgdist.data.features import mass_and_charge
from qgdist.data.labels import LabelConvention
from qgdist.data.sources.base import Chunk, Plan, Unit, file_name, row_units
from qgdist.data.sources.columnar_files import (Column, HDF5Source, ParquetSource, RootSource, Source, Unreadable,
                                                file_format)
from qgdist.data.sources.columnar_files import EXTENSIONS, FORMATS  # noqa: F401 -- this source's files, for convert
from qgdist.data.features import known_pdg_ids
from qgdist.data.sources.energyflow import MAX_RAPIDITY, decode_rows
from qgdist.data.sources.errors import BadRowError, Rejected


@dataclass(frozen=True)
class Branches:
    """Which branches hold what (default: the weaver / ParT layout). An empty name means "not in the file".

    Momenta come from the four-momentum branches (``px``, ``py``, ``pz``, ``energy``) unless ``pt`` is named;
    then from ``pt``, ``phi`` and one of ``rapidity`` or ``eta`` (turned into rapidity with the PDG mass).
    Without ``pid`` every particle gets id 0 (massless, and the PID features are zero).
    """

    tree: str = ""                   # ROOT TTree / HDF5 group ("": the file's only TTree / the root group)
    label: str = "label"             # per jet; its quark value is --label-quark-value (default 1, as ParT's)
    pid: str = "part_pid"
    px: str = "part_px"
    py: str = "part_py"
    pz: str = "part_pz"
    energy: str = "part_energy"
    pt: str = ""
    rapidity: str = ""
    eta: str = ""
    phi: str = ""
    #: Particles per jet: the length of HDF5 zero-padded arrays; checked against the jagged lengths when present.
    counts: str = "jet_nparticles"

    @classmethod
    def of(cls, mapping: Mapping[str, str] | None) -> "Branches":
        """The default layout with ``mapping``'s names on top; an unknown key or an incomplete choice raises."""
        mapping = dict(mapping or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(mapping) - set(known))
        if unknown:
            raise ValueError(f"branch: unknown key {unknown[0]!r}; known: {', '.join(known)}")
        out = cls(**{k: str(v) for k, v in mapping.items()})
        out.validate()
        return out

    def validate(self) -> None:
        if not self.label:
            raise ValueError("branch: label= needs a branch name (the jets' quark/gluon label)")
        if self.pt:
            if not self.phi or bool(self.rapidity) == bool(self.eta):
                raise ValueError("branch: with pt= name phi= and one of rapidity= or eta=")
        elif not all((self.px, self.py, self.pz, self.energy)):
            raise ValueError("branch: name px=, py=, pz= and energy= (or pt=, phi= and rapidity= or eta=)")

    @property
    def momenta(self) -> tuple[str, ...]:
        """The per-particle momentum branches, in the order ``_kinematics`` reads them."""
        if self.pt:
            return (self.pt, self.rapidity or self.eta, self.phi)
        return (self.px, self.py, self.pz, self.energy)

    @property
    def particle(self) -> tuple[str, ...]:
        """Every per-particle branch read."""
        return self.momenta + ((self.pid,) if self.pid else ())


def _open(path: str, branches: Branches) -> Source:
    fmt = file_format(path)
    if fmt == "root":
        return RootSource(path, branches.tree)
    if fmt == "parquet":
        return ParquetSource(path)
    return HDF5Source(path, branches.tree)


def _check_branches(src: Source, path: str, branches: Branches) -> list[str]:
    """The branches to read (per jet, then per particle); refuses the file when one is missing or misshapen."""
    name = file_name(path)
    wanted = [(b, "particle") for b in branches.particle] + [(branches.label, "jet")]
    counts = branches.counts if branches.counts in src.names else ""
    if counts:
        wanted.append((counts, "jet"))
    elif isinstance(src, HDF5Source) and any(b in src.padded for b, _ in wanted):
        raise BadRowError(name, None, branches.counts or "counts",
                          f"zero-padded per-particle arrays need a per-jet count of particles: no branch "
                          f"{branches.counts!r} in {src.where} (name it with --branch counts=NAME)")
    for branch, shape in wanted:
        if branch not in src.names:
            listed = ", ".join(sorted(src.names)[:30]) + (" ..." if len(src.names) > 30 else "")
            hint = " (files without PDG ids: --branch pid=)" if branch == branches.pid else ""
            raise BadRowError(name, None, branch, f"no branch {branch!r} in {src.where}{hint} (branches: {listed})")
        if src.names[branch] != shape:
            what = "a list of values per entry" if src.names[branch] == "particle" else "one value per entry"
            raise BadRowError(name, None, branch, f"holds {what}, expected one value per "
                              f"{'particle' if shape == 'particle' else 'jet'}")
    if isinstance(src, HDF5Source):
        short = {b: n for b, n in src._lengths.items() if b in dict(wanted) and n != src.rows}
        if short:
            b = min(short, key=short.get)
            raise BadRowError(name, None, b, f"{short[b]} entries, other branches have {max(src._lengths.values())}")
    return [b for b, _ in wanted]


def plan(path: str, rows_per_unit: int, split_deflated: bool = True, branches: Branches | None = None) -> Plan:
    """Units of ``path`` from its metadata alone (ROOT: entry ranges; parquet: whole row groups; HDF5: slices),
    after checking that every branch exists with the right shape."""
    branches = branches or Branches()
    src = _open(path, branches)
    try:
        _check_branches(src, path, branches)
        if src.rows == 0:
            raise BadRowError(file_name(path), None, "<file>", "file has no entries")
        if isinstance(src, ParquetSource):
            units, groups, start, row = [], [], 0, 0
            for g, n in enumerate(src.row_groups):
                groups.append(g)
                row += n
                if row - start >= rows_per_unit or g == len(src.row_groups) - 1:
                    units.append(Unit(path, start, row, tuple(groups)))
                    groups, start = [], row
            return Plan(units, src.rows)
        return Plan(row_units(path, src.rows, rows_per_unit), src.rows)
    finally:
        src.close()


def _blocks(src: Source, unit: Unit, names: list[str], counts: str,
            read_rows: int) -> Iterator[tuple[int, int, dict[str, Column] | Unreadable]]:
    """(first row, end row, columns or the read error) for each block of the unit."""
    if isinstance(src, ParquetSource):
        lo = unit.row_start
        batches = src.batches(names, unit.row_groups, read_rows)
        while True:
            try:
                cols = next(batches)
            except StopIteration:
                return
            except Exception as err:  # a corrupt page: the rest of the unit cannot be read
                yield lo, unit.row_stop, Unreadable(names[0], f"unreadable ({type(err).__name__}: {err})")
                return
            n = len(cols[names[0]].counts if cols[names[0]].counts is not None else cols[names[0]].values)
            yield lo, lo + n, cols
            lo += n
        return
    for lo in range(unit.row_start, unit.row_stop, read_rows):
        hi = min(lo + read_rows, unit.row_stop)
        try:
            if isinstance(src, HDF5Source):
                cols = src.read(names, lo, hi, counts if counts in src.names else "")
            else:
                cols = src.read(names, lo, hi)
        except Unreadable as err:
            yield lo, hi, err
            continue
        yield lo, hi, cols


def read(unit: Unit, labels: LabelConvention, dtype: str = "float32", read_rows: int = 4096,
         branches: Branches | None = None) -> Iterator[Chunk]:
    """Yield the unit's entries in blocks of ``read_rows``, decoded into cloud chunks (see ``decode_block``)."""
    branches = branches or Branches()
    name = file_name(unit.path)
    src = _open(unit.path, branches)
    try:
        names = _check_branches(src, unit.path, branches)
        for lo, hi, cols in _blocks(src, unit, names, branches.counts, read_rows):
            if isinstance(cols, Unreadable):
                yield Chunk(rejected=[Rejected(name, r, cols.branch, cols.reason) for r in range(lo, hi)])
                continue
            yield decode_block(cols, np.arange(lo, hi), name, branches, labels, dtype)
    finally:
        src.close()


# -- decoding: columns of a block -> validated particle clouds ---------------------------------------------------------
class _Problems:
    """The first problem of each row (field, reason), in the order the checks run."""

    def __init__(self, k: int) -> None:
        self.which = np.full(k, -1, np.int64)
        self.messages: list[tuple[str, str]] = []

    def add(self, bad: np.ndarray, field: str, reason: str) -> None:
        new = bad & (self.which < 0)
        if new.any():
            self.which[new] = len(self.messages)
            self.messages.append((field, reason))

    @property
    def ok(self) -> np.ndarray:
        return self.which < 0

    def rejected(self, name: str, rows: np.ndarray) -> list[Rejected]:
        out = []
        for i in np.flatnonzero(self.which >= 0).tolist():
            field, reason = self.messages[self.which[i]]
            out.append(Rejected(name, int(rows[i]), field, reason))
        return out


def _per_row(jet: np.ndarray, bad_particles: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros(k, bool)
    out[jet[bad_particles]] = True
    return out


def _kinematics(b: Branches, values: dict[str, np.ndarray], pid: np.ndarray, jet: np.ndarray, k: int,
                problems: _Problems) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pt, rapidity, phi) of every particle; rows with particles that have none are marked."""
    if b.pt:
        pt, second, phi = (values[n] for n in b.momenta)
        problems.add(_per_row(jet, ~(pt > 0), k), b.pt, "particle with pt <= 0")
        if b.rapidity:
            rap = second
        else:   # pseudorapidity -> rapidity with the PDG mass: y = asinh(pt sinh(eta) / mt)
            mass, _ = mass_and_charge(pid)
            with np.errstate(over="ignore", invalid="ignore"):
                rap = np.arcsinh(pt * np.sinh(second) / np.sqrt(pt * pt + mass * mass))
        return pt, rap, phi
    px, py, pz, e = (values[n] for n in b.momenta)
    pt = np.hypot(px, py)
    problems.add(_per_row(jet, ~(pt > 0), k), b.px, f"particle with pt = 0 ({b.px} = {b.py} = 0)")
    problems.add(_per_row(jet, ~(e > np.abs(pz)), k), b.energy, f"particle with {b.energy} <= |{b.pz}| (no rapidity)")
    with np.errstate(divide="ignore", invalid="ignore"):
        rap = 0.5 * np.log((e + pz) / (e - pz))
    return pt, rap, np.arctan2(py, px)


def decode_block(cols: dict[str, Column], rows: np.ndarray, name: str, b: Branches, labels: LabelConvention,
                 dtype: str) -> Chunk:
    """Validate and encode one block: ``cols`` from a ``Source``, ``rows`` their entry numbers in the file.

    Every check runs on whole arrays; only rejected rows are visited one by one (to name their problem). The good
    rows go through the EnergyFlow encoder as (pt, rapidity, phi, pid) clouds, so identical particles give
    identical shards whatever the file format.
    """
    k = len(rows)
    problems = _Problems(k)
    first = b.particle[0]
    n = cols[first].counts.astype(np.int64)
    for branch in b.particle:
        c = cols[branch].counts
        problems.add(c == -1, branch, "null (missing) list of particles")
        problems.add(c == -2, branch, f"{b.counts} says more particles than the padded row holds")
        problems.add((c != n) & (c >= 0) & (n >= 0), branch,
                     f"ragged: a different number of values than {first} in this entry")
    label = np.asarray(cols[b.label].values, np.float64)
    problems.add(~np.isfinite(label), b.label, "label is NaN or missing")
    problems.add(np.isfinite(label) & (label != 0) & (label != 1), b.label, "label is not 0 or 1")
    if b.counts in cols and cols[b.counts].counts is None:
        claimed = np.asarray(cols[b.counts].values, np.float64)
        problems.add((claimed != n) & (n >= 0), b.counts, f"does not match the length of {first}")
    problems.add(n == 0, first, "jet has no particles")

    # The values of the rows whose every branch has the same length, aligned particle by particle.
    ok_shape = problems.ok
    n_ok = np.where(ok_shape, n, 0)
    jet = np.repeat(np.arange(k), n_ok)
    values = {}
    for branch in b.particle:
        c = np.maximum(cols[branch].counts, 0)
        keep = np.repeat(ok_shape, c)
        v = np.asarray(cols[branch].values[keep] if not keep.all() else cols[branch].values, np.float64)
        problems.add(_per_row(jet, ~np.isfinite(v), k), branch, "NaN or inf")
        values[branch] = np.where(np.isfinite(v), v, 0.0)
    pid = values[b.pid] if b.pid else np.zeros(len(jet))
    if b.pid:
        problems.add(_per_row(jet, ~known_pdg_ids(pid), k), b.pid, "not a known PDG particle id")
        pid = np.where(known_pdg_ids(pid), pid, 0.0)
    pt, rap, phi = _kinematics(b, values, pid, jet, k, problems)
    with np.errstate(invalid="ignore"):
        problems.add(_per_row(jet, ~(np.abs(rap) <= MAX_RAPIDITY), k), b.momenta[1],
                     f"particle rapidity beyond +-{MAX_RAPIDITY}")

    good = np.flatnonzero(problems.ok)
    rejected = problems.rejected(name, rows)
    if not len(good):
        return Chunk(rejected=rejected)
    # Good rows as zero-padded (pt, rapidity, phi, pid) clouds: the EnergyFlow encoder's input.
    sel = problems.ok[jet]
    n_good = n[good]
    x = np.zeros((len(good), int(n_good.max()), 4))
    pos = np.arange(int(n_good.sum())) - np.repeat(np.cumsum(n_good) - n_good, n_good)
    x[np.repeat(np.arange(len(good)), n_good), pos] = np.stack([pt[sel], rap[sel], phi[sel], pid[sel]], axis=1)
    chunk = decode_rows(x, label[good], rows[good], name, labels, dtype)
    rejected += [dataclasses.replace(r, field="particles") for r in chunk.rejected]   # not reached: checked above
    block = chunk.block
    if block is not None:
        block = dataclasses.replace(block, source="columnar")
    return Chunk(block, sorted(rejected, key=lambda r: r.row))
