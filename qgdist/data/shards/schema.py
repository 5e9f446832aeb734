"""One sample in a shard: its tar members, and how to turn them back into arrays.

Every sample is a group of contiguous tar members sharing one key (no dots in keys, so the stock
``webdataset`` library splits key and extension correctly). Members are ``.npy`` and ``.json`` only: the stock
decoder returns them as numpy arrays and dicts, and nothing in a shard is ever unpickled.

Members of an **image** sample (CMS jet images)::

    meta.json       {"is_quark", "pt", "mass", "file", "row", "source", "image_shape": [C, H, W]}
    pix.npy         flat indices of the non-zero pixels into the C*H*W image (uint16 when it fits, else int32)
    val.npy         their values (float32, or float16 with ``dtype="float16"``)

Members of a **cloud** sample (EnergyFlow particle clouds), with the jet's true multiplicity n (no padding)::

    meta.json       {"is_quark", "pt", "mass", "file", "row", "source", "jet_y", "jet_phi", "n"}
    kin.npy         (n, 3) particle (pt, rapidity, phi), float32 or float16
    pid.npy         (n,) PDG id, int32

``pt``/``mass`` are the jet's: the ``pt``/``m0`` columns for CMS, the constituents' four-vector sum for EnergyFlow.
float16 keeps ~3 significant digits: pT to 5e-4 relative, angles to ~0.002-0.004 absolute (finer than one
0.0174-wide ECAL crystal), image values to 5e-4 relative.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

SCHEMA_VERSION = 1

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(file_name: str, row: int) -> str:
    """A tar key for row ``row`` of ``file_name``: unique, sortable, and free of dots."""
    return f"{_KEY_UNSAFE.sub('_', file_name)}-r{row:09d}"


@dataclass
class ImageSample:
    """A jet image stored sparse; ``dense()`` rebuilds the (C, H, W) float32 array."""

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

    @classmethod
    def from_dense(cls, image: np.ndarray, meta: dict[str, Any], dtype: str = "float32") -> "ImageSample":
        flat = np.ascontiguousarray(image, dtype=np.float32).reshape(-1)
        pix = np.flatnonzero(flat)
        index_dtype = np.uint16 if flat.size <= np.iinfo(np.uint16).max + 1 else np.int32
        meta = {**meta, "image_shape": [int(s) for s in image.shape]}
        return cls(meta, pix.astype(index_dtype), flat[pix].astype(dtype))


@dataclass
class CloudSample:
    """A particle cloud with its true multiplicity: ``kin`` (n, 3) = (pt, rapidity, phi), ``pid`` (n,)."""

    meta: dict[str, Any]
    kin: np.ndarray
    pid: np.ndarray


Sample = Union[ImageSample, CloudSample]


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encode_sample(key: str, sample: Sample) -> dict[str, Any]:
    """The WebDataset dict (``__key__`` plus member name -> bytes) for one sample."""
    out: dict[str, Any] = {"__key__": key, "meta.json": json.dumps(sample.meta, sort_keys=True).encode()}
    if isinstance(sample, ImageSample):
        out["pix.npy"] = _npy_bytes(sample.pix)
        out["val.npy"] = _npy_bytes(sample.val)
    else:
        out["kin.npy"] = _npy_bytes(sample.kin)
        out["pid.npy"] = _npy_bytes(sample.pid)
    return out


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    return np.load(io.BytesIO(value), allow_pickle=False)


def _as_meta(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    return json.loads(value)


def decode_sample(members: dict[str, Any]) -> Sample:
    """Rebuild a sample from a WebDataset dict, raw (bytes) or already decoded by webdataset's default decoder."""
    meta = _as_meta(members["meta.json"])
    if "pix.npy" in members:
        return ImageSample(meta, _as_array(members["pix.npy"]), _as_array(members["val.npy"]))
    return CloudSample(meta, _as_array(members["kin.npy"]), _as_array(members["pid.npy"]))
