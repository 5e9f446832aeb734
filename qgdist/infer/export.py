"""Export a checkpoint's model to ONNX and prove the file right by running it in onnxruntime.

ONNX graphs take positional inputs, so ``OnnxWrapper`` maps them onto the batch contract's keywords
(docs/ARCHITECTURE.md): image models take ``(image, jet)``, cloud models ``(points, features, mask)``; the output
is ``logits`` (B,). The batch axis is dynamic, and so are the particle axis of cloud models and the image size of
models that do not fix it (ResNet-15).

Two things differ from training, both checked by the onnxruntime comparison that every export ends with:

* The kNN's deterministic tie-break packs float bits into int64 keys (``Tensor.view(torch.int32)``), which ONNX
  cannot express. During export the cloud models' kNN is swapped for ``knn_onnx``: a float ``topk`` on the same
  distances -- ONNX ``TopK`` breaks ties by lower index, the same rule -- with the same self-loop convention.
* Cloud inputs are padded by ``k`` masked particles inside the wrapper, so ``topk`` always has ``k`` candidates
  whatever the particle count (padding is invisible to the models: they mask it out).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qgdist.core.atomic import atomic_path
from qgdist.core.config import option
from qgdist.core.errors import ConfigError, InputError

if TYPE_CHECKING:   # torch is imported when exporting, so that the command line's parser stays light
    import torch

    from qgdist.data.preprocessing import Preprocessing

INPUT_NAMES = {"image": ("image", "jet"), "cloud": ("points", "features", "mask")}
#: ONNX metadata key holding the model's preprocessing as JSON (``qgdist.data.preprocessing.Preprocessing``).
PREPROCESSING_KEY = "qgdist.preprocessing"


@dataclass(frozen=True)
class ExportConfig:
    """Which checkpoint to export where, and how closely onnxruntime must agree with PyTorch (``qgdist export``)."""

    checkpoint: str = option(help="checkpoint directory, its state.pt, a model.pt, or a run directory")
    onnx: str = option(help="output .onnx file")
    opset: int = option(17, "ONNX opset version (the TorchScript exporter's range)", min=9, max=20)
    atol: float = option(1e-4, "tolerated absolute difference of the logits", min=0)
    rtol: float = option(1e-3, "tolerated relative difference of the logits", min=0)
    image_size: int = option(125, "height = width of the example image when the model does not fix it",
                            min=1)
    overwrite: bool = option(False, "replace an existing --onnx file (only once the new one passed its check)")


def __getattr__(name: str) -> Any:
    """``OnnxWrapper`` subclasses ``torch.nn.Module``, so it is defined on first use (importing torch then)."""
    if name == "OnnxWrapper":
        return _onnx_wrapper()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _onnx_wrapper() -> type:
    import torch

    class OnnxWrapper(torch.nn.Module):
        """Positional inputs -> ``model(**inputs)``; cloud inputs padded by ``pad`` masked particles."""

        def __init__(self, model: torch.nn.Module, pad: int = 0) -> None:
            super().__init__()
            self.model, self.pad = model, pad
            self.names = INPUT_NAMES[model.kind]

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            named = dict(zip(self.names, inputs))
            if self.model.kind == "cloud" and self.pad:
                pad = self.pad
                named = {"points": torch.nn.functional.pad(named["points"], (0, 0, 0, pad)),
                         "features": torch.nn.functional.pad(named["features"], (0, 0, 0, pad)),
                         "mask": torch.nn.functional.pad(named["mask"], (0, pad), value=False)}
            return self.model(**named)

    OnnxWrapper.__module__ = __name__
    return OnnxWrapper


def knn_onnx(x: torch.Tensor, k: int, mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
    """``qgdist.models.knn.knn`` in ONNX-exportable ops (float topk, ties to the lower index); needs P >= k."""
    import torch

    from qgdist.models.knn import _centred_float32

    b, p, _ = x.shape
    mask = torch.ones(b, p, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
    arange = torch.arange(p, device=x.device)
    xc = _centred_float32(x, mask)
    sq = (xc * xc).sum(-1)
    d = sq[:, :, None] + sq[:, None, :] - 2.0 * torch.bmm(xc, xc.transpose(1, 2))
    d = torch.clamp(d, min=0.0)
    invalid = ~mask[:, None, :] | (arange[:, None] == arange[None, :])[None]
    d = d.masked_fill(invalid, float("inf"))
    best, idx = torch.topk(d, k, dim=-1, largest=False, sorted=True)
    ok = torch.isfinite(best) & mask[:, :, None]
    return torch.where(ok, idx, arange.view(1, -1, 1).expand_as(idx))


@contextlib.contextmanager
def onnx_friendly(model: torch.nn.Module) -> Iterator[None]:
    """Swap the cloud models' kNN for ``knn_onnx`` while exporting (see the module docstring)."""
    if model.kind != "cloud":
        yield
        return
    import qgdist.models.edgeconv as edgeconv

    original = edgeconv.knn
    edgeconv.knn = knn_onnx
    try:
        yield
    finally:
        edgeconv.knn = original


