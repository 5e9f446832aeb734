"""What a user reads and gets from a config declared with ``option()``, word for word: the ``--help`` text of every
kind of field, the YAML a run prints of its resolved config, and each refusal of a value of the wrong type.

The configs are declared inside the tests: ``option()`` and the dataclass machinery then run while mutmut watches
(a class declared at import has its fields made before any test runs)."""

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from qgdist.core.config import add_arguments, build, describe, from_args, option, range_text, read_config_file
from qgdist.core.errors import ConfigError


def _kib(text: str) -> int:
    if not text.endswith("KiB"):
        raise ValueError(f"size {text!r} must end in KiB")
    return int(text[:-3]) << 10


def _declare() -> type:
    @dataclass(frozen=True)
    class Optim:
        lr: float = option(1e-3, "learning rate", gt=0)
        kinds: list[Literal["a", "b"]] = option(["a"], "kinds to use")
        widths: tuple[int, ...] = option((8, 16), "layer widths", min=1)
        env: dict[str, str] = option({}, "environment variables")
        model_arg: dict[str, Any] = option({}, "model keyword arguments", flag="--model-arg")

    @dataclass(frozen=True)
    class Demo:
        inputs: list[str] = option(help="input files", positional=True)
        out: Path = option(help="output directory", flag="--to")
        workers: int = option(help="workers", min=1)
        resources: dict[str, float] = option({}, "custom resources", metavar="NAME=AMOUNT")
        plain: int = 3
        name: str | None = option(None, "run name")
        seed: int | None = option(None, "seed", min=0)
        size: int = option(1024, "buffer", parse=_kib, metavar="BYTES")
        mode: Literal["fast", "exact"] = option("exact", "how to run")
        progress: bool = option(True, "show bars", aliases={"--quiet": False})
        optim: Optim = Optim()

    return Demo


def _parser(cls: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qgdist demo", exit_on_error=False,
                                     formatter_class=lambda prog: argparse.HelpFormatter(prog, width=1000))
    add_arguments(parser, cls)
    return parser


HELP = """\
usage: qgdist demo [-h] [--config FILE.yaml] [--to OUT] [--workers WORKERS] [--resources NAME=AMOUNT] \
[--plain PLAIN] [--name NAME] [--seed SEED] [--size BYTES] [--mode {fast,exact}] [--progress | --no-progress] \
[--quiet] [--lr LR] [--kinds {a,b} [{a,b} ...]] [--widths WIDTHS [WIDTHS ...]] [--env KEY=VALUE] \
[--model-arg KEY=VALUE] INPUTS [INPUTS ...]

positional arguments:
  INPUTS                input files

options:
  -h, --help            show this help message and exit
  --config FILE.yaml    YAML file of settings (flat names or sections); flags given here override it
  --to OUT              output directory (required)
  --workers WORKERS     workers (required)
  --resources NAME=AMOUNT
                        custom resources (repeatable; values are JSON)
  --plain PLAIN         (default: 3)
  --name NAME           run name
  --seed SEED           seed (>= 0)
  --size BYTES          buffer (default: 1024)
  --mode {fast,exact}   how to run (default: exact)
  --progress, --no-progress
                        show bars (default: True)
  --quiet               same as setting progress to False

optim options:
  --lr LR               learning rate (default: 0.001; > 0)
  --kinds {a,b} [{a,b} ...]
                        kinds to use (default: a)
  --widths WIDTHS [WIDTHS ...]
                        layer widths (default: 8,16; >= 1)
  --env KEY=VALUE       environment variables (repeatable)
  --model-arg KEY=VALUE
                        model keyword arguments (repeatable; values are JSON)
"""


def test_help_shows_each_flag_with_its_metavar_default_range_and_kind():
    """Required flags say so; defaults (lists and tuples comma-joined, list defaults included) and ranges follow
    the help; choices replace the metavar; mappings are repeatable KEY=VALUE, JSON-valued unless text."""
    assert _parser(_declare()).format_help() == HELP


