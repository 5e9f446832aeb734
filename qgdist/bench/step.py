"""``qgdist bench step``: training-step throughput (jets/s) per model, side by side, on synthetic batches.

Runs :func:`qgdist.train.step.train_step` (the training loop's own step) on batches of the loader's shape:
clouds with a realistic multiplicity distribution, P <= ``--max-particles`` trimmed to the batch's longest jet;
images of ``--image-size`` squared pixels. Models are compared in one run (default: the dense ParticleNet-Lite
against its PyG twin), each after ``--warmup`` untimed steps. Needs neither Ray nor data files:
``python -m qgdist bench step --model particlenet-lite,particlenet-lite-pyg --device cuda --dtype bf16``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class StepBenchConfig:
    models: tuple[str, ...] = ("particlenet-lite", "particlenet-lite-pyg")
    device: str = "cpu"
    dtype: str = "fp32"
    compile: bool = False
    batch_size: int | None = None  # None: 1024 on CUDA, 64 on CPU
    max_particles: int = 128
    in_features: int = 7
    image_size: int = 125
    steps: int = 10
    warmup: int = 3
    seed: int = 0


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()  # timing only: the step itself never syncs


def bench_model(name: str, cfg: StepBenchConfig) -> dict[str, float | str]:
    """Time ``cfg.steps`` training steps of model ``name``; returns a row of figures."""
    import torch

    from qgdist.models import count_parameters, get_model
    from qgdist.models.synthetic import cloud_batch, image_batch
    from qgdist.train.step import resolve_dtype, train_step

    batch_size = cfg.batch_size or (1024 if cfg.device.startswith("cuda") else 64)
    torch.manual_seed(cfg.seed)
    kwargs = {"in_features": cfg.in_features} if "particlenet" in name else {}
    if name == "seed-cnn":
        kwargs["image_size"] = cfg.image_size
    model = get_model(name, **kwargs).to(cfg.device).train()
    n_params = count_parameters(model)
    g = torch.Generator().manual_seed(cfg.seed)
    if model.kind == "cloud":
        batches = [cloud_batch(batch_size, cfg.in_features, cfg.max_particles, generator=g, device=cfg.device)
                   for _ in range(2)]
    else:
        batches = [image_batch(batch_size, cfg.image_size, generator=g, device=cfg.device) for _ in range(2)]
    step_model = torch.compile(model) if cfg.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtype = resolve_dtype(cfg.dtype)
    scaler = torch.amp.GradScaler(cfg.device.split(":")[0]) if dtype == torch.float16 else None
    for i in range(cfg.warmup):
        train_step(step_model, *batches[i % 2], optimizer, autocast_dtype=dtype, scaler=scaler)
    _sync(cfg.device)
    start = time.perf_counter()
    for i in range(cfg.steps):
        loss = train_step(step_model, *batches[i % 2], optimizer, autocast_dtype=dtype, scaler=scaler)
    _sync(cfg.device)
    seconds = (time.perf_counter() - start) / max(cfg.steps, 1)
    shape = tuple(batches[0][0]["points" if model.kind == "cloud" else "image"].shape)
    return {"model": name, "params": n_params, "batch": str(shape), "ms_per_step": 1e3 * seconds,
            "jets_per_s": batch_size / seconds, "loss": float(loss)}


def run(cfg: StepBenchConfig) -> int:
    """Benchmark every model in ``cfg.models`` and print one table with ratios to the first model."""
    import torch

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    print(f"train step on {cfg.device} ({torch.cuda.get_device_name() if cfg.device.startswith('cuda') else 'CPU'}, "
          f"{torch.get_num_threads()} threads), dtype {cfg.dtype}, compile={cfg.compile}, "
          f"{cfg.steps} timed steps after {cfg.warmup} warm-up")
    rows = [bench_model(name, cfg) for name in cfg.models]
    base = rows[0]["jets_per_s"]
    print(f"{'model':<24}{'params':>9}  {'batch shape':<18}{'ms/step':>10}{'jets/s':>11}{'vs first':>9}")
    for r in rows:
        print(f"{r['model']:<24}{r['params']:>9}  {r['batch']:<18}{r['ms_per_step']:>10.1f}"
              f"{r['jets_per_s']:>11.0f}{r['jets_per_s'] / base:>8.2f}x")
    return 0


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="particlenet-lite,particlenet-lite-pyg",
                   help="comma-separated registry names (qgdist.models.list_models())")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast precision")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--batch-size", type=int, default=None, help="default 1024 on CUDA, 64 on CPU")
    p.add_argument("--max-particles", type=int, default=128)
    p.add_argument("--in-features", type=int, default=7, help="7 = kin preset, 13 = kinpid")
    p.add_argument("--image-size", type=int, default=125)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.set_defaults(func=_run_args)


def _run_args(args: argparse.Namespace) -> int:
    cfg = StepBenchConfig(
        models=tuple(m.strip() for m in args.model.split(",") if m.strip()), device=args.device,
        dtype=args.dtype, compile=args.compile, batch_size=args.batch_size, max_particles=args.max_particles,
        in_features=args.in_features, image_size=args.image_size, steps=args.steps, warmup=args.warmup)
    return run(cfg)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``step`` to the ``qgdist bench`` subcommands."""
    _add_arguments(subparsers.add_parser("step", help="training-step throughput per model (jets/s)"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark without the full CLI (e.g. on a GPU machine with only torch installed)."""
    parser = argparse.ArgumentParser(prog="qgdist bench step", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