def _max_k(model: torch.nn.Module) -> int:
    return max((int(getattr(m, "k", 0)) for m in model.modules() if hasattr(m, "k")), default=0)


def example_inputs(model: torch.nn.Module, batch: int, particles: int = 40, image_size: int = 125,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic inputs of the right shapes: sparse non-negative images, clouds with varying jet lengths."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    cfg = getattr(model, "config", None)
    if model.kind == "image":
        size = int(getattr(cfg, "image_size", image_size))
        channels = int(getattr(cfg, "in_channels", 3))
        image = torch.rand(batch, channels, size, size, generator=gen)
        image = image * (torch.rand(image.shape, generator=gen) < 0.05) * 50.0
        return {"image": image, "jet": torch.randn(batch, int(getattr(cfg, "jet_features", 2)), generator=gen)}
    lengths = torch.randint(1, particles + 1, (batch,), generator=gen)
    lengths[0] = particles
    mask = torch.arange(particles)[None, :] < lengths[:, None]
    points = torch.randn(batch, particles, 2, generator=gen) * 0.2 * mask[..., None]
    features = torch.randn(batch, particles, int(cfg.in_features), generator=gen) * mask[..., None]
    return {"points": points, "features": features, "mask": mask}


def export_model(model: torch.nn.Module, path: str | os.PathLike[str], opset: int = 17,
                 image_size: int = 125, metadata: dict[str, str] | None = None,
                 check: Callable[[Path], Any] | None = None) -> Any:
    """Write ``model`` as ONNX at ``path``; dynamic batch (and particle) axes; ``metadata`` becomes the model's
    ``metadata_props`` (string key/value pairs any ONNX runtime can read).

    The file is written under a temporary name, ``check(temporary path)`` runs on it, and only when that returns
    does the file take ``path``'s name (a file already there stays as it was until then); returns what ``check``
    returned."""
    import torch

    path = Path(path)
    model = model.eval().cpu()
    wrapper = _onnx_wrapper()(model, pad=_max_k(model)).eval()
    names = list(INPUT_NAMES[model.kind])
    inputs = example_inputs(model, batch=4, particles=32, image_size=image_size)
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in names}
    if model.kind == "cloud":
        for n in names:
            axes[n][1] = "particles"
    elif not hasattr(getattr(model, "config", None), "image_size"):   # fully convolutional: any H, W
        axes["image"].update({2: "height", 3: "width"})
    with atomic_path(path) as tmp:
        with onnx_friendly(model), torch.no_grad():
            # dynamo=False: the TorchScript exporter needs no onnxscript (not a dependency) and handles these models.
            torch.onnx.export(wrapper, tuple(inputs[n] for n in names), str(tmp), input_names=names,
                              output_names=["logits"], dynamic_axes={**axes, "logits": {0: "batch"}},
                              opset_version=opset, dynamo=False)
        if metadata:
            import onnx

            proto = onnx.load(str(tmp))
            for key, value in metadata.items():
                proto.metadata_props.add(key=key, value=value)
            onnx.save(proto, str(tmp))
        return check(tmp) if check is not None else None   # raising here leaves path as it was


