"""Schema 1, kept for ``qgdist bench loader``'s comparison only: its writer (one jet per tar sample: json
metadata and npy arrays) and a copy of the previous loader (webdataset's sample shuffle buffer, per-jet json and
npy parsing, argsort and padding loops, torch.zeros densification). The product loader refuses schema 1.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any


def write_schema1(data: str, out: str, sort_by_label: bool = False) -> str:
    """Write the jets of a schema-2 dataset as schema-1 shards (same shard names, same jets, one tar sample each,
    in source-row order; ``sort_by_label``: by label first, as from a class-ordered source)."""
    import tarfile

    import numpy as np

    from qgdist.data.loader import read_shard
    from qgdist.data.shards.manifest import read_manifest
    from qgdist.data.shards.schema import decode_chunk, npy_bytes

    os.makedirs(out, exist_ok=True)
    for shard in read_manifest(data).shards:
        jets = [j for raw in read_shard(os.path.join(data, shard.name)) for j in decode_chunk(raw).samples()]
        # in source-row order, as the schema-1 converter wrote them (schema 2 deals rows to chunks by stride);
        # for a class-ordered source, that order is by class
        jets.sort(key=lambda j: (j.meta["is_quark"] if sort_by_label else 0, j.meta["file"], j.meta["row"]))
        # as the schema-1 writer wrote them: GNU tar, fixed owner and integer mtime (no PAX headers), members sorted,
        # particles as the source had them (pid int32)
        with tarfile.open(os.path.join(out, shard.name), "w", format=tarfile.GNU_FORMAT) as tar:
            for i, j in enumerate(jets):
                meta = dict(j.meta)
                members = {"meta.json": json.dumps(meta, sort_keys=True).encode()}
                if hasattr(j, "kin"):
                    members |= {"kin.npy": npy_bytes(np.asarray(j.kin)),
                                "pid.npy": npy_bytes(np.asarray(j.pid, dtype=np.int32))}
                else:
                    members |= {"pix.npy": npy_bytes(np.asarray(j.pix)), "val.npy": npy_bytes(np.asarray(j.val))}
                key = f"{meta['file'].replace('.', '_')}-r{meta['row']:09d}"
                for ext in sorted(members):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(members[ext])
                    info.mode, info.mtime, info.uname, info.gname = 0o644, 0, "qgdist", "qgdist"
                    tar.addfile(info, io.BytesIO(members[ext]))
    return out


def write_sorted(data: str, out: str, across: bool = False) -> str:
    """A schema-2 copy of ``data`` whose jets are sorted by label: within each shard (a class-ordered source file),
    or ``across`` the shards of each split (whole files of one class), keeping every shard's size."""
    import numpy as np

    from qgdist.data.loader import read_shard
    from qgdist.data.shards.manifest import read_manifest, write_manifest
    from qgdist.data.shards.schema import decode_chunk
    from qgdist.data.shards.writer import ChunkWriter, ShardWriter

    manifest = read_manifest(data)
    blocks = {}
    for shard in manifest.shards:
        chunks = [decode_chunk(raw) for raw in read_shard(os.path.join(data, shard.name))]
        blocks[shard.name] = type(chunks[0]).concat(chunks)
    if across:
        for split in ("train", "val", "test"):
            names = [s.name for s in manifest.shards_of(split)]
            if not names:
                continue
            whole = type(blocks[names[0]]).concat([blocks[n] for n in names])
            files = whole.files().astype(str)
            whole = whole.take(np.lexsort((files, whole.jets["is_quark"])))   # by class, then by file
            lo = 0
            for n in names:
                blocks[n], lo = whole.slice(lo, lo + len(blocks[n])), lo + len(blocks[n])
    shards = []
    for shard in manifest.shards:
        block = blocks[shard.name]
        if not across:
            block = block.take(np.argsort(block.jets["is_quark"], kind="stable"))
        writer = ChunkWriter(ShardWriter(out, shard.split, lambda k, n=shard.name: n), manifest.chunk_jets)
        files = block.files().astype(str)
        cuts = np.flatnonzero(files[1:] != files[:-1]) + 1   # a chunk holds jets of one source file
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(block)]):
            run = block.slice(int(lo), int(hi))
            if isinstance(run.file, np.ndarray):
                run = type(run)(**{**run.__dict__, "file": str(run.file[0])})
            writer.add(run)
            writer.flush()
        shards += writer.close()
    write_manifest(type(manifest)(**{**manifest.__dict__, "shards": shards}), out)
    return out


