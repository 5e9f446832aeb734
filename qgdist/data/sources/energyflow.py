"""Streaming reader of EnergyFlow quark/gluon npz files (``X`` (N, M, 4) = pt, rapidity, phi, pdgid; ``y``).

An npz is a zip of ``.npy`` members. ``X`` is never loaded whole: its shape and dtype come from the npy header
inside the zip, and a unit reads only its own rows. For a stored (uncompressed) member we seek straight to the
rows in the archive; for a deflated member we stream through zipfile's decompressing reader (which decompresses
and discards what lies before the unit) and then read the unit chunk by chunk, so memory stays at one chunk.
``y`` is small (8 bytes a jet) and read whole. Zero padding (particles whose four entries are all 0) is dropped.
"""

from __future__ import annotations

import dataclasses
import struct
import zipfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from qgdist.core.errors import InputError
from qgdist.data.features import four_momenta, known_pdg_ids, mass_and_charge
from qgdist.data.labels import LabelConvention
from qgdist.data.shards.schema import CLOUD_JET, CloudChunk, sort_particles
from qgdist.data.sources.base import Chunk, Plan, Unit, file_name, open_input, row_units
from qgdist.data.sources.errors import BadRowError, Rejected

if TYPE_CHECKING:
    from qgdist.data.sources.stream import Rows

#: Rapidities beyond this are corrupt data, not particles (cosh would overflow on the way to energies).
MAX_RAPIDITY = 10.0
#: Particle azimuths must lie in [-pi, 3 pi]: the format puts the jet axis in [0, 2 pi) and every constituent within
#: pi of it (files centred on [-pi, pi] fit too). Anything else is a corrupt value, not an angle of this format.
PHI_RANGE = (-np.pi, 3 * np.pi)
#: Planned by default, a unit holds at most this many bytes of ``X`` (N x M x 4 values; the public files hold
#: float64, 32 bytes a particle). A deflated file's unit is handed to its task whole (``qgdist.data.sources.stream``)
#: and decoded as padded (rows, M) arrays, so in the object store and in the task its memory follows the width M
#: the file was padded to, and M is the file's own longest jet: among ten 100k-jet toy files the widest had
#: M = 173 and the first 148. Sized in bytes, a unit costs the same memory whatever the width (16,384 jets up to
#: M = 128 in float64, 14,169 at M = 148, 12,122 at M = 173).
UNIT_BYTES = 64 << 20


def _npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(f)


def _member(zf: zipfile.ZipFile, name: str, path: str) -> zipfile.ZipInfo:
    for candidate in (f"{name}.npy", name):
        if candidate in zf.NameToInfo:
            return zf.NameToInfo[candidate]
    raise BadRowError(file_name(path), None, name, f"npz has no array {name!r} (members: {zf.namelist()})")


