"""The optimiser, its per-step learning-rate schedule and the float16 grad scaler: built, saved and restored as one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qgdist.train.config import OptimConfig


@dataclass
class Optimisation:
    """What moves the weights: ``optimizer``, ``scheduler`` (stepped once per training step), ``scaler``."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    schedule_steps: int

    @classmethod
    def build(cls, o: OptimConfig, model: torch.nn.Module, total_steps: int, steps_per_epoch: int,
              device: torch.device) -> Optimisation:
        """The optimiser and schedule of ``o``'s resolved settings over ``total_steps`` steps."""
        params = [p for p in model.parameters() if p.requires_grad]
        if o.optimizer == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        elif o.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        if o.schedule == "onecycle":
            # 3e-4 -> 3e-3 (40%) -> 3e-4 (40%) -> 5e-7 (20%): the ParticleNet paper's schedule, linear pieces.
            sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=o.lr, total_steps=max(total_steps, 2), pct_start=0.4, anneal_strategy="linear",
                three_phase=True, div_factor=10.0, final_div_factor=600.0, cycle_momentum=False)
        elif o.schedule == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10 * steps_per_epoch, gamma=0.1)
        else:
            sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
        scaler = torch.amp.GradScaler(device.type, enabled=o.precision == "fp16")
        return cls(opt, sched, scaler, getattr(sched, "total_steps", total_steps))

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "schedule_steps": self.schedule_steps}

    def load_state_dict(self, state: dict[str, Any], schedule_at: int | None = None) -> None:
        """Restore a saved state; ``schedule_at``: continue the schedule from this step instead of the saved
        scheduler's (its length changed: an elastic resize or an allowed config change)."""
        self.optimizer.load_state_dict(state["optimizer"])
        if schedule_at is None:
            self.scheduler.load_state_dict(state["scheduler"])
        else:
            self.scheduler.last_epoch = schedule_at
        self.scaler.load_state_dict(state["scaler"])
