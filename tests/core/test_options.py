"""Options are validated once: each field's range in its ``option()``, checked from flags and YAML alike.

Every command of the real parser is walked (``qgdist.cli.build_parser``); for every numeric field with a declared
range, values outside it go through ``qgdist.cli.main`` in this process -- as flags and as a ``--config`` YAML file
-- and must end in exit 2 with ``qgdist COMMAND: FIELD: reason`` on stderr, never a traceback. Validation happens
while the config is built, before any command imports torch or starts Ray, so these runs cost milliseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qgdist.cli
from qgdist.core.config import _strip_optional, build, leaves, option
from qgdist.core.errors import ConfigError


# -- the commands and their fields ----------------------------------------------------------------------------------
def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):   # aliases share a parser
                found += _leaf_parsers(sub)
    if parser._defaults.get("config_cls") is not None and parser._defaults.get("func") is not None:
        found.append(parser)
    return found


@functools.cache
def _parser() -> argparse.ArgumentParser:
    return qgdist.cli.build_parser()


@dataclasses.dataclass(frozen=True)
class Field:
    command: tuple[str, ...]      # argv prefix, e.g. ("bench", "knn")
    name: str
    flag: str
    kind: type                    # int | float
    bounds: tuple[tuple[str, float], ...]
    sequence: bool                # a tuple/list of numbers (e.g. --k 7,16)
    parsed: bool                  # the flag's text goes through a parse function
    cls: type
    yaml: bool                    # the command takes --config FILE.yaml

    def __str__(self) -> str:
        return f"{' '.join(self.command)} {self.flag}"


def _numeric(tp: Any) -> tuple[type | None, bool]:
    tp, _ = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return (args[0] if args and args[0] in (int, float) else None), True
    return (tp if tp in (int, float) else None), False


def _required_argv(cls: type, skip: str) -> list[str]:
    """Valid values for a command's required fields but ``skip``, so that only the field under test is wrong."""
    argv: list[str] = []
    for _, leaf in leaves(cls):
        f = leaf.field
        if not f.metadata.get("cli", True) or f.default is not dataclasses.MISSING \
                or f.default_factory is not dataclasses.MISSING or f.name == skip:
            continue
        tp, _ = _strip_optional(leaf.type)
        if tp in (int, float):
            value = [str(f.metadata.get("bounds", {}).get("min", 1))]
        elif typing.get_origin(tp) is Literal:
            value = [str(typing.get_args(tp)[0])]
        elif typing.get_origin(tp) is list:
            value = ["in.npz"]
        else:
            value = ["x"]
        argv += value if f.metadata.get("positional") else [f.metadata.get("flag") or "--" + f.name.replace("_", "-"),
                                                             *value]
    return argv


@functools.cache
def bounded_fields() -> tuple[Field, ...]:
    out = []
    for parser in _leaf_parsers(_parser()):
        cls = parser._defaults["config_cls"]
        command = tuple(parser.prog.split()[1:])
        for _, leaf in leaves(cls):
            meta = leaf.field.metadata
            kind, sequence = _numeric(leaf.type)
            if kind is None or not meta.get("cli", True) or not meta.get("bounds"):
                continue
            flag = meta.get("flag") or "--" + leaf.name.replace("_", "-")
            out.append(Field(command, leaf.name, flag, kind, tuple(meta["bounds"].items()), sequence,
                             meta.get("parse") is not None, cls, "--config" in parser._option_string_actions))
    return tuple(out)


