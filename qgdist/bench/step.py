"""``qgdist bench step``: training-step throughput (jets/s) per model, side by side, on synthetic batches.

Runs :func:`qgdist.train.step.train_step` (the training loop's own step: forward, BCE, backward, AdamW) on batches
of the loader's shape: clouds with a realistic multiplicity distribution, P <= ``--max-particles`` trimmed to the
batch's longest jet; images of ``--image-size`` squared pixels. Every model is built and warmed up first, then the
timed steps are **interleaved** (one step of each model in turn, ``--steps`` rounds) and the table quotes the
median step, so a load change on a shared machine hits all rows alike. Needs neither Ray nor data files:
``python -m qgdist bench step --model particlenet-lite,particlenet-lite-pyg --device cuda --dtype bf16``.

``--reference weaver-core`` (``pip install 'qgdist[reference]'``) adds, for each ParticleNet model, the
ParticleNet that ParticleNet users train with today, ``weaver.nn.model.ParticleNet`` (imported from the installed
weaver-core, never copied here), built with the same configuration (``use_fusion=False``, ``use_counts`` for mean
pooling over real particles, ``trim=False``: the batches are already trimmed, and weaver's training-time trimmer
would drop particles). Its weights, with randomised batch-norm statistics, are copied into ours and the eval-mode
logits must agree (float32, ``rtol=1e-4, atol=1e-5``) on every jet with more than k particles, or the bench stops
with an error. Jets of <= k particles are left out of the check on purpose: weaver pairs them with padded slots
(edge feature ``(x_i, -x_i)``), ours with self-loops (``(x_i, 0)``), a documented difference. Then both train on
the same batches, with the same threads, dtype and optimizer, interleaved; weaver gets channel-first copies of
the batches, made before timing. ``--compile`` compiles ours only. For ``particle-transformer`` the reference is
weaver's ``ParticleTransformer`` (``qgdist.bench.weaver_part``), checked on every jet.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from qgdist.bench import comma_names
from qgdist.bench.weaver_reference import (build_weaver, channel_first, check_against_weaver,
                                           randomise_batch_norms, weaver_state_dict_to_ours, weaver_version)
from qgdist.core.config import option


@dataclass(frozen=True)
class StepBenchConfig:
    """``qgdist bench step`` settings."""

    models: tuple[str, ...] = option(("particlenet-lite", "particlenet-lite-pyg"),
                                     "comma-separated registry names (qgdist.models.list_models()); ratios are to "
                                     "the first (or to weaver-core with --reference)", flag="--model",
                                     parse=comma_names, metavar="A,B,...")
    device: str = option("cpu", "cpu | cuda | cuda:N | auto (CUDA when visible)")
    dtype: Literal["fp32", "bf16", "fp16"] = option("fp32", "autocast precision")
    compile: bool = option(False, "torch.compile our models (dynamic shapes: one graph for every B and P)")
    batch_size: int | None = option(None, "jets per step (default 1024 on CUDA, 64 on CPU)", min=1)
    max_particles: int = option(128, "particles per jet at most (trimmed to the batch's longest jet)", min=1)
    in_features: int = option(7, "particle features of cloud models: 7 = kin preset, 13 = kinpid", min=1)
    image_size: int = option(125, "image side in pixels (image models)", min=1)
    steps: int = option(10, "timed steps per model (interleaved across models; the median is quoted)", min=1)
    warmup: int = option(3, "untimed steps per model before timing", min=0)
    seed: int = option(0, "seed of the weights and the synthetic batches", min=0)
    threads: int | None = option(None, "intra-op CPU threads (torch.set_num_threads); default: torch's choice",
                                       min=1)
    layout: Literal["auto", "padded", "packed"] = option(
        "auto", "dense ParticleNet layout (ParticleNetConfig.layout): auto = packed on CPU, padded on GPU")
    reference: Literal["weaver-core"] | None = option(
        None, "also build weaver-core's ParticleNet (ParticleTransformer) per ParticleNet model (particle-transformer), "
              "check it agrees with ours, time both")

    def __post_init__(self) -> None:
        if isinstance(self.models, str):  # "a,b" from a --config file (flags are split by their parser)
            object.__setattr__(self, "models", comma_names(self.models))
        if not self.models:
            raise ValueError("--model: name at least one model")
        if self.reference is not None:
            bad = [m for m in self.models if "particlenet" not in m and m != "particle-transformer"]
            if bad:
                raise ValueError(f"--reference {self.reference} compares ParticleNet models and "
                                 f"particle-transformer only, not {bad}")


@dataclass
class Runner:
    """One model ready to step: its inputs on the device, its optimizer; ``step(i)`` runs batch ``i % len``."""

    name: str
    impl: str
    model: Any
    params: int
    shape: tuple[int, ...]
    run: Callable[[int], Any]
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)   # process CPU time (all threads) per timed step
    note: str = ""
    warmup_s: float = 0.0


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)  # timing only: the step itself never syncs


def _batches(kind: str, cfg: StepBenchConfig, batch_size: int, device: Any,
             vectors: bool = False) -> list[tuple[dict, Any]]:
    import torch

    from qgdist.models.synthetic import cloud_batch, image_batch

    g = torch.Generator().manual_seed(cfg.seed)
    if kind == "cloud":
        return [cloud_batch(batch_size, cfg.in_features, cfg.max_particles, generator=g, device=device,
                            vectors=vectors) for _ in range(2)]
    return [image_batch(batch_size, cfg.image_size, generator=g, device=device) for _ in range(2)]


def _stepper(model: Any, batches: list, cfg: StepBenchConfig, device: Any) -> Callable[[int], Any]:
    import torch

    from qgdist.train.step import resolve_dtype, train_step

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtype = resolve_dtype(cfg.dtype)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def run(i: int) -> Any:
        return train_step(model, *batches[i % len(batches)], optimizer, autocast_dtype=dtype, scaler=scaler)

    return run


def build_runner(name: str, cfg: StepBenchConfig, device: Any, batch_size: int, *,
                 compile_model: bool | None = None) -> Runner:
    """Our model ``name`` on ``device`` (a ``torch.device``) with its batches and optimizer (compiled when
    ``compile_model``, default ``cfg.compile``)."""
    import torch

    from qgdist.models import count_parameters, extra_inputs, get_model, model_kind
    from qgdist.models.compiling import compile_model as compiled

    torch.manual_seed(cfg.seed)
    kind = model_kind(name)
    kwargs: dict[str, Any] = {}
    if kind == "cloud":
        kwargs = {"in_features": cfg.in_features, "layout": cfg.layout}
    elif name == "seed-cnn":
        kwargs["image_size"] = cfg.image_size
    model = get_model(name, **kwargs).to(device).train()
    batches = _batches(kind, cfg, batch_size, device, vectors="vectors" in extra_inputs(name))
    use_compile = cfg.compile if compile_model is None else compile_model
    # dynamic=True: B, P (and the packed row count) symbolic from the first call: no recompile per batch.
    step_model = compiled(model, dynamic=True) if use_compile else model
    shape = tuple(batches[0][0]["points" if kind == "cloud" else "image"].shape)
    return Runner(name, "qgdist compiled" if use_compile else "qgdist", model, count_parameters(model), shape,
                  _stepper(step_model, batches, cfg, device))


def build_weaver_runner(ours: Runner, cfg: StepBenchConfig, device: Any, batch_size: int) -> Runner:
    """weaver-core's ParticleNet for ``ours``: its weights copied into ours, outputs checked, channel-first batches."""
    import torch

    from qgdist.models import count_parameters

    model = ours.model
    torch.manual_seed(cfg.seed)
    weaver = build_weaver(model.config, use_amp=cfg.dtype == "fp16")
    randomise_batch_norms(weaver, cfg.seed)
    weaver = weaver.to(device).train()
    model.load_state_dict(weaver_state_dict_to_ours(weaver.state_dict(), model.config))  # strict: all or error
    batches = _batches("cloud", cfg, batch_size, device)
    check = check_against_weaver(model, weaver, batches[0][0])

    class Adapter(torch.nn.Module):
        """weaver's ParticleNet on channel-first inputs -> logits (B,)."""

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, points: torch.Tensor, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.net(points, features, mask).squeeze(-1).float()

    adapter = Adapter(weaver)
    weaver_batches = [(channel_first(inputs), label) for inputs, label in batches]
    note = (f"eval logits agree on {check['compared']}/{check['jets']} jets, max |diff| {check['max_abs_diff']:.1e}")
    return Runner(ours.name, f"weaver-core {weaver_version()}", adapter, count_parameters(weaver), ours.shape,
                  _stepper(adapter, weaver_batches, cfg, device), note=note)