def onnx_preprocessing(path: str | os.PathLike[str]) -> Preprocessing:
    """The preprocessing an exported model was trained with, read from its metadata (``qgdist.preprocessing``).

    Inputs for the ONNX model are built exactly as for the checkpoint: ``Collate(onnx_preprocessing(path))``
    turns shard samples (or samples read from source files) into its inputs.
    """
    import json

    import onnx

    from qgdist.data.preprocessing import Preprocessing

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if PREPROCESSING_KEY not in props:
        raise ValueError(f"{path}: no {PREPROCESSING_KEY} metadata (not exported by qgdist export)")
    return Preprocessing.from_dict(json.loads(props[PREPROCESSING_KEY]))


def check_onnx(path: str | os.PathLike[str], model: torch.nn.Module, atol: float = 1e-4, rtol: float = 1e-3,
               image_size: int = 125) -> dict[str, Any]:
    """Load ``path`` with onnx (schema check) and onnxruntime, compare with PyTorch on fresh inputs.

    The inputs differ in batch size (and particle count) from the export's example, so dynamic axes are tested.
    Raises ``AssertionError`` naming the largest difference when outputs disagree.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = model.eval().cpu()
    inputs = example_inputs(model, batch=7, particles=45, image_size=image_size, seed=1)
    got = session.run(["logits"], {n: inputs[n].numpy() for n in INPUT_NAMES[model.kind]})[0]
    with torch.no_grad():
        want = model(**inputs).float().numpy()
    diff = float(np.max(np.abs(got - want)))
    if got.shape != want.shape or not np.allclose(got, want, atol=atol, rtol=rtol):
        raise AssertionError(f"{path}: onnxruntime output differs from PyTorch (max |diff| {diff:.3g}, "
                             f"shapes {got.shape} vs {want.shape})")
    return {"max_abs_diff": diff, "batch": int(got.shape[0]), "inputs": list(INPUT_NAMES[model.kind])}


def export_checkpoint(cfg: ExportConfig) -> dict[str, Any]:
    """Rebuild the checkpoint's model, export it to ``cfg.onnx`` and check it with onnxruntime.

    A ``*-pyg`` model is exported through its dense twin (same weights), and checked against the PyG model. The
    ONNX metadata is the checkpoint's model card (model, model config, preprocessing under ``qgdist.preprocessing``)
    plus the input and output names.
    """
    from qgdist.infer.evaluate import load_model
    from qgdist.models import get_model

    model, checkpoint, _ = load_model(cfg.checkpoint)
    name = checkpoint.model_name
    if getattr(model, "extra_inputs", ()):   # e.g. ParT's four-momenta: not in the exported input list yet
        raise ConfigError(f"checkpoint: ONNX export of {name} (inputs {', '.join(model.extra_inputs)} besides "
                          f"{', '.join(INPUT_NAMES[model.kind])}) is not supported yet", field="checkpoint")
    exported = model
    if name.endswith("-pyg"):   # PyG's EdgeConv does not trace; the dense twin shares its state dict
        exported = get_model(name.removesuffix("-pyg"), **checkpoint.model_config)
        exported.load_state_dict(model.state_dict())
    metadata = checkpoint.model_card() | {"qgdist.inputs": ",".join(INPUT_NAMES[model.kind]),
                                          "qgdist.output": "logits: quark logit (sigmoid = quark probability)"}
    assert metadata[PREPROCESSING_KEY]   # what onnx_preprocessing reads
    path = Path(cfg.onnx)
    if path.exists() and not cfg.overwrite:
        raise InputError(f"onnx: {path} exists; give --overwrite to replace it (it stays as it is until the new "
                         "file has passed its onnxruntime check)", file=str(path), field="onnx")
    # checked against the checkpoint's own model before the file takes its name
    check = export_model(exported, path, cfg.opset, cfg.image_size, metadata,
                         check=lambda tmp: check_onnx(tmp, model, cfg.atol, cfg.rtol, cfg.image_size))
    return {"onnx": str(path), "bytes": path.stat().st_size, "model": name, **check}