def test_flags_and_a_config_file_build_every_kind_of_field(tmp_path):
    demo = _declare()
    parser = _parser(demo)
    cfg = from_args(demo, parser.parse_args(
        ["a.npz", "b.npz", "--to", "o", "--workers", "2", "--kinds", "b", "a", "--widths", "4",
         "--env", "PATH=/x=y", "--env", "L=[1]", "--resources", "GPU=0.5",
         "--model-arg", "k=[1, 2]", "--model-arg", "plain=text", "--size", "2KiB", "--quiet"]))
    assert cfg.inputs == ["a.npz", "b.npz"] and cfg.out == Path("o") and cfg.size == 2048 and not cfg.progress
    assert cfg.optim.kinds == ["b", "a"] and cfg.optim.widths == (4,)
    assert cfg.optim.env == {"PATH": "/x=y", "L": "[1]"}   # split at the first "=", the value kept as text
    assert cfg.resources == {"GPU": 0.5}
    assert cfg.optim.model_arg == {"k": [1, 2], "plain": "text"}   # JSON where it parses, text otherwise
    for bad in ("novalue", "=value"):
        with pytest.raises(argparse.ArgumentError, match=rf"want KEY=VALUE, got '{bad}'"):
            parser.parse_args(["a", "--to", "o", "--env", bad])
    with pytest.raises(argparse.ArgumentError, match=r"size '4MB' must end in KiB"):
        parser.parse_args(["a", "--to", "o", "--size", "4MB"])
    with pytest.raises(ConfigError, match=r"^the command line: --to is required$") as err:
        from_args(demo, parser.parse_args(["a", "--workers", "1"]))
    assert err.value.field == "out"
    with pytest.raises(ConfigError, match=r"^the command line: INPUTS is required$"):
        from_args(demo, argparse.Namespace(out="o", workers=1))

    path = tmp_path / "demo.yaml"
    path.write_text("out: p\nworkers: 1\nprogress: false\nsize: 3KiB\noptim:\n  lr: 0.5\n  model-arg: {depth: 2}\n")
    cfg = from_args(demo, parser.parse_args(["c.npz", "--config", str(path), "--lr", "0.25"]))
    assert (cfg.inputs, cfg.out, cfg.size, cfg.optim.lr, cfg.optim.model_arg) == (
        ["c.npz"], Path("p"), 3072, 0.25, {"depth": 2})
    assert cfg.progress is False   # an alias (--quiet) not given leaves the file's value alone
    path.write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match=rf"^{path}: a config file holds a mapping of settings, not list$"):
        from_args(demo, parser.parse_args(["c.npz", "--config", str(path)]))
    path.write_text("")
    assert read_config_file(demo, path) == {}


def test_describe_prints_the_resolved_config_as_yaml_in_declaration_order():
    demo = _declare()
    files = [f"file-{i:02d}.npz" for i in range(12)]
    cfg = build(demo, {"inputs": files, "out": "out", "workers": 2, "name": "s3://key:secret@bucket/run",
                       "widths": [3, 4], "env": {"K": "v"}})
    assert describe(cfg) == (
        "inputs: [file-00.npz, file-01.npz, file-02.npz, file-03.npz, file-04.npz, file-05.npz, file-06.npz, "
        "file-07.npz,\n"
        "  file-08.npz, file-09.npz, file-10.npz, file-11.npz]\n"
        "out: out\nworkers: 2\nresources: {}\nplain: 3\nname: s3://key:***@bucket/run\n"
        "seed: null\nsize: 1024\nmode: exact\nprogress: true\n"
        "optim:\n  lr: 0.001\n  kinds: [a]\n  widths: [3, 4]\n  env: {K: v}\n  model_arg: {}")


