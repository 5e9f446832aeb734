"""Shard sample schema version 2: one tar sample is a **chunk** of jets from one source file, stored as columns.

A chunk holds up to ``chunk_jets`` jets (default 256) of one source file and one split, rows increasing (the writer
deals a window of consecutive jets to chunks by stride, see ``writer.ChunkWriter``). Its members share one key
(``{file}-r{first row:09d}``, no dots, so the stock ``webdataset`` library splits key and extension correctly).
Members are ``.npy`` (some gzipped, ``.npy.gz``) and ``.json`` only: the stock decoder returns numpy arrays and
dicts, and nothing in a shard is ever unpickled.

Members of a **cloud** chunk (EnergyFlow particle clouds), k jets holding N particles in all::

    meta.json   {"schema_version": 2, "kind": "cloud", "source", "file", "jets": k, "dtype"}
    jets.npy    (k,) structured, one record per jet: row <i8, is_quark u1, pt <f8, mass <f8, jet_y <f8,
                jet_phi <f8, n <i4 (the jet's true multiplicity)
    kin.npy     (N, 3) particle (pt, rapidity, phi), float32 or float16; jet i owns rows
                offsets[i]:offsets[i+1] with offsets = [0, cumsum(n)], its particles hardest first
    pid.npy     (N,) PDG id, int16 when every id of the chunk fits (all hadrons, leptons, photons), else int32

Members of an **image** chunk (CMS jet images stored sparse)::

    meta.json   {"schema_version": 2, "kind": "image", "source", "file", "jets": k, "dtype", "image_shape": [C, H, W]}
    jets.npy    (k,) structured: row <i8, is_quark u1, pt <f8, mass <f8, n <i4 (non-zero pixels)
    pix.npy.gz  (N,) flat indices of the non-zero pixels into each C*H*W image (uint16 when it fits, else int32)
    val.npy.gz  (N,) their values (float32, or float16 with ``dtype="float16"``)

``.npy.gz`` members are gzipped ``.npy`` (level 1): the stock decoder un-gzips them (its default ``gzfilter``)
and returns the array under the same key (``chunk["pix.npy.gz"]``). ``compress=False`` writes them as plain
``.npy``; readers take either.

``pt``/``mass`` are the jet's: the ``pt``/``m0`` columns for CMS, the constituents' four-vector sum for EnergyFlow
(computed from the float64 source, so exact whatever ``dtype``). float16 keeps ~3 significant digits: pT to 5e-4
relative, angles to ~0.002-0.004 absolute, image values to 5e-4 relative.

Every shard ends with one more member, ``<last key>.index.npy`` (so stock readers find it in the last chunk's
dict): an int64 (chunks, 3) array of every chunk's first byte, end byte and jets, which lets a reader fetch chunks
alone, in any order, by byte range. The manifest records where that member is.

Schema version 1 (one jet per tar sample, three members each) is not read any more: re-run ``qgdist convert``.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import numpy as np

from qgdist.core.errors import InputError

SCHEMA_VERSION = 2
#: The shard's last member, after its last chunk's (same key): the (chunks, 3) int64 index of
#: (first byte, end byte, jets) of every chunk in the tar.
INDEX_MEMBER = "index.npy"
#: Jets per chunk (tar sample) unless ``qgdist convert --chunk-jets`` says otherwise.
CHUNK_JETS = 256

CLOUD_JET = np.dtype([("row", "<i8"), ("is_quark", "u1"), ("pt", "<f8"), ("mass", "<f8"), ("jet_y", "<f8"),
                      ("jet_phi", "<f8"), ("n", "<i4")])
IMAGE_JET = np.dtype([("row", "<i8"), ("is_quark", "u1"), ("pt", "<f8"), ("mass", "<f8"), ("n", "<i4")])

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(file_name: str, row: int) -> str:
    """A tar key for the chunk of ``file_name`` starting at row ``row``: unique, sortable, and free of dots."""
    return f"{_KEY_UNSAFE.sub('_', file_name)}-r{row:09d}"


# -- per-jet views (tests, tools, users) ----------------------------------------------------------------------------
@dataclass
class ImageSample:
    """One jet image, sparse; ``dense()`` rebuilds the (C, H, W) float32 array."""

    meta: dict[str, Any]
    pix: np.ndarray
    val: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["image_shape"])  # type: ignore[return-value]

    def dense(self) -> np.ndarray:
        out = np.zeros(int(np.prod(self.shape)), dtype=np.float32)
        out[self.pix.astype(np.int64)] = self.val
        return out.reshape(self.shape)


@dataclass
class CloudSample:
    """One particle cloud with its true multiplicity: ``kin`` (n, 3) = (pt, rapidity, phi), ``pid`` (n,)."""

    meta: dict[str, Any]
    kin: np.ndarray
    pid: np.ndarray


Sample = Union[ImageSample, CloudSample]


# -- npy members ---------------------------------------------------------------------------------------------------
def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


_SIMPLE_HEADER = re.compile(rb"\{'descr': '([<>|][a-z]\d+)', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \}")


def load_npy(raw: bytes | memoryview | np.ndarray) -> np.ndarray:
    """An ``.npy`` member's array, read-only and without a copy where the header is a plain one (else ``np.load``)."""
    if isinstance(raw, np.ndarray):  # already decoded by webdataset's decoder
        return raw
    raw = bytes(raw) if isinstance(raw, memoryview) else raw
    if raw[:8] == b"\x93NUMPY\x01\x00":
        end = 10 + int.from_bytes(raw[8:10], "little")
        m = _SIMPLE_HEADER.match(raw, 10, end)
        if m is not None:
            shape = tuple(int(s) for s in m.group(2).split(b",") if s.strip())
            count = int(np.prod(shape)) if shape else 1
            return np.frombuffer(raw, dtype=m.group(1).decode(), count=count, offset=end).reshape(shape)
    return np.load(io.BytesIO(raw), allow_pickle=False)


