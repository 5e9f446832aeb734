"""One error family: every exception qgdist defines derives from ``QgdistError``, and the command line turns any of
them into ``qgdist COMMAND: message`` (plus its hint) and exit 2, never a traceback."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import numpy as np

import qgdist
from qgdist.cli import main
from qgdist.core.errors import QgdistError


def _qgdist_modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(qgdist.__path__, "qgdist.") if not m.name.endswith("__main__")]


def test_every_public_qgdist_exception_derives_from_one_base() -> None:
    found = []
    for name in _qgdist_modules():
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == name
                    and not attr.startswith("_")):
                found.append(obj)
    assert len(found) >= 6, found   # ConfigError, InputError, BadRowError, SchemaError, PreprocessingMismatch, ...
    strays = [f"{c.__module__}.{c.__qualname__}" for c in found if not issubclass(c, QgdistError)]
    assert not strays, f"exceptions outside the QgdistError family: {strays}"


def test_a_bad_row_ends_the_command_with_one_line_naming_file_row_and_field(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.npz"
    X = np.zeros((3, 4, 4))
    X[:, 0] = (50.0, 0.1, 0.2, 211)
    X[1, 0, 0] = np.nan
    np.savez(bad, X=X, y=np.array([1.0, 0.0, 1.0]))
    code = main(["convert", "--source", "energyflow", "--executor", "local", "--no-progress",
                 "--out", str(tmp_path / "out"), str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    first, hint = err.strip().splitlines()
    assert first.startswith("qgdist convert: ") and "bad.npz" in first and "row 1" in first, err
    assert "--on-bad-row quarantine" in hint and "Traceback" not in err