def _v1_mass_and_charge(pid: Any) -> tuple[Any, Any]:
    """The previous ``features.mass_and_charge``: one lookup per distinct id, found with np.unique."""
    import numpy as np

    from qgdist.data.features import pdg_lookup

    pid = np.asarray(pid).astype(np.int64)
    ids, inverse = np.unique(pid, return_inverse=True)
    table = np.array([pdg_lookup(int(i)) or (0.0, 0.0) for i in ids], dtype=np.float64).reshape(-1, 2)
    return table[inverse, 0].reshape(pid.shape), table[inverse, 1].reshape(pid.shape)


def _v1_particle_features(kin: Any, pid: Any, mask: Any, jet_y: Any, jet_phi: Any, preset: str) -> tuple[Any, Any]:
    """The previous ``features.particle_features`` (float64 on the padded arrays), verbatim."""
    import numpy as np

    from qgdist.data.features import _CHARGED_HADRONS, _NEUTRAL_HADRONS

    pt = np.where(mask, kin[..., 0], 1.0).astype(np.float64)
    rap, phi = kin[..., 1].astype(np.float64), kin[..., 2].astype(np.float64)
    mass, charge = _v1_mass_and_charge(np.where(mask, pid, 0))
    energy = np.sqrt(pt**2 + mass**2) * np.cosh(rap)
    deta = rap - jet_y[:, None]
    dphi = (phi - jet_phi[:, None] + np.pi) % (2 * np.pi) - np.pi
    m = mask.astype(np.float64)
    jet_pt = (pt * m).sum(axis=1, keepdims=True)
    jet_e = (energy * m).sum(axis=1, keepdims=True)
    cols = [deta, dphi, np.log(pt), np.log(energy), np.log(pt / np.maximum(jet_pt, 1e-9)),
            np.log(energy / np.maximum(jet_e, 1e-9)), np.hypot(deta, dphi)]
    if preset == "kinpid":
        apid = np.abs(np.where(mask, pid, 0)).astype(np.int64)
        cols += [charge, np.isin(apid, list(_CHARGED_HADRONS)), np.isin(apid, list(_NEUTRAL_HADRONS)),
                 apid == 22, apid == 11, apid == 13]
    features = np.stack([np.asarray(c, dtype=np.float64) for c in cols], axis=-1) * m[..., None]
    points = np.stack([deta, dphi], axis=-1) * m[..., None]
    return points.astype(np.float32), features.astype(np.float32)