def _ragged_index(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Flat indices of the runs ``[starts[i], starts[i] + counts[i])``, concatenated in order."""
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    shift = starts.astype(np.int64) - (np.cumsum(counts) - counts)
    return np.repeat(shift, counts) + np.arange(total, dtype=np.int64)


def offsets_of(n: np.ndarray) -> np.ndarray:
    """``[0, n0, n0+n1, ...]``: where each jet's particles (or pixels) start, plus the end."""
    out = np.zeros(len(n) + 1, dtype=np.int64)
    np.cumsum(n, out=out[1:])
    return out


# -- chunks --------------------------------------------------------------------------------------------------------
@dataclass
class JetChunk:
    """Columns of k jets: ``jets`` (structured, one record per jet) and the concatenated per-particle arrays.

    ``file`` is the source file of every jet (one name for a stored chunk; a per-jet object array for a batch
    gathered from several chunks).
    """

    kind: ClassVar[str] = ""
    PARTS: ClassVar[tuple[str, ...]] = ()
    COMPRESSED: ClassVar[tuple[str, ...]] = ()   # members written gzipped (``.npy.gz``) unless compress=False
    JET: ClassVar[np.dtype] = CLOUD_JET

    file: Any
    source: str
    jets: np.ndarray
    dtype: str = "float32"

    def __len__(self) -> int:
        return len(self.jets)

    @property
    def offsets(self) -> np.ndarray:
        return offsets_of(self.jets["n"])

    def parts(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.PARTS}

    def files(self) -> np.ndarray:
        """The source file of every jet (object array)."""
        if isinstance(self.file, np.ndarray):
            return self.file
        return np.array([self.file], dtype=object)[np.zeros(len(self), np.int64)]

    def _with(self, file: Any, jets: np.ndarray, parts: dict[str, np.ndarray]) -> "JetChunk":
        return type(self)(file=file, source=self.source, jets=jets, dtype=self.dtype, **parts, **self._extra())

    def _extra(self) -> dict[str, Any]:
        return {}

    def take(self, index: np.ndarray, limit: int | None = None) -> "JetChunk":
        """The jets ``index`` (in that order), each keeping at most its first ``limit`` particles (or pixels)."""
        index = np.asarray(index, dtype=np.int64)
        jets = self.jets[index]
        n = jets["n"].astype(np.int64)
        if limit is not None:
            n = np.minimum(n, limit)
            jets["n"] = n
        flat = _ragged_index(self.offsets[:-1][index], n)
        file = self.file[index] if isinstance(self.file, np.ndarray) else self.file
        return self._with(file, jets, {k: v[flat] for k, v in self.parts().items()})

    def slice(self, lo: int, hi: int) -> "JetChunk":
        """Jets ``lo:hi`` (views, no copy)."""
        if lo == 0 and hi >= len(self):
            return self
        off = self.offsets
        file = self.file[lo:hi] if isinstance(self.file, np.ndarray) else self.file
        return self._with(file, self.jets[lo:hi], {k: v[off[lo]:off[hi]] for k, v in self.parts().items()})

    @classmethod
    def concat(cls, chunks: list["JetChunk"]) -> "JetChunk":
        """One chunk holding the jets of ``chunks`` in order (``file`` per jet when they differ)."""
        if len(chunks) == 1:
            return chunks[0]
        first = chunks[0]
        names = {c.file for c in chunks if not isinstance(c.file, np.ndarray)}
        if len(names) == 1 and not any(isinstance(c.file, np.ndarray) for c in chunks):
            file: Any = first.file
        else:
            file = np.concatenate([c.files() for c in chunks])
        jets = np.concatenate([c.jets for c in chunks])
        parts = {k: np.concatenate([c.parts()[k] for c in chunks]) for k in first.PARTS}
        return first._with(file, jets, parts)

    @classmethod
    def gather(cls, chunks: list["JetChunk"], which: np.ndarray, jet: np.ndarray,
               limit: int | None = None) -> "JetChunk":
        """Jet ``jet[i]`` of ``chunks[which[i]]`` for every i, in that order, each keeping at most its first
        ``limit`` particles: one vectorised gather per chunk, copying only the jets taken."""
        if len(chunks) == 1:
            return chunks[0].take(jet, limit)
        first = chunks[0]
        which = np.asarray(which, dtype=np.int64)
        jet = np.asarray(jet, dtype=np.int64)
        jets = np.empty(len(jet), first.jets.dtype)
        src_start = np.empty(len(jet), np.int64)
        for c, chunk in enumerate(chunks):
            mine = which == c
            jets[mine] = chunk.jets[jet[mine]]
            src_start[mine] = chunk.offsets[jet[mine]]
        n = jets["n"].astype(np.int64)
        if limit is not None:
            n = np.minimum(n, limit)
            jets["n"] = n
        dst = offsets_of(n)
        parts = {k: np.empty((int(dst[-1]),) + v.shape[1:], v.dtype) for k, v in first.parts().items()}
        for c, chunk in enumerate(chunks):
            mine = np.flatnonzero(which == c)
            src_idx = _ragged_index(src_start[mine], n[mine])
            dst_idx = _ragged_index(dst[mine], n[mine])
            for k, v in chunk.parts().items():
                parts[k][dst_idx] = v[src_idx]
        names = [c.file for c in chunks]
        if any(isinstance(f, np.ndarray) for f in names):
            file: Any = np.concatenate([c.files() for c in chunks])[offsets_of([len(c) for c in chunks])[which] + jet]
        elif len(set(names)) == 1:
            file = names[0]
        else:
            file = np.array(names, dtype=object)[which]
        return first._with(file, jets, parts)

    # -- the tar members -------------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "kind": self.kind, "source": self.source, "file": str(self.file),
                "jets": len(self), "dtype": self.dtype}

    def encode(self, key: str | None = None, compress: bool = True) -> dict[str, Any]:
        """The WebDataset dict (``__key__`` plus member name -> bytes) of this chunk; with ``compress`` the
        ``COMPRESSED`` members are gzipped (level 1, mtime 0: the same chunk always gives the same bytes)."""
        if isinstance(self.file, np.ndarray):
            raise ValueError("a stored chunk holds jets of one source file")
        key = key if key is not None else sample_key(self.file, int(self.jets["row"][0]) if len(self) else 0)
        out: dict[str, Any] = {"__key__": key, "meta.json": json.dumps(self.meta(), sort_keys=True).encode(),
                               "jets.npy": npy_bytes(np.ascontiguousarray(self.jets, dtype=self.JET))}
        for name, array in self.parts().items():
            data = npy_bytes(np.ascontiguousarray(array))
            if compress and name in self.COMPRESSED:
                out[f"{name}.npy.gz"] = gzip.compress(data, compresslevel=1, mtime=0)
            else:
                out[f"{name}.npy"] = data
        return out

    # -- per-jet views ---------------------------------------------------------------------------------------------
    def jet(self, i: int) -> Sample:
        raise NotImplementedError

    def samples(self) -> list[Sample]:
        """Every jet as a per-jet view (for tests and tools; the pipeline itself works on whole chunks)."""
        return [self.jet(i) for i in range(len(self))]

    def _meta(self, i: int) -> dict[str, Any]:
        rec = self.jets[i]
        file = self.file[i] if isinstance(self.file, np.ndarray) else self.file
        return {"is_quark": int(rec["is_quark"]), "pt": float(rec["pt"]), "mass": float(rec["mass"]),
                "file": file, "row": int(rec["row"]), "source": self.source}


