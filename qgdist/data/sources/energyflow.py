"""Streaming reader of EnergyFlow quark/gluon npz files (``X`` (N, M, 4) = pt, rapidity, phi, pdgid; ``y``).

An npz is a zip of ``.npy`` members. ``X`` is never loaded whole: its shape and dtype come from the npy header
inside the zip, and a unit reads only its own rows. For a stored (uncompressed) member we seek straight to the
rows in the archive; for a deflated member we stream through zipfile's decompressing reader (which decompresses
and discards what lies before the unit) and then read the unit chunk by chunk, so memory stays at one chunk.
``y`` is small (8 bytes a jet) and read whole. Zero padding (particles whose four entries are all 0) is dropped.
"""

from __future__ import annotations

import struct
import zipfile
from contextlib import nullcontext
from collections.abc import Iterator
from typing import Any

import numpy as np

from qgdist.data.features import four_momenta, mass_and_charge
from qgdist.data.labels import LabelConvention
from qgdist.data.shards.schema import CloudSample
from qgdist.data.sources.base import Chunk, Plan, Unit, file_name, open_input, row_units
from qgdist.data.sources.errors import BadRowError, Rejected

#: Rapidities beyond this are corrupt data, not particles (cosh would overflow on the way to energies).
MAX_RAPIDITY = 10.0


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


def plan(path: str, rows_per_unit: int) -> Plan:
    """Row-range units from the npy header of ``X``; rows beyond the shorter of X and y are rejected here."""
    name = file_name(path)
    f, zf = _open_zip(path)
    with f, zf:
        shape, _, _ = _header(zf, _member(zf, "X", path), path)
        if len(shape) != 3 or shape[2] != 4:
            raise BadRowError(name, None, "X", f"shape {list(shape)}, expected (N, M, 4)")
        n_labels = len(_labels(zf, path))
    n = shape[0]
    if max(n, n_labels) == 0:
        raise BadRowError(name, None, "<file>", "file has no rows")
    both = min(n, n_labels)
    field, reason = ("y", f"no label: y has {n_labels} entries, X has {n} rows") if n > n_labels else \
        ("X", f"no jet: X has {n} rows, y has {n_labels} entries")
    rejected = [Rejected(name, r, field, reason) for r in range(both, max(n, n_labels))]
    return Plan(row_units(path, both, rows_per_unit), max(n, n_labels), rejected)


def _stored_data_offset(f: Any, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored member's data in the archive (after its local file header)."""
    f.seek(info.header_offset)
    local = f.read(30)
    if local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("bad local file header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _known_pids(pid: np.ndarray) -> np.ndarray:
    """Element-wise: is this an integral PDG id the particle table knows (0 = padding counts as known)?"""
    ids = np.unique(pid)
    known = np.zeros(len(ids), dtype=bool)
    for i, v in enumerate(ids.tolist()):
        if v == int(v) and abs(v) < 10**8:
            try:
                mass_and_charge(np.array([int(v)]))
                known[i] = True
            except Exception:  # the particle package raises its own errors for ids that cannot exist
                pass
    return known[np.searchsorted(ids, pid)]


def jet_axes(kin: np.ndarray, pid: np.ndarray) -> dict[str, np.ndarray]:
    """Per-jet pt, mass, rapidity, phi of padded clouds (B, P, 3) (same formulas as ``features.jet_kinematics``)."""
    e, px, py, pz = np.moveaxis(four_momenta(kin, pid).sum(axis=1), -1, 0)
    mass = np.sqrt(np.maximum(e * e - px * px - py * py - pz * pz, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        rap = np.where(e > np.abs(pz), 0.5 * np.log((e + pz) / (e - pz)), 0.0)
    return {"pt": np.hypot(px, py), "mass": mass, "jet_y": rap, "jet_phi": np.arctan2(py, px)}


def decode_rows(x: np.ndarray, y: np.ndarray, rows: np.ndarray, name: str, labels: LabelConvention,
                dtype: str) -> Chunk:
    """Validate and encode rows ``rows`` of a file: ``x`` (k, M, 4) float64 and their labels ``y`` (k,)."""
    chunk = Chunk()
    finite = np.isfinite(x).all(axis=(1, 2))
    x = np.where(np.isfinite(x), x, 0.0)
    mask = (x != 0).any(axis=-1)
    bad_pt = (mask & (x[..., 0] <= 0)).any(axis=1)
    bad_y = (mask & (np.abs(x[..., 1]) > MAX_RAPIDITY)).any(axis=1)
    bad_pid = ~_known_pids(np.where(mask, x[..., 3], 0.0)).all(axis=1)
    n = mask.sum(axis=1)
    ok = finite & ~bad_pt & ~bad_y & ~bad_pid
    pid = np.where(mask & ok[:, None], x[..., 3], 0).astype(np.int32)
    axes = jet_axes(np.where(ok[:, None, None], x[..., :3], 0.0), pid)
    for i, row in enumerate(rows.tolist()):
        problem = None
        if not finite[i]:
            problem = ("X", "NaN or inf")
        elif bad_pt[i]:
            problem = ("X", "particle with pt <= 0 that is not all-zero padding")
        elif bad_y[i]:
            problem = ("X", f"particle rapidity beyond +-{MAX_RAPIDITY}")
        elif bad_pid[i]:
            problem = ("X", "pdgid is not a known PDG particle id")
        elif n[i] == 0:
            problem = ("X", "jet has no particles")
        elif y[i] not in (0.0, 1.0):
            problem = ("y", f"label {float(y[i])!r} is not 0 or 1")
        if problem:
            chunk.rejected.append(Rejected(name, row, *problem))
            continue
        keep = mask[i]
        meta = {"is_quark": int(labels.is_quark(y[i])), "file": name, "row": row, "source": "energyflow",
                "n": int(n[i]), **{k: float(v[i]) for k, v in axes.items()}}
        chunk.rows.append(row)
        chunk.samples.append(CloudSample(meta, x[i, keep, :3].astype(dtype), pid[i, keep]))
    return chunk


def read(unit: Unit, labels: LabelConvention, dtype: str = "float32", read_rows: int = 1024) -> Iterator[Chunk]:
    """Yield the unit's rows in chunks of ``read_rows`` jets without loading ``X`` whole."""
    name = file_name(unit.path)
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
        with stream if stream is not f else nullcontext():
            for lo in range(unit.row_start, unit.row_stop, read_rows):
                hi = min(lo + read_rows, unit.row_stop)
                try:
                    data = stream.read((hi - lo) * row_bytes)
                    if len(data) != (hi - lo) * row_bytes:
                        raise EOFError(f"file ends after {len(data) // max(row_bytes, 1)} of {hi - lo} rows")
                except Exception as err:  # the stream cannot go on past a corrupt or truncated block
                    reason = f"unreadable ({type(err).__name__}: {err})"
                    yield Chunk(rejected=[Rejected(name, r, "X", reason) for r in range(lo, unit.row_stop)])
                    return
                x = np.frombuffer(data, dtype=xdtype).reshape((hi - lo,) + tuple(shape[1:])).astype(np.float64)
                yield decode_rows(x, y[lo:hi], np.arange(lo, hi), name, labels, dtype)

