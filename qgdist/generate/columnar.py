"""Writers of the weaver / ParT columnar layout: ROOT TTrees, jagged parquet and HDF5, from particle clouds.

The layout is the one the ParT authors' quark/gluon converter writes (jet-universe/particle_transformer
``utils/convert_qg_datasets.py``), and JetClass uses the same branch names in ROOT: it takes EnergyFlow clouds of
(pt, rapidity, phi, pdgid), sorts each jet's particles by pt (hardest first), treats rapidity as pseudorapidity with
zero mass (so ``part_energy = pt cosh(y)``) and writes, in float32 as the converter does:

* per jet: ``label`` (1 = quark, the EnergyFlow ``y``), ``jet_pt``, ``jet_eta``, ``jet_phi``, ``jet_energy``,
  ``jet_mass``, ``jet_nparticles``;
* per particle: ``part_px``, ``part_py``, ``part_pz``, ``part_energy``, ``part_deta``, ``part_dphi``, ``part_pid``,
  ``part_isChargedHadron``, ``part_isNeutralHadron``, ``part_isPhoton``, ``part_isElectron``, ``part_isMuon``,
  ``part_charge``.

File formats (``FORMATS``): ``root`` (a TTree named ``tree``, one basket per 4,096 entries, jagged branches with
uproot's counter ``npart``), ``parquet-jagged`` (list columns, row groups of 4,096 jets, LZ4) and ``h5`` (weaver's
PyTables-readable layout: one dataset per branch, per-particle ones zero-padded to the file's longest jet, with
``jet_nparticles`` telling the real lengths). Every writer is atomic (temporary name, then rename).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qgdist.core.atomic import atomic_path
from qgdist.data.features import mass_and_charge

#: ``--format`` values of ``qgdist generate`` that write this layout, and their file extensions.
FORMATS = {"root": ".root", "parquet-jagged": ".parquet", "h5": ".h5"}
TREE = "tree"
ROWS_PER_BLOCK = 4096   # entries per ROOT basket / parquet row group / HDF5 chunk

_CHARGED_HADRONS = (211, 321, 2212)
_NEUTRAL_HADRONS = (130, 2112, 310, 3122)


def part_layout(clouds: list[np.ndarray], label: np.ndarray, dtype: Any = np.float32) -> dict[str, Any]:
    """The ParT quark/gluon branches of ``clouds`` (per jet an (n, 4) array of pt, rapidity, phi, pdgid) with
    raw labels ``label``: per-jet arrays (N,) and per-particle (values (P,), counts (N,)) pairs."""
    n = np.array([len(c) for c in clouds], np.int64)
    flat = np.concatenate(clouds) if clouds else np.zeros((0, 4))
    jet = np.repeat(np.arange(len(clouds)), n)
    order = np.lexsort((-flat[:, 0], jet))            # hardest first within each jet (stable for ties)
    pt, eta, phi, pid = (flat[order, i] for i in range(4))
    px, py, pz, e = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta), pt * np.cosh(eta)   # massless
    sums = [np.bincount(jet, w, minlength=len(clouds)) for w in (px, py, pz, e)]
    jpx, jpy, jpz, je = sums
    jet_pt = np.hypot(jpx, jpy)
    jet_eta = np.arcsinh(np.divide(jpz, jet_pt, out=np.zeros_like(jpz), where=jet_pt > 0))
    jet_phi = np.arctan2(jpy, jpx)
    jet_mass = np.sqrt(np.maximum(je * je - jpx * jpx - jpy * jpy - jpz * jpz, 0.0))
    sign = np.where(jet_eta >= 0, 1.0, -1.0)
    ipid = pid.astype(np.int64)
    apid = np.abs(ipid)
    _, charge = mass_and_charge(ipid)
    per_particle = {
        "part_px": px, "part_py": py, "part_pz": pz, "part_energy": e,
        "part_deta": (eta - jet_eta[jet]) * sign[jet],
        "part_dphi": np.mod(phi - jet_phi[jet] + np.pi, 2 * np.pi) - np.pi,
        "part_pid": ipid.astype(np.int32),
        "part_isChargedHadron": np.isin(apid, _CHARGED_HADRONS), "part_isNeutralHadron": np.isin(apid, _NEUTRAL_HADRONS),
        "part_isPhoton": apid == 22, "part_isElectron": apid == 11, "part_isMuon": apid == 13, "part_charge": charge,
    }
    out: dict[str, Any] = {"label": np.asarray(label).astype(np.int32), "jet_pt": jet_pt, "jet_eta": jet_eta,
                           "jet_phi": jet_phi, "jet_energy": je, "jet_mass": jet_mass,
                           "jet_nparticles": n.astype(np.int32)}
    for key in ("jet_pt", "jet_eta", "jet_phi", "jet_energy", "jet_mass"):
        out[key] = out[key].astype(dtype)
    for key, values in per_particle.items():
        values = values if values.dtype == np.int32 else values.astype(dtype)
        out[key] = (values, n)
    return out


def _jagged(values: np.ndarray, counts: np.ndarray) -> Any:
    import awkward as ak

    return ak.unflatten(values, counts)


def write_root(path: str, branches: Mapping[str, Any], tree: str = TREE) -> None:
    """A TTree of ``branches`` (per-jet arrays, or (values, counts) for jagged ones), one basket per block."""
    import awkward as ak
    import uproot

    shared = next((v[1] for k, v in branches.items() if isinstance(v, tuple) and k.startswith("part_")), None)

    def zipped(k: str, v: Any) -> bool:   # part_* branches of the same lengths share one counter
        return isinstance(v, tuple) and k.startswith("part_") and np.array_equal(v[1], shared)

    jagged = {k.removeprefix("part_"): _jagged(*v) for k, v in branches.items() if zipped(k, v)}
    other_jagged = {k: _jagged(*v) for k, v in branches.items() if isinstance(v, tuple) and not zipped(k, v)}
    flat = {k: np.asarray(v) for k, v in branches.items() if not isinstance(v, tuple)}
    data: dict[str, Any] = {**flat, **other_jagged}
    if jagged:
        data["part"] = ak.zip(jagged)            # branches part_px, ... sharing one counter, npart
    rows = len(next(iter(flat.values()))) if flat else len(next(iter(data.values())))
    with atomic_path(path) as tmp:
        with uproot.recreate(tmp, compression=uproot.LZ4(4)) as f:
            out = f.mktree(tree, {k: v.type if isinstance(v, ak.Array) else v.dtype for k, v in data.items()})
            for lo in range(0, rows, ROWS_PER_BLOCK):
                out.extend({k: v[lo:lo + ROWS_PER_BLOCK] for k, v in data.items()})


def write_parquet(path: str, branches: Mapping[str, Any]) -> None:
    """Jagged list columns (as awkward writes them), row groups of ``ROWS_PER_BLOCK`` jets, LZ4."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {}
    for key, v in branches.items():
        if isinstance(v, tuple):
            values, counts = v
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            columns[key] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        else:
            columns[key] = pa.array(np.asarray(v))
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp, row_group_size=ROWS_PER_BLOCK, compression="lz4")


