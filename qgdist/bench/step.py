"""``qgdist bench step``: training-step throughput (jets/s) per model, side by side, on synthetic batches.

Runs :func:`qgdist.train.step.train_step` (the training loop's own step) on batches of the loader's shape:
clouds with a realistic multiplicity distribution, P <= ``--max-particles`` trimmed to the batch's longest jet;
images of ``--image-size`` squared pixels. Models are compared in one run (default: the dense ParticleNet-Lite
against its PyG twin), each after ``--warmup`` untimed steps. Needs neither Ray nor data files:
``python -m qgdist bench step --model particlenet-lite,particlenet-lite-pyg --device cuda --dtype bf16``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from qgdist.bench import comma_names
from qgdist.core.config import option


@dataclass(frozen=True)
class StepBenchConfig:
    """``qgdist bench step`` settings."""

    models: tuple[str, ...] = option(("particlenet-lite", "particlenet-lite-pyg"),
                                     "comma-separated registry names (qgdist.models.list_models()); ratios are to "
                                     "the first", flag="--model", parse=comma_names, metavar="A,B,...")
    device: str = option("cpu", "cpu | cuda | cuda:N | auto (CUDA when visible)")
    dtype: Literal["fp32", "bf16", "fp16"] = option("fp32", "autocast precision")
    compile: bool = option(False, "torch.compile the model")
    batch_size: int | None = option(None, "jets per step (default 1024 on CUDA, 64 on CPU)")
    max_particles: int = option(128, "particles per jet at most (trimmed to the batch's longest jet)")
    in_features: int = option(7, "particle features of cloud models: 7 = kin preset, 13 = kinpid")
    image_size: int = option(125, "image side in pixels (image models)")
    steps: int = option(10, "timed steps per model")
    warmup: int = option(3, "untimed steps before timing")
    seed: int = option(0, "seed of the weights and the synthetic batches")

    def __post_init__(self) -> None:
        if isinstance(self.models, str):  # "a,b" from a --config file (flags are split by their parser)
            object.__setattr__(self, "models", comma_names(self.models))
        if not self.models:
            raise ValueError("--model: name at least one model")


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)  # timing only: the step itself never syncs


def bench_model(name: str, cfg: StepBenchConfig, device: Any) -> dict[str, float | str]:
    """Time ``cfg.steps`` training steps of model ``name`` on ``device`` (a ``torch.device``); returns a row."""
    import torch

    from qgdist.models import count_parameters, get_model
    from qgdist.models.synthetic import cloud_batch, image_batch
    from qgdist.train.step import resolve_dtype, train_step

    batch_size = cfg.batch_size or (1024 if device.type == "cuda" else 64)
    torch.manual_seed(cfg.seed)
    kwargs = {"in_features": cfg.in_features} if "particlenet" in name else {}
    if name == "seed-cnn":
        kwargs["image_size"] = cfg.image_size
    model = get_model(name, **kwargs).to(device).train()
    n_params = count_parameters(model)
    g = torch.Generator().manual_seed(cfg.seed)
    if model.kind == "cloud":
        batches = [cloud_batch(batch_size, cfg.in_features, cfg.max_particles, generator=g, device=device)
                   for _ in range(2)]
    else:
        batches = [image_batch(batch_size, cfg.image_size, generator=g, device=device) for _ in range(2)]
    step_model = torch.compile(model) if cfg.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtype = resolve_dtype(cfg.dtype)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    for i in range(cfg.warmup):
        train_step(step_model, *batches[i % 2], optimizer, autocast_dtype=dtype, scaler=scaler)
    _sync(device)
    start = time.perf_counter()
    for i in range(cfg.steps):
        loss = train_step(step_model, *batches[i % 2], optimizer, autocast_dtype=dtype, scaler=scaler)
    _sync(device)
    seconds = (time.perf_counter() - start) / max(cfg.steps, 1)
    shape = tuple(batches[0][0]["points" if model.kind == "cloud" else "image"].shape)
    return {"model": name, "params": n_params, "batch": str(shape), "ms_per_step": 1e3 * seconds,
            "jets_per_s": batch_size / seconds, "loss": float(loss)}


def run(cfg: StepBenchConfig) -> int:
    """Benchmark every model in ``cfg.models`` and print one table with ratios to the first model."""
    import torch

    from qgdist.core.device import resolve_device

    device = resolve_device(cfg.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"train step on {device} ({where}, {torch.get_num_threads()} threads), dtype {cfg.dtype}, "
          f"compile={cfg.compile}, {cfg.steps} timed steps after {cfg.warmup} warm-up")
    rows = [bench_model(name, cfg, device) for name in cfg.models]
    base = rows[0]["jets_per_s"]
    print(f"{'model':<24}{'params':>9}  {'batch shape':<18}{'ms/step':>10}{'jets/s':>11}{'vs first':>9}")
    for r in rows:
        print(f"{r['model']:<24}{r['params']:>9}  {r['batch']:<18}{r['ms_per_step']:>10.1f}"
              f"{r['jets_per_s']:>11.0f}{r['jets_per_s'] / base:>8.2f}x")
    return 0