def _text(value: float, kind: type) -> str:
    return str(int(value)) if kind is int else repr(float(value))


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``qgdist ARGV`` in this process (the parser built once): exit code and stderr."""
    try:
        code = qgdist.cli.main(argv)
    except SystemExit as stop:   # argparse's own refusals (a choice, a number that does not parse)
        code = stop.code
    return code, capsys.readouterr().err


def refuse(field: Field, value: float, capsys: pytest.CaptureFixture[str], tmp_path: Path, via_yaml: bool) -> None:
    """``value`` for ``field`` must be refused by the command: exit 2, ``qgdist CMD: field...: reason``."""
    text = _text(value, field.kind)
    if via_yaml:
        path = tmp_path / "settings.yaml"
        doc = [value if field.kind is float else int(value)] if field.sequence and field.name != "split" else value
        if field.name == "split":
            doc = [value, 0.0, 0.0]
        path.write_text(yaml.safe_dump({field.name: doc}))
        argv = [*field.command, *_required_argv(field.cls, field.name), "--config", str(path)]
    else:
        if field.name == "split":
            text = f"{text},0,0"
        argv = [*field.command, *_required_argv(field.cls, field.name), f"{field.flag}={text}"]
    code, err = run(argv, capsys)
    assert code == 2, f"{' '.join(argv)} -> exit {code}\n{err}"
    assert "Traceback" not in err, err
    assert err.startswith(f"qgdist {' '.join(field.command)}: {field.name}"), f"{' '.join(argv)}:\n{err}"


@pytest.fixture(autouse=True)
def _one_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qgdist.cli, "build_parser", _parser)   # argparse parsers are reusable; building is 40 ms


def just_outside(field: Field) -> list[float]:
    """The nearest values outside each declared bound."""
    step = 1 if field.kind is int else 1e-9
    out = []
    for side, bound in field.bounds:
        out.append({"min": bound - step, "gt": bound, "max": bound + step, "lt": bound}[side])
    return out


# -- every field, at its bounds ------------------------------------------------------------------------------------
def test_every_command_declares_ranges() -> None:
    """The walk finds the commands the issue names (a broken walk would make the tests below vacuous)."""
    names = {(" ".join(f.command), f.name) for f in bounded_fields()}
    for expected in [("train", "batch_size"), ("train", "epochs"), ("train", "lr"), ("train", "workers"),
                     ("convert", "chunk_jets"), ("convert", "shard_size"), ("convert", "split"),
                     ("evaluate", "batch_size"), ("predict", "batch_size"), ("bench knn", "ks"),
                     ("generate pythia", "jets"), ("tracker", "port"), ("jobs logs", "tail"),
                     ("submit", "tail_lines"), ("quickstart", "jets"), ("export", "opset")]:
        assert expected in names, expected
    assert len(bounded_fields()) > 100


@pytest.mark.parametrize("field", bounded_fields(), ids=str)
def test_values_just_outside_each_range_are_refused(field: Field, capsys, tmp_path) -> None:
    for value in just_outside(field):
        refuse(field, value, capsys, tmp_path, via_yaml=False)
        if field.yaml:
            refuse(field, value, capsys, tmp_path, via_yaml=True)


# -- any out-of-range value (property) -----------------------------------------------------------------------------
@st.composite
def out_of_range(draw: st.DrawFn) -> tuple[Field, float]:
    field = draw(st.sampled_from(bounded_fields()))
    side, bound = draw(st.sampled_from(field.bounds))
    if field.kind is int:
        low = side in ("min", "gt")
        edge = int(bound) - (1 if side == "min" else 0) if low else int(bound) + (1 if side == "max" else 0)
        value = draw(st.integers(max_value=edge, min_value=edge - 10**12) if low
                     else st.integers(min_value=edge, max_value=edge + 10**12))
    else:
        below = side in ("min", "gt")
        finite = (st.floats(max_value=bound, exclude_max=side == "min", allow_nan=False, allow_infinity=False,
                            min_value=-1e300) if below else
                  st.floats(min_value=bound, exclude_min=side == "max", allow_nan=False, allow_infinity=False,
                            max_value=1e300))
        value = draw(st.one_of(finite, st.sampled_from([math.nan, math.inf, -math.inf])))
    return field, value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=out_of_range(), via_yaml=st.booleans())
def test_any_out_of_range_value_is_refused_without_a_traceback(case, via_yaml, capsys, tmp_path) -> None:
    field, value = case
    refuse(field, value, capsys, tmp_path, via_yaml and field.yaml)


# -- the issue's examples and the cross-field checks ---------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "d", "--model", "resnet15", "--batch-size", "0"], "batch_size: must be >= 1, got 0"),
    (["train", "--data", "d", "--model", "resnet15", "--batch-size", "-3"], "batch_size: must be >= 1, got -3"),
    (["train", "--data", "d", "--model", "resnet15", "--epochs", "0"], "epochs: must be >= 1, got 0"),
    (["train", "--data", "d", "--model", "resnet15", "--lr", "-1"], "lr: must be > 0, got -1.0"),
    (["train", "--data", "d", "--model", "resnet15", "--workers", "3-1"], "workers: an elastic range needs"),
    (["convert", "--source", "cms", "--out", "o", "in", "--chunk-jets", "0"], "chunk_jets: must be >= 1, got 0"),
    (["convert", "--source", "cms", "--out", "o", "in", "--shard-size", "-5"], "shard_size: must be >= 1, got -5"),
    (["convert", "--source", "cms", "--out", "o", "in", "--rows-per-task", "-5"], "rows_per_task: must be >= 1"),
    (["convert", "--source", "cms", "--out", "o", "in", "--split", "0.9,0.9,0.9"],
     "split: the three fractions must sum to 1 (they sum to 2.7)"),
    (["convert", "--source", "cms", "--out", "o", "in", "--split", "0.5,0.5"], "split: wants three fractions"),
    (["evaluate", "--checkpoint", "c", "--data", "d", "--batch-size", "0"], "batch_size: must be >= 1, got 0"),
])
def test_the_issue_examples_are_one_line_refusals(argv, message, capsys, tmp_path) -> None:
    code, err = run(argv, capsys)
    assert code == 2 and err.startswith(f"qgdist {argv[0]}: {message}"), err
    assert not (tmp_path / "o").exists()


def test_yaml_settings_are_held_to_the_same_ranges_and_types(capsys, tmp_path) -> None:
    path = tmp_path / "c.yaml"
    for doc, message in [({"split": [0.9, 0.9, 0.9]}, "split: the three fractions must sum to 1"),
                         ({"split": [1.5, -0.5, 0.0]}, "split: each value must be >= 0 and <= 1, got 1.5"),
                         ({"chunk_jets": "many"}, "chunk_jets: must be an integer, got 'many'"),
                         ({"compress": "yes"}, "compress: must be true or false"),
                         ({"dtype": "float64"}, "dtype: must be one of float32, float16, got 'float64'")]:
        path.write_text(yaml.safe_dump(doc))
        code, err = run(["convert", "--source", "cms", "--out", "o", "in", "--config", str(path)], capsys)
        assert code == 2 and err.startswith(f"qgdist convert: {message}"), err
    path.write_text(yaml.safe_dump({"label_quark_value": 5}))
    code, err = run(["predict", "--checkpoint", "c", "--data", "d", "--out", "o", "--config", str(path)], capsys)
    assert code == 2 and err.startswith("qgdist predict: label_quark_value: must be one of 0, 1, got 5"), err


def test_predict_label_quark_value_takes_only_zero_or_one(capsys) -> None:
    code, err = run(["predict", "--checkpoint", "c", "--data", "d", "--out", "o", "--label-quark-value", "5"], capsys)
    assert code == 2 and err.splitlines()[0] == "qgdist predict: label_quark_value: invalid choice: 5 (choose from 0, 1)"


@pytest.mark.parametrize("argv,line", [
    (["train", "--data", "d", "--epochs", "abc"], "qgdist train: epochs: invalid int value: 'abc'"),
    (["train", "--data", "d", "--precision", "fp8"], "qgdist train: precision: invalid choice: 'fp8'"),
    (["convert", "--source", "nosuch", "--out", "o", "in"], "qgdist convert: source: invalid choice: 'nosuch'"),
    (["nosuch"], "qgdist: COMMAND: invalid choice: 'nosuch'"),
    (["bench", "knn", "--repeats", "x"], "qgdist bench knn: repeats: invalid int value: 'x'"),
])
def test_argparses_own_refusals_are_one_line_naming_the_field(argv, line, capsys) -> None:
    """A value argparse itself refuses (not a number, not a choice) reads like every other refusal of a setting:
    ``qgdist CMD: field: reason``, a hint to --help, exit 2, no usage block."""
    code, err = run(argv, capsys)
    assert code == 2 and err.splitlines()[0].startswith(line), err
    assert "usage:" not in err and "error:" not in err and len(err.splitlines()) == 2, err


def test_a_renamed_flag_is_named_too(capsys) -> None:
    code, err = run(["submit", "train", "--tail", "-1"], capsys)
    assert code == 2 and err.startswith("qgdist submit: tail_lines (--tail): must be >= 0, got -1"), err


def test_ranges_hold_for_configs_built_in_code_and_show_in_help() -> None:
    @dataclasses.dataclass(frozen=True)
    class Probe:
        rate: float = option(0.5, "a fraction", gt=0, max=1)
        sizes: tuple[int, ...] = option((1, 2), "sizes", min=1)
        note: str = option("", "checked by a function", check=lambda v: "must be short" if len(v) > 3 else None)

    assert build(Probe, {"rate": 1}) == Probe(rate=1.0)
    for values, message in [({"rate": 0}, "rate: must be > 0 and <= 1, got 0.0"),
                            ({"rate": float("nan")}, "rate: must be a finite number, got nan"),
                            ({"sizes": [3, 0]}, "sizes: each value must be >= 1, got 0"),
                            ({"note": "long"}, "note: must be short, got 'long'")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
            build(Probe, values)
        assert caught.value.field == message.split(":")[0]
    help_text = _parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "(default: 256; >= 1)" in " ".join(help_text.split())


def test_a_missing_data_or_checkpoint_is_named_before_anything_starts(capsys, tmp_path) -> None:
    """train, evaluate and predict name a --data (or --checkpoint) that is not there: one line, exit 2, before Ray
    or a model is touched (these runs take milliseconds in this process)."""
    missing, empty = tmp_path / "no-such-dataset", tmp_path / "ckpt"
    empty.mkdir()
    for argv, message in [
        (["train", "--data", str(missing), "--model", "resnet15", "--workers", "2"],
         f"qgdist train: {missing}: no such dataset directory"),
        (["evaluate", "--checkpoint", str(empty), "--data", str(missing)],
         f"qgdist evaluate: {missing}: no such dataset directory"),
        (["predict", "--checkpoint", str(empty), "--data", str(missing), "--out", str(tmp_path / "o")],
         f"qgdist predict: {missing}: no such file or directory"),
        (["predict", "--checkpoint", str(tmp_path / "nope"), "--data", str(empty), "--input", "shards",
          "--out", str(tmp_path / "o")], f"qgdist predict: {tmp_path / 'nope'}: no such checkpoint or run directory"),
    ]:
        code, err = run(argv, capsys)
        assert code == 2 and err.startswith(message) and "Traceback" not in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "runs").exists()