def write_h5(path: str, branches: Mapping[str, Any]) -> None:
    """One dataset per branch; per-particle ones zero-padded to (jets, longest jet), chunked and gzipped."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key, v in branches.items():
            if isinstance(v, tuple):
                values, counts = v
                width = max(int(counts.max()) if len(counts) else 0, 1)
                padded = np.zeros((len(counts), width), values.dtype)
                padded[np.arange(width)[None, :] < counts[:, None]] = values
                chunks = (min(len(counts), ROWS_PER_BLOCK) or 1, width)
                f.create_dataset(key, data=padded, chunks=chunks, compression="gzip", compression_opts=4)
            else:
                f.create_dataset(key, data=np.asarray(v))


def write(path: str, fmt: str, branches: Mapping[str, Any]) -> None:
    """Write ``branches`` to ``path`` in ``fmt`` (a key of ``FORMATS``)."""
    if fmt == "root":
        write_root(path, branches)
    elif fmt == "parquet-jagged":
        write_parquet(path, branches)
    elif fmt == "h5":
        write_h5(path, branches)
    else:
        raise ValueError(f"format: expected one of {sorted(FORMATS)}, got {fmt!r}")


def write_clouds(path: str, fmt: str, clouds: list[np.ndarray], label: np.ndarray) -> None:
    """EnergyFlow clouds (per jet (n, 4) pt, rapidity, phi, pdgid) and raw labels in the ParT layout."""
    write(path, fmt, part_layout(clouds, label))