@pytest.mark.parametrize("field,value,refusal", [
    ("inputs", "a.npz", "inputs: must be a list, got 'a.npz'"),
    ("env", ["K=v"], "env: must be a mapping of KEY=VALUE settings, got ['K=v']"),
    ("env", {"K": [1]}, "env[K]: must be text, got [1]"),
    ("mode", "slow", "mode: must be one of fast, exact, got 'slow'"),
    ("mode", True, "mode: must be one of fast, exact, got True"),
    ("progress", "yes", "progress: must be true or false, got 'yes'"),
    ("seed", 1.5, "seed: must be an integer, got 1.5"),
    ("seed", True, "seed: must be an integer, got True"),
    ("lr", "fast", "lr: must be a number, got 'fast'"),
    ("lr", False, "lr: must be a number, got False"),
    ("name", ["x"], "name: must be text, got ['x']"),
    ("out", 3, "out: must be a path, got 3"),
    ("seed", -1, "seed: must be >= 0, got -1"),
    ("widths", [4, 0], "widths: each value must be >= 1, got 0"),
    ("lr", float("nan"), "lr: must be a finite number, got nan"),
    ("size", "9MB", "size: size '9MB' must end in KiB"),
])
def test_a_value_of_the_wrong_type_or_range_is_refused_naming_its_field(field, value, refusal):
    demo = _declare()
    with pytest.raises(ConfigError) as err:
        build(demo, {"inputs": ["a"], "out": "o", "workers": 1, field: value})
    assert str(err.value) == refusal
    assert err.value.field == refusal.split(":")[0]


def test_values_are_coerced_to_their_fields_types():
    demo = _declare()
    cfg = build(demo, {"inputs": ("a",), "out": "o", "workers": 1, "name": 2024, "lr": 1, "widths": [5],
                       "size": "1KiB"})
    assert cfg.inputs == ["a"] and isinstance(cfg.out, Path) and cfg.name == "2024" and cfg.optim.widths == (5,)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.size == 1024
    assert build(demo, {"inputs": ["a"], "out": "o", "workers": 1, "seed": None}).seed is None


def test_a_renamed_flag_is_named_beside_its_field_and_ranges_read_as_written():
    @dataclass(frozen=True)
    class Tail:
        tail_lines: int = option(10, "lines", flag="--tail", min=1)
        depth: int = option(2, "depth", flag="--depth", min=1)

    with pytest.raises(ConfigError, match=r"^tail_lines \(--tail\): must be >= 1, got 0$"):
        build(Tail, {"tail_lines": 0})
    with pytest.raises(ConfigError, match=r"^depth: must be >= 1, got 0$"):
        build(Tail, {"depth": 0})
    assert range_text({"gt": 0, "max": 1e-5}) == "> 0 and <= 1e-05"
    assert range_text({"lt": 2, "min": 0.5}) == ">= 0.5 and < 2"


def test_the_parser_knows_its_config_class_and_an_optional_positional_may_be_left_out():
    @dataclass(frozen=True)
    class One:
        target: str = option("all", "what to do", positional=True)

    parser = _parser(One)
    assert parser.parse_args([]).config_cls is One
    assert from_args(One, parser.parse_args([])).target == "all"
    assert from_args(One, parser.parse_args(["some"])).target == "some"


def test_build_runs_validate_reads_past_derived_fields_and_names_unknown_settings():
    @dataclass(frozen=True)
    class Span:
        lo: int = option(0, "low")
        width: int = field(init=False, default=0)
        hi: int = option(1, "high")

        def validate(self) -> None:
            if self.hi <= self.lo:
                raise ValueError(f"hi: must be above lo ({self.lo}), got {self.hi}")

    assert build(Span, {"lo": 2, "hi": 5}).hi == 5
    with pytest.raises(ConfigError, match=r"^hi: must be above lo \(2\), got 2$"):
        build(Span, {"lo": 2, "hi": 2})
    with pytest.raises(ConfigError, match=r"^job.yaml: unknown setting 'speed'; known: hi, lo$") as err:
        build(Span, {"speed": 1}, where="job.yaml")
    assert err.value.field == "speed"


def test_a_refusal_carries_the_value_it_got_and_what_was_expected():
    demo = _declare()
    with pytest.raises(ConfigError) as err:
        build(demo, {"inputs": ["a"], "out": "o", "workers": 1, "seed": 1.5})
    assert (err.value.field, err.value.expected, err.value.got) == ("seed", int, 1.5)
    with pytest.raises(ConfigError) as err:
        build(demo, {"inputs": ["a"], "out": "o", "workers": 1, "size": "9MB"})
    assert (err.value.field, err.value.got) == ("size", "9MB")
    with pytest.raises(ConfigError) as err:
        build(demo, {"inputs": ["a"], "out": "o", "workers": 0})
    assert (err.value.field, err.value.expected, err.value.got) == ("workers", ">= 1", 0)