def _open_zip(path: str) -> tuple[Any, zipfile.ZipFile]:
    fs, p = open_input(path)
    f = fs.open(p, "rb")
    try:
        return f, zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        f.close()
        raise BadRowError(file_name(path), None, "<file>", f"not a readable npz (zip) file ({err})") from None


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of an npy member, reading only its first bytes."""
    try:
        with zf.open(info) as m:
            shape, fortran, dtype = _npy_header(m)
            offset = m.tell()
    except Exception as err:
        raise BadRowError(file_name(path), None, info.filename, f"unreadable npy header ({err})") from None
    if fortran or dtype.hasobject:
        raise BadRowError(file_name(path), None, info.filename, "array is Fortran-ordered or holds objects")
    return shape, dtype, offset


def _labels(zf: zipfile.ZipFile, path: str) -> np.ndarray:
    info = _member(zf, "y", path)
    try:
        with zf.open(info) as m:
            y = np.load(m, allow_pickle=False)
    except Exception as err:
        raise BadRowError(file_name(path), None, "y", f"unreadable ({err})") from None
    if y.ndim != 1:
        raise BadRowError(file_name(path), None, "y", f"shape {list(y.shape)}, expected (N,)")
    return y.astype(np.float64)


def plan(path: str, rows_per_unit: int, split_deflated: bool = True, max_unit_bytes: int | None = None) -> Plan:
    """Row-range units from the npy header of ``X``; rows beyond the shorter of X and y are rejected here.

    A unit has at most ``rows_per_unit`` rows and, with ``max_unit_bytes``, at most that many bytes of ``X``
    (``UNIT_BYTES``: what ``plan_inputs`` asks for unless the user gave the rows per unit). A deflated ``X`` has no
    random access: its units are marked ``stream`` and inflated once, in order, by one streaming reader that hands
    each unit its rows (``qgdist.data.sources.stream``), so the file spreads over every task like a stored one.
    With ``split_deflated=False`` such a file is one unit.
    """
    name = file_name(path)
    f, zf = _open_zip(path)
    with f, zf:
        info = _member(zf, "X", path)
        shape, dtype, _ = _header(zf, info, path)
        deflated = info.compress_type != zipfile.ZIP_STORED
        if len(shape) != 3 or shape[2] != 4:
            raise BadRowError(name, None, "X", f"shape {list(shape)}, expected (N, M, 4)")
        if max_unit_bytes:
            rows_per_unit = max(1, min(rows_per_unit, max_unit_bytes // max(1, shape[1] * 4 * dtype.itemsize)))
        if deflated and not split_deflated:
            rows_per_unit = max(shape[0], 1)
        n_labels = len(_labels(zf, path))
    n = shape[0]
    if max(n, n_labels) == 0:
        raise BadRowError(name, None, "<file>", "file has no rows")
    both = min(n, n_labels)
    field, reason = ("y", f"no label: y has {n_labels} entries, X has {n} rows") if n > n_labels else \
        ("X", f"no jet: X has {n} rows, y has {n_labels} entries")
    rejected = [Rejected(name, r, field, reason) for r in range(both, max(n, n_labels))]
    units = [dataclasses.replace(u, stream=deflated) for u in row_units(path, both, rows_per_unit)]
    return Plan(units, max(n, n_labels), rejected)


def _stored_data_offset(f: Any, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored member's data in the archive (after its local file header)."""
    f.seek(info.header_offset)
    local = f.read(30)
    if local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("bad local file header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def jet_axes(kin: np.ndarray, pid: np.ndarray) -> dict[str, np.ndarray]:
    """Per-jet pt, mass, rapidity, phi of padded clouds (B, P, 3) (same formulas as ``features.jet_kinematics``)."""
    e, px, py, pz = np.moveaxis(four_momenta(kin, pid).sum(axis=1), -1, 0)
    return _axes(e, px, py, pz)


def _axes(e: np.ndarray, px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> dict[str, np.ndarray]:
    mass = np.sqrt(np.maximum(e * e - px * px - py * py - pz * pz, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        rap = np.where(e > np.abs(pz), 0.5 * np.log((e + pz) / (e - pz)), 0.0)
    return {"pt": np.hypot(px, py), "mass": mass, "jet_y": rap, "jet_phi": np.arctan2(py, px)}


def flat_axes(kin: np.ndarray, pid: np.ndarray, jet: np.ndarray, n_jets: int) -> dict[str, np.ndarray]:
    """Per-jet pt, mass, rapidity, phi from the concatenated real particles ``kin`` (N, 3) of ``n_jets`` jets
    (the four-vector sum, in float64, as ``features.jet_kinematics``)."""
    pt, rap, phi = (np.ascontiguousarray(kin[:, i], dtype=np.float64) for i in range(3))
    mass, _ = mass_and_charge(pid)
    mt = np.sqrt(pt * pt + mass * mass)
    ey = np.exp(rap)
    half_inv = 0.5 / ey
    e = np.bincount(jet, weights=mt * (0.5 * ey + half_inv), minlength=n_jets)
    pz = np.bincount(jet, weights=mt * (0.5 * ey - half_inv), minlength=n_jets)
    px = np.bincount(jet, weights=pt * np.cos(phi), minlength=n_jets)
    py = np.bincount(jet, weights=pt * np.sin(phi), minlength=n_jets)
    return _axes(e, px, py, pz)


def decode_rows(x: np.ndarray, y: np.ndarray, rows: np.ndarray, name: str, labels: LabelConvention,
                dtype: str) -> Chunk:
    """Validate and encode rows ``rows`` of a file: ``x`` (k, M, 4) float64 and their labels ``y`` (k,).

    Vectorised: the padded block is scanned once for padding, every check then runs on the real particles of all
    rows together; only rejected rows are visited one by one (to name their problem).
    """
    k = len(x)
    finite = np.isfinite(x).all(axis=(1, 2))
    if not finite.all():
        x = np.where(np.isfinite(x), x, 0.0)
    # padding = all four entries 0; four strided compares beat (x != 0).any(-1)'s generic reduction 3x
    mask = (x[..., 0] != 0) | (x[..., 1] != 0) | (x[..., 2] != 0) | (x[..., 3] != 0)
    n = mask.sum(axis=1)
    particles = x.reshape(-1, 4)[np.flatnonzero(mask)]          # (N, 4), jet by jet, in source order
    jet = np.repeat(np.arange(k, dtype=np.int64), n)
    bad_pt, bad_y, bad_phi, bad_pid = (np.zeros(k, bool) for _ in range(4))
    bad_pt[jet[particles[:, 0] <= 0]] = True
    bad_y[jet[np.abs(particles[:, 1]) > MAX_RAPIDITY]] = True
    bad_phi[jet[(particles[:, 2] < PHI_RANGE[0]) | (particles[:, 2] > PHI_RANGE[1])]] = True
    bad_pid[jet[~known_pdg_ids(particles[:, 3])]] = True
    ok = finite & ~bad_pt & ~bad_y & ~bad_phi & ~bad_pid & (n > 0) & ((y == 0.0) | (y == 1.0))
    rejected = []
    for i in np.flatnonzero(~ok).tolist():
        if not finite[i]:
            problem = ("X", "NaN or inf")
        elif bad_pt[i]:
            problem = ("X", "particle with pt <= 0 that is not all-zero padding")
        elif bad_y[i]:
            problem = ("X", f"particle rapidity beyond +-{MAX_RAPIDITY}")
        elif bad_phi[i]:
            problem = ("X", "particle phi outside [-pi, 3 pi] (jet axis in [0, 2 pi), particles within pi of it)")
        elif bad_pid[i]:
            unknown = particles[jet == i, 3][~known_pdg_ids(particles[jet == i, 3])]
            problem = ("X", f"pdgid {unknown[0]:g} is not a known PDG particle id")
        elif n[i] == 0:
            problem = ("X", "jet has no particles")
        else:
            problem = ("y", f"label {float(y[i])!r} is not 0 or 1")
        rejected.append(Rejected(name, int(rows[i]), *problem))
    good = np.flatnonzero(ok)
    if len(good) < k:
        particles = particles[ok[jet]]
        n = n[good]
        jet = np.repeat(np.arange(len(good), dtype=np.int64), n)
    n = n.astype(np.int32)
    pid = particles[:, 3].astype(np.int32)
    if len(pid) and np.abs(pid).max() < 1 << 15:
        pid = pid.astype(np.int16)   # every common PDG id fits: half the bytes
    axes = flat_axes(particles[:, :3], pid, jet, len(good))
    kin, pid = sort_particles(particles[:, :3].astype(dtype), pid, n)
    jets = np.zeros(len(good), CLOUD_JET)
    jets["row"], jets["is_quark"], jets["n"] = rows[good], labels.is_quark(y[good]), n
    for key, values in axes.items():
        jets[key] = values
    return Chunk(CloudChunk(file=name, source="energyflow", jets=jets, dtype=dtype, kin=kin, pid=pid), rejected)


class _Unreadable(Exception):
    """A block of ``X`` could not be read (corrupt or truncated stream)."""


class InflateError(InputError):
    """A block that the file's streaming reader could not inflate; its text is the original error's
    ``"Type: message"``, so the rows it loses are reported as a unit's own read would report them."""


def read(unit: Unit, labels: LabelConvention, dtype: str = "float32", read_rows: int = 1024,
         rows: Rows | None = None) -> Iterator[Chunk]:
    """Yield the unit's rows in chunks of ``read_rows`` jets without loading ``X`` whole.

    ``rows``: the unit's raw rows, inflated ahead by the file's streaming reader (a ``stream`` unit); without them
    the unit reads its own rows from the file (a deflated member is inflated from its start).
    Helper threads read (for a deflated member: decompress) and validate the next blocks while this one is encoded
    and written: zlib and numpy release the GIL, so on spare cores the three stages overlap.
    """
    if rows is not None:
        yield from _decode(unit, labels, dtype, read_rows, rows.block, rows.y, unit.row_start, rows.row_shape,
                           np.dtype(rows.xdtype))
        return
    f, zf = _open_zip(unit.path)
    with f, zf:
        info = _member(zf, "X", unit.path)
        shape, xdtype, header = _header(zf, info, unit.path)
        y = _labels(zf, unit.path)
        row_bytes = int(np.prod(shape[1:])) * xdtype.itemsize
        if info.compress_type == zipfile.ZIP_STORED:
            stream: Any = f
            stream.seek(_stored_data_offset(f, info) + header + unit.row_start * row_bytes)
        else:
            stream = zf.open(info)
            stream.seek(header + unit.row_start * row_bytes)  # decompresses and discards the rows before the unit

        def block(lo: int, hi: int) -> bytes:
            data = stream.read((hi - lo) * row_bytes)
            if len(data) != (hi - lo) * row_bytes:
                raise EOFError(f"file ends after {len(data) // max(row_bytes, 1)} of {hi - lo} rows")
            return data

        with stream if stream is not f else nullcontext():
            yield from _decode(unit, labels, dtype, read_rows, block, y, 0, tuple(shape[1:]), xdtype)


def _decode(unit: Unit, labels: LabelConvention, dtype: str, read_rows: int, block: Any, y: np.ndarray,
            y_start: int, row_shape: tuple[int, ...], xdtype: np.dtype) -> Iterator[Chunk]:
    """The unit's chunks from ``block(lo, hi)`` (raw bytes of rows [lo, hi)) and labels ``y`` (from row
    ``y_start``), read and validated ahead by helper threads."""
    name = file_name(unit.path)

    def decoded(lo: int, data: Future) -> Chunk:
        hi = min(lo + read_rows, unit.row_stop)
        try:
            raw = data.result()
        except Exception as err:  # the stream cannot go on past a corrupt or truncated block
            text = str(err) if isinstance(err, InflateError) else f"{type(err).__name__}: {err}"
            raise _Unreadable(f"unreadable ({text})") from err
        x = np.frombuffer(raw, dtype=xdtype).reshape((hi - lo,) + row_shape)
        x = x if x.dtype == np.float64 else x.astype(np.float64)
        return decode_rows(x, y[lo - y_start:hi - y_start], np.arange(lo, hi), name, labels, dtype)

    # A pipeline of two helper threads, six blocks deep (~30 MB): one inflates block after block (the stream is
    # sequential), one validates them, while the caller encodes and writes; zlib and numpy release the GIL.
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as decoder:
        pending: deque[tuple[int, Future]] = deque()
        starts = iter(range(unit.row_start, unit.row_stop, read_rows))
        while True:
            while len(pending) < 6 and (lo := next(starts, None)) is not None:
                hi = min(lo + read_rows, unit.row_stop)
                pending.append((lo, decoder.submit(decoded, lo, reader.submit(block, lo, hi))))
            if not pending:
                return
            lo, result = pending.popleft()
            try:
                chunk = result.result()
            except _Unreadable as err:   # this block and every later one of the unit are lost
                for _, later in pending:
                    later.cancel()
                yield Chunk(rejected=[Rejected(name, r, "X", str(err)) for r in range(lo, unit.row_stop)])
                return
            yield chunk