@dataclass
class CloudChunk(JetChunk):
    """Particle clouds: ``kin`` (N, 3) (pt, rapidity, phi) and ``pid`` (N,), each jet's particles hardest first."""

    kind: ClassVar[str] = "cloud"
    PARTS: ClassVar[tuple[str, ...]] = ("kin", "pid")
    COMPRESSED: ClassVar[tuple[str, ...]] = ()   # random floats; ids are int16 already (gzip: 2x smaller, 1 us/jet)
    JET: ClassVar[np.dtype] = CLOUD_JET

    kin: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))
    pid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    def jet(self, i: int) -> CloudSample:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        rec = self.jets[i]
        meta = self._meta(i) | {"jet_y": float(rec["jet_y"]), "jet_phi": float(rec["jet_phi"]), "n": int(rec["n"])}
        return CloudSample(meta, self.kin[lo:hi], self.pid[lo:hi])


@dataclass
class ImageChunk(JetChunk):
    """Sparse images: ``pix`` (N,) flat indices into each C*H*W image and ``val`` (N,) their values."""

    kind: ClassVar[str] = "image"
    PARTS: ClassVar[tuple[str, ...]] = ("pix", "val")
    COMPRESSED: ClassVar[tuple[str, ...]] = ("pix", "val")   # sorted indices, repeated HCAL tower values
    JET: ClassVar[np.dtype] = IMAGE_JET

    pix: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    image_shape: tuple[int, int, int] = (3, 125, 125)

    def _extra(self) -> dict[str, Any]:
        return {"image_shape": self.image_shape}

    def meta(self) -> dict[str, Any]:
        return super().meta() | {"image_shape": [int(s) for s in self.image_shape]}

    def jet(self, i: int) -> ImageSample:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return ImageSample(self._meta(i) | {"image_shape": list(self.image_shape)}, self.pix[lo:hi], self.val[lo:hi])

    def dense(self) -> np.ndarray:
        """All images as (k, C, H, W) float32."""
        size = int(np.prod(self.image_shape))
        out = np.zeros(len(self) * size, np.float32)
        out[self.pix.astype(np.int64) + np.repeat(np.arange(len(self), dtype=np.int64) * size, self.jets["n"])] = \
            self.val
        return out.reshape(len(self), *self.image_shape)


