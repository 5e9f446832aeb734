"""Where ``torch.compile`` stops tracing, without importing TorchDynamo until a model is compiled.

``torch.compiler.disable`` imports ``torch._dynamo`` when it is applied. Applied in the models' modules, it cost
every process that imports a model 1.5-2 s of CPU (``import torch`` took 2.5 CPU-s, with TorchDynamo 4.5 on the
2-core development machine): every scoring actor and evaluation, where only ``--compile`` needs it (a training
process imports it anyway: ``torch.optim`` does, at its first parameter group). So :func:`eager_only` only marks
a function, and :func:`compile_model` hands every marked one of qgdist to ``torch.compiler.disable`` before it
compiles.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "_qgdist_eager_only"


def eager_only(fn: F) -> F:
    """``fn`` (a function, or a method as a decorator) runs eagerly inside a compiled model: ``torch.compile``
    breaks the graph around it, as under ``torch.compiler.disable``, once :func:`compile_model` has run.

    Returns a new function, so a module may keep ``fn`` itself traceable under another name."""

    @functools.wraps(fn)
    def eager(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    setattr(eager, _MARK, True)
    return eager  # type: ignore[return-value]


def compile_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """``torch.compile(model, **kwargs)``, every :func:`eager_only` function of qgdist first made a graph break."""
    disable_marked()
    return torch.compile(model, **kwargs)


def disable_marked() -> int:
    """Replaces each :func:`eager_only` function held by a loaded ``qgdist`` module or one of its classes with
    ``torch.compiler.disable`` of it; returns how many it replaced (none on a second call)."""
    replaced = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("qgdist.") or module is None:
            continue
        owners = [module, *(c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == name)]
        for owner in owners:
            for attr, value in list(vars(owner).items()):
                if getattr(value, _MARK, False):
                    disabled = torch.compiler.disable(value)
                    setattr(disabled, _MARK, False)   # functools.wraps copied the mark: this one is done
                    setattr(owner, attr, disabled)
                    replaced += 1
    return replaced