class V1Collate:
    """The previous ``loader.Collate``: per-jet json and npy parsing, argsort and padding in Python loops."""

    def __init__(self, pre: Any):
        import numpy as np

        self.kind, self.preset, self.max_particles = pre.kind, pre.preset, pre.max_particles
        self.jet_mean, self.jet_std = np.array(pre.jet_mean, np.float32), np.array(pre.jet_std, np.float32)
        self.feat_mean = np.array(pre.feature_mean, np.float32)
        self.feat_std = np.array(pre.feature_std, np.float32)

    def __call__(self, raws: list[dict[str, Any]]) -> dict[str, Any]:
        import numpy as np
        import torch

        metas = [json.loads(r["meta.json"]) for r in raws]
        label = torch.tensor([float(m["is_quark"]) for m in metas], dtype=torch.float32)
        jet = np.array([[np.log(max(m["pt"], 1e-9)), m["mass"]] for m in metas], np.float32)
        batch = {"label": label, "jet": torch.from_numpy((jet - self.jet_mean) / self.jet_std),
                 "key": [r["__key__"] for r in raws], "file": [m.get("file", "") for m in metas],
                 "row": torch.tensor([int(m.get("row", -1)) for m in metas], dtype=torch.int64)}
        return batch | (self._images(raws, metas) if self.kind == "image" else self._clouds(raws, metas))

    def _images(self, raws: list[dict[str, Any]], metas: list[dict[str, Any]]) -> dict[str, Any]:
        import numpy as np
        import torch

        shape = tuple(metas[0]["image_shape"])
        size = int(np.prod(shape))
        pix, val = [], []
        for b, raw in enumerate(raws):
            pix.append(_npy(raw["pix.npy"]).astype(np.int64) + b * size)
            val.append(_npy(raw["val.npy"]).astype(np.float32))
        return {"pix": torch.from_numpy(np.concatenate(pix)), "val": torch.from_numpy(np.concatenate(val)),
                "image_shape": torch.tensor(shape)}

    def _clouds(self, raws: list[dict[str, Any]], metas: list[dict[str, Any]]) -> dict[str, Any]:
        import numpy as np
        import torch

        jets = []
        for raw in raws:
            kin, pid = _npy(raw["kin.npy"]).astype(np.float32), _npy(raw["pid.npy"])
            order = np.argsort(-kin[:, 0], kind="stable")[: self.max_particles]
            jets.append((kin[order], pid[order]))
        n_max = max(1, max(len(k) for k, _ in jets))
        kin = np.zeros((len(jets), n_max, 3), np.float32)
        pid = np.zeros((len(jets), n_max), np.int64)
        mask = np.zeros((len(jets), n_max), bool)
        for b, (k, p) in enumerate(jets):
            kin[b, : len(k)], pid[b, : len(k)], mask[b, : len(k)] = k, p, True
        jet_y = np.array([m["jet_y"] for m in metas], np.float64)
        jet_phi = np.array([m["jet_phi"] for m in metas], np.float64)
        points, features = _v1_particle_features(kin, pid, mask, jet_y, jet_phi, self.preset)
        features = (features - self.feat_mean) / self.feat_std * mask[..., None]
        return {"points": torch.from_numpy(points), "features": torch.from_numpy(features.astype(np.float32)),
                "mask": torch.from_numpy(mask)}


def _npy(raw: bytes) -> Any:
    import numpy as np

    return np.load(io.BytesIO(raw), allow_pickle=False)


def v1_batches(v1_dir: str, manifest: Any, pre: Any, batch: int, buffer: int, epoch: int) -> Any:
    """The previous loader on one core (one rank, one worker): every train shard in a seeded order, webdataset's
    sample shuffle buffer, ``V1Collate``, then the previous ``to_device`` (torch.zeros densification)."""
    import itertools
    import random

    import numpy as np
    import torch
    import webdataset as wds
    from webdataset.filters import _shuffle

    names = [s.name for s in manifest.shards_of("train")]
    random.Random(f"0-{epoch}").shuffle(names)
    samples = itertools.chain.from_iterable(
        wds.WebDataset(os.path.join(v1_dir, n), shardshuffle=False, nodesplitter=None, workersplitter=None,
                       empty_check=False) for n in names)
    stream = _shuffle(samples, bufsize=buffer, initial=buffer, seed=f"0-{epoch}-0-0") if buffer else samples
    collate = V1Collate(pre)
    while True:
        raws = list(itertools.islice(stream, batch))
        if len(raws) < batch:
            return
        out = collate(raws)
        if "pix" in out:
            shape = [int(s) for s in out["image_shape"]]
            dense = torch.zeros(len(raws) * int(np.prod(shape)), dtype=torch.float32)
            dense[out["pix"]] = out["val"]
            yield out | {"image": dense.view(len(raws), *shape)}
        else:
            yield out