CHUNK_TYPES: dict[str, type[JetChunk]] = {"cloud": CloudChunk, "image": ImageChunk}


class SchemaError(InputError):
    """A shard sample this qgdist cannot read (an older schema, or not a qgdist chunk)."""


def _as_meta(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else json.loads(value)


def chunk_jets(members: dict[str, Any] | JetChunk) -> int:
    """Number of jets in a chunk, from its small ``meta.json`` alone (nothing else is decoded)."""
    if isinstance(members, JetChunk):
        return len(members)
    return int(_check(members)["jets"])


def _check(members: dict[str, Any]) -> dict[str, Any]:
    if "meta.json" not in members or "jets.npy" not in members:
        where = f"{members.get('__url__', '?')}: sample {members.get('__key__', '?')!r}"
        raise SchemaError(f"{where} is not a schema-{SCHEMA_VERSION} chunk (members {sorted(members)}): it was "
                          "written by an older qgdist (schema 1, one jet per sample); re-run `qgdist convert` on "
                          "the source files")
    meta = _as_meta(members["meta.json"])
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise SchemaError(f"{members.get('__url__', '?')}: schema_version {meta.get('schema_version')!r}, this "
                          f"qgdist reads {SCHEMA_VERSION}: re-run `qgdist convert`")
    return meta


def _member(members: dict[str, Any], name: str) -> np.ndarray:
    if f"{name}.npy" in members:
        return load_npy(members[f"{name}.npy"])
    raw = members[f"{name}.npy.gz"]
    return raw if isinstance(raw, np.ndarray) else load_npy(zlib.decompress(raw, 31))


def decode_chunk(members: dict[str, Any] | JetChunk) -> JetChunk:
    """A chunk from its WebDataset dict, raw (bytes) or already decoded by webdataset's default decoder."""
    if isinstance(members, JetChunk):
        return members
    try:
        meta = _check(members)
        cls = CHUNK_TYPES[meta["kind"]]
        parts = {name: _member(members, name) for name in cls.PARTS}
        extra = {"image_shape": tuple(int(s) for s in meta["image_shape"])} if cls is ImageChunk else {}
        return cls(file=meta["file"], source=meta["source"], jets=load_npy(members["jets.npy"]),
                   dtype=meta.get("dtype", "float32"), **parts, **extra)
    except SchemaError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, EOFError, zlib.error) as err:   # damaged member bytes
        url = members.get("__url__", "?")
        raise InputError(f"{url}: chunk {members.get('__key__', '?')}: cannot be decoded ({type(err).__name__}: "
                         f"{err})", file=url,
                         hint="re-run `qgdist convert` to rewrite the dataset (`qgdist inspect DIR --verify` lists "
                              "every shard whose sha256 no longer matches the manifest)") from err


def sort_particles(kin: np.ndarray, pid: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each jet's particles hardest first (pt descending as stored; ties keep their source order).

    Sources usually list particles hardest first already: that is checked in one pass, and only the jets that are
    not are sorted.
    """
    if len(kin) == 0:
        return kin, pid
    pt = kin[:, 0].astype(np.float32)
    rises = np.flatnonzero(pt[1:] > pt[:-1]) + 1            # particle i is harder than particle i-1 ...
    starts = offsets_of(n)[:-1]
    rises = rises[~np.isin(rises, starts)]                  # ... within the same jet
    if not len(rises):
        return kin, pid
    seg = np.repeat(np.arange(len(n), dtype=np.int64), n)
    todo = np.unique(seg[rises])
    idx = _ragged_index(starts[todo], n[todo])
    order = idx[np.lexsort((-pt[idx], seg[idx]))]
    kin, pid = kin.copy(), pid.copy()
    kin[idx], pid[idx] = kin[order], pid[order]
    return kin, pid
