"""The flag generator: dataclass fields -> argparse options, YAML config files, explicit flags on top."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Literal

import pytest

from qgdist.core.config import add_arguments, build, describe, from_args, option, to_dict, to_flat_dict


def _size(text: str) -> int:
    if not text.endswith("KiB"):
        raise ValueError(f"size {text!r} must end in KiB")
    return int(text[:-3]) << 10


@dataclass(frozen=True)
class Inner:
    rate: float | None = option(None, "a rate")
    mode: Literal["fast", "exact"] = option("exact", "how")
    progress: bool = option(True, "a bar", aliases={"--quiet": False})
    extra: dict[str, Any] = option({}, "JSON values", flag="--extra-arg")
    env: dict[str, str] = option({}, "text values")


@dataclass(frozen=True)
class Outer:
    name: str = option(help="required name")
    inputs: list[str] = option([], "files", positional=True)
    size: int = option(1024, "bytes", parse=_size)
    inner: Inner = Inner()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, Outer)
    return parser


def test_fields_become_typed_flags_with_sections_flattened():
    args = _parser().parse_args(["a", "b", "--name", "n", "--rate", "2", "--mode", "fast", "--quiet",
                                 "--extra-arg", "k=[1, 2]", "--env", "N=1", "--size", "4KiB"])
    cfg = from_args(Outer, args)
    assert cfg == Outer(name="n", inputs=["a", "b"], size=4096,
                        inner=Inner(rate=2.0, mode="fast", progress=False, extra={"k": [1, 2]}, env={"N": "1"}))
    assert to_flat_dict(cfg)["rate"] == 2.0 and build(Outer, to_dict(cfg)) == cfg
    assert "inner:" in describe(cfg)


def test_choices_and_parse_errors_are_argparse_errors():
    with pytest.raises(argparse.ArgumentError, match="invalid choice"):
        _parser().parse_args(["--name", "n", "--mode", "slow"])
    with pytest.raises(argparse.ArgumentError, match="must end in KiB"):
        _parser().parse_args(["--name", "n", "--size", "4MB"])


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: from-file\nsize: 2KiB\ninner:\n  rate: 0.5\n  mode: fast\n")
    cfg = from_args(Outer, _parser().parse_args(["x", "--config", str(path), "--rate", "0.25"]))
    assert (cfg.name, cfg.size, cfg.inner.rate, cfg.inner.mode) == ("from-file", 2048, 0.25, "fast")
    path.write_text("name: n\ninner:\n  speed: 1\n")
    with pytest.raises(ValueError, match="c.yaml: section inner: unknown setting 'speed'"):
        from_args(Outer, _parser().parse_args(["x", "--config", str(path)]))


def test_required_field_is_named_and_names_must_be_unique():
    with pytest.raises(ValueError, match="--name is required"):
        from_args(Outer, _parser().parse_args(["x"]))

    @dataclass(frozen=True)
    class Twice:
        inner: Inner = Inner()
        rate: float = option(1.0, "clashes with inner.rate")

    with pytest.raises(TypeError, match="'rate' appears in two sections"):
        add_arguments(argparse.ArgumentParser(), Twice)


def test_option_declares_a_flags_whole_contract_in_one_place():
    """Every argument of ``option`` reaches the flag and the checks. The config is declared inside the test, so
    ``option`` runs here (a class declared at import has its fields made before any test runs)."""
    def even(value: int) -> str | None:
        return None if value % 2 == 0 else "must be even"

    @dataclass(frozen=True)
    class Local:
        files: list[str] = option([], "input files", positional=True)
        batch: int = option(8, "jets per batch", flag="--bs", metavar="N", min=1, max=64, check=even)
        frac: float = option(0.5, "a fraction", gt=0, lt=1)
        size: int = option(1024, "bytes", parse=_size)
        progress: bool = option(True, "bars", aliases={"--quiet": False})
        secret: str = option("hidden", "not a flag", cli=False)

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, Local)
    text = parser.format_help()
    assert "--bs N" in text and "jets per batch (default: 8; >= 1 and <= 64)" in text
    assert "a fraction (default: 0.5; > 0 and < 1)" in text and "same as setting progress to False" in text
    assert "--secret" not in text and "--batch" not in text
    cfg = from_args(Local, parser.parse_args(["a", "b", "--bs", "4", "--size", "2KiB", "--quiet", "--frac", "0.25"]))
    assert cfg == Local(files=["a", "b"], batch=4, frac=0.25, size=2048, progress=False, secret="hidden")
    for flags, refusal in ((["--bs", "0"], "batch (--bs): must be >= 1 and <= 64, got 0"),
                           (["--bs", "66"], "batch (--bs): must be >= 1 and <= 64, got 66"),
                           (["--bs", "3"], "batch (--bs): must be even, got 3"),
                           (["--frac", "1"], "frac: must be > 0 and < 1, got 1.0"),
                           (["--frac", "0"], "frac: must be > 0 and < 1, got 0.0")):
        with pytest.raises(ValueError) as err:
            from_args(Local, parser.parse_args(["a", *flags]))
        assert str(err.value) == refusal
    one, two = Local(), Local()
    one.files.append("x")   # a mutable default is each instance's own
    assert two.files == [] and Local().files == []