def run(cfg: StepBenchConfig) -> int:
    """Benchmark every model in ``cfg.models`` (and the reference) and print one table of medians."""
    import torch

    from qgdist.core.device import resolve_device

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    batch_size = cfg.batch_size or (1024 if device.type == "cuda" else 64)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"train step on {device} ({where}, {torch.get_num_threads()} threads, load average {load}), dtype "
          f"{cfg.dtype}, compile={cfg.compile}, layout={cfg.layout}, {cfg.steps} timed steps per model "
          f"(interleaved, median) after {cfg.warmup} warm-up")
    runners: list[Runner] = []
    baselines: dict[str, Runner] = {}  # model -> the row its ratio is taken against
    for name in cfg.models:
        ours = build_runner(name, cfg, device, batch_size)
        runners.append(ours)
        if cfg.compile:  # the same weights, eager: the compile speed-up measured in the same run
            eager = build_runner(name, cfg, device, batch_size, compile_model=False)
            eager.model.load_state_dict(ours.model.state_dict())
            runners.append(eager)
            baselines[name] = eager
        if cfg.reference == "weaver-core":
            if name == "particle-transformer":
                from qgdist.bench.weaver_part import build_weaver_part_runner

                runners.append(build_weaver_part_runner(ours, cfg, device, batch_size))
            else:
                runners.append(build_weaver_runner(ours, cfg, device, batch_size))
            if cfg.compile:
                eager.model.load_state_dict(ours.model.state_dict())
            baselines[name] = runners[-1]
    for r in runners:
        start = time.perf_counter()
        for i in range(cfg.warmup):
            r.run(i)
        _sync(device)
        r.warmup_s = time.perf_counter() - start
    for i in range(cfg.steps):
        for r in runners:
            start, cpu = time.perf_counter(), time.process_time()
            loss = r.run(i)
            _sync(device)
            r.times.append(time.perf_counter() - start)
            r.cpu_times.append(time.process_time() - cpu)
    if cfg.steps:
        float(loss)  # the last loss is read, so nothing is left in flight
    print(f"{'model':<24}{'impl':<20}{'params':>9}  {'batch shape':<18}{'ms/step':>10}{'jets/s':>10}{'ratio':>9}"
          f"{'cpu ms/step':>13}{'cpu ratio':>10}")
    def jets_per_s(r: Runner) -> float:
        return batch_size / statistics.median(r.times) if r.times else float("nan")

    for r in runners:
        seconds = statistics.median(r.times) if r.times else float("nan")
        jets = jets_per_s(r)
        base = baselines.get(r.name, runners[0])
        ref = jets_per_s(base)
        cpu = statistics.median(r.cpu_times) if r.cpu_times else float("nan")
        cpu_ref = statistics.median(base.cpu_times) if base.cpu_times else float("nan")
        print(f"{r.name:<24}{r.impl:<20}{r.params:>9}  {r.shape!s:<18}{1e3 * seconds:>10.1f}{jets:>10.0f}"
              f"{jets / ref:>8.2f}x{1e3 * cpu:>13.1f}{cpu_ref / cpu:>9.2f}x")
        if r.note:
            print(f"  reference check: {r.note}")
    print("cpu ms/step: process CPU time of the step, all threads (on a shared machine it moves less with the "
          "load than wall time); cpu ratio: the baseline's over this row's")
    if cfg.reference:
        print("ratio: jets/s over weaver-core's on the same batches (weaver-core rows: 1.00x)")
    elif cfg.compile:
        print("ratio: jets/s over the same model's eager step (same weights, same batches)")
    if cfg.compile:
        print("warm-up (first step compiles): " + ", ".join(f"{r.name} {r.impl} {r.warmup_s:.1f} s" for r in runners))
    return 0
