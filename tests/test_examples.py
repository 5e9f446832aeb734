"""Every example ``qgdist ...`` command line in README.md, docs/ and jobs/ goes through the real parser.

Command lines are taken from code blocks and inline code spans of the Markdown files, and from the comments of
the jobs/*.yaml runtime envs (their "Entry point" examples). Each is parsed as far as it can be:

* a complete command (no ``...``/``ARGS`` placeholder, no ``[optional]`` synopsis) goes through
  ``build_parser().parse_args`` and the command's config is built with ``from_args``: its flags exist, its values
  have the right types and ranges, required settings are there;
* a synopsis or a line with placeholders: every flag it names exists for its command;
* a mention (``qgdist convert``): the command exists.

``qgdist submit STAGE ... -- ARGS`` is checked twice: submit's own options, and ``STAGE ARGS`` as a command.
Values that name where things live are held to the layouts the code reads: ``--checkpoint`` a run directory, a
checkpoint directory (``.../checkpoints/step-N``) or its ``state.pt``; ``--resume-from`` a checkpoint; ``--data`` of
train / evaluate a converted dataset directory, not a raw file.
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import re
import shlex
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import pytest

from qgdist.cli import build_parser
from qgdist.core.config import from_args

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "jobs" / "README.md",
           *sorted((REPO / "jobs").glob("*.yaml"))]
PLACEHOLDERS = {"...", "…", "ARGS", "ARGV..."}
SHELL_BREAKS = {";", "&&", "||", "|", "&", ">", ">>", "<"}


@dataclass(frozen=True)
class Example:
    where: str        # file:line
    words: tuple[str, ...]
    fragment: bool = False   # an inline span in prose, which may leave out required settings

    def __str__(self) -> str:
        return f"{self.where}: qgdist {shlex.join(self.words)}"


# -- extraction -------------------------------------------------------------------------------------------------------
def _commands(text: str) -> list[list[str]]:
    """The argument lists of every qgdist invocation in a shell-like text (comments and other commands dropped)."""
    text = text.replace("\\|", "|").replace("\\\n", " ")
    words: list[str] = []
    for line in text.splitlines():   # one command line per line (continuations joined above)
        try:
            words += shlex.split(line, comments=True) + [";"]
        except ValueError:   # unbalanced quotes in prose: not a command line
            continue
    found: list[list[str]] = []
    current: list[str] | None = None
    at_start, python = True, False   # at a command's first word (after env assignments); `python -m` seen
    for word in words:
        if word in SHELL_BREAKS or word.endswith(";"):
            if current is not None:
                found.append(current + ([word[:-1]] if word.endswith(";") and len(word) > 1 else []))
            current, at_start, python = None, True, False
        elif current is not None:
            current.append(word)
        elif at_start and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", word):
            continue                                        # VAR=value qgdist ...
        elif at_start and (word == "qgdist" or word.endswith("/qgdist")) or python and word == "qgdist":
            current = []                                    # qgdist ..., .venv/bin/qgdist ..., python -m qgdist
        else:
            python = at_start and word.split("/")[-1].startswith("python") or python and word == "-m"
            at_start = False
    # not a command: an error message quoted ("qgdist evaluate: ..."), or a placeholder (qgdist COMMAND --help)
    return [c for c in found if c and not c[0].endswith(":") and not c[0].startswith("-") and not c[0].isupper()]


def examples(path: Path) -> list[Example]:
    """Command lines of a Markdown file (code blocks, inline spans) or of a YAML file's comments."""
    lines = path.read_text().splitlines()
    rel = path.relative_to(REPO)
    out: list[Example] = []
    if path.suffix == ".yaml":
        comments = [(i, line.lstrip()[1:]) for i, line in enumerate(lines, 1) if line.lstrip().startswith("#")]
        block = "\n".join(text for _, text in comments)
        for words in _commands(block):
            out.append(Example(f"{rel}:{comments[0][0]}", tuple(words)))
        return out
    in_block, shell, block, start, paragraph, para_start = False, False, [], 0, [], 0
    for number, line in enumerate(lines + [""], 1):
        if line.strip().startswith("```"):
            if in_block and shell:   # shell blocks only: a diagram or a file layout is not a command line
                for words in _commands("\n".join(block)):
                    out.append(Example(f"{rel}:{start}", tuple(words)))
            shell = not in_block and line.strip()[3:].strip() in ("bash", "sh", "shell", "console")
            in_block, block, start = not in_block, [], number
            continue
        if in_block:
            block.append(line)
            continue
        if line.strip():
            para_start = para_start or number
            paragraph.append(line)
            continue
        for span in re.findall(r"`([^`]+)`", " ".join(paragraph)):
            for words in _commands(span):
                out.append(Example(f"{rel}:{para_start}", tuple(words), fragment=True))
        paragraph, para_start = [], 0
    return out


def all_examples() -> list[Example]:
    return [e for path in SOURCES for e in examples(path)]


# -- checking -------------------------------------------------------------------------------------------------------
@functools.cache
def parser() -> argparse.ArgumentParser:
    return build_parser()


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def resolve(words: list[str]) -> tuple[argparse.ArgumentParser, list[str], list[str]]:
    """(leaf parser, command path, the rest) of ``words``; raises if a command name does not exist."""
    p, path, rest = parser(), [], list(words)
    while _subparsers(p) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        if name not in _subparsers(p):
            raise AssertionError(f"no command `qgdist {' '.join(path + [name])}` (has: {sorted(_subparsers(p))})")
        p, path = _subparsers(p)[name], path + [name]
    return p, path, rest


def expansions(words: tuple[str, ...]) -> list[list[str]]:
    """``a|b`` alternatives (``jobs list|status``, ``--batch-size 256|128``) as separate command lines."""
    options = [w.split("|") if "|" in w and not w.startswith(("-", "'", '"')) and "://" not in w else [w]
               for w in words]
    return [list(choice) for choice in itertools.product(*options)][:16]


def flags_exist(p: argparse.ArgumentParser, path: list[str], rest: list[str]) -> None:
    known = set(p._option_string_actions)
    for word in rest:
        flag = word.strip("[]").split("=")[0]
        if flag.startswith("--") and flag != "--":
            assert flag in known, f"`qgdist {' '.join(path)}` has no flag {flag}"


LAYOUT_FLAGS = {"--checkpoint", "--resume-from", "--data"}


def layout_problems(path: list[str], args: argparse.Namespace, rest: list[str]) -> list[str]:
    """Values that name a file layout the code does not read."""
    problems = []
    for flag, value in zip(rest, rest[1:]):
        if flag not in LAYOUT_FLAGS or value.startswith("-"):
            continue
        parts = value.rstrip("/").split("/")
        if flag in ("--checkpoint", "--resume-from"):
            is_checkpoint = len(parts) >= 2 and parts[-2] == "checkpoints" and parts[-1].startswith("step-")
            is_state = parts[-1] in ("state.pt", "model.pt")
            is_run_dir = "checkpoints" not in parts and parts[-1] not in ("best", "latest", "best.json",
                                                                          "latest.json")
            ok = is_checkpoint or is_state or (is_run_dir and flag == "--checkpoint")
            if not ok:
                problems.append(f"{flag} {value}: not a run directory, a checkpoints/step-N directory, a state.pt "
                                "or a model.pt")
        elif path[0] in ("train", "evaluate") and parts[-1].endswith((".npz", ".parquet")):
            problems.append(f"{flag} {value}: {path[0]} reads a converted dataset directory, not a raw file")
    return problems


def placeholder(word: str) -> bool:
    """``...``, ``<run-name>``, ``RUN_DIR``, ``N``: a value the reader fills in."""
    return word in PLACEHOLDERS or "<" in word or re.fullmatch(r"[A-Z][A-Z0-9_]*(\.\.\.)?", word) is not None


MISSING = ("is required", ": required", "expected one argument")


def check(words: list[str], fragment: bool = False) -> None:
    """Parse one command line as far as it goes; raises AssertionError (or ConfigError) naming what is wrong.

    A line with placeholders, or a fragment quoted in prose that leaves out required settings, falls back to
    checking that its flags exist; anything else must parse and build its config.
    """
    p, path, rest = resolve(words)
    if not path or not rest or rest == ["--help"]:
        return   # a mention of the command
    if path == ["submit"]:
        own, job = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
        stage = own[0] if own and not own[0].startswith("-") else None
        if stage and job and not placeholder(stage):
            check([stage, *job], fragment)   # the job's own command line, as `qgdist submit` checks it
        rest = own
    if any(w.startswith("[") or w.endswith("]") for w in rest):
        flags_exist(p, path, rest)   # a synopsis
        return
    stderr = io.StringIO()
    try:
        try:
            with redirect_stderr(stderr):
                args = parser().parse_args([*path, *rest])
        except SystemExit:
            raise AssertionError(stderr.getvalue().strip().splitlines()[0]) from None   # the refusal, not the hint
        cls = getattr(args, "config_cls", None)
        if cls is not None and path != ["submit"]:
            from_args(cls, args)   # required settings, types and ranges
    except (AssertionError, ValueError) as err:
        if any(placeholder(w) for w in rest) or fragment and any(m in str(err) for m in MISSING):
            flags_exist(p, path, rest)
            return
        raise
    problems = layout_problems(path, args, rest)
    assert not problems, "; ".join(problems)


EXAMPLES = all_examples()


def test_the_docs_hold_examples_of_every_stage() -> None:
    """The extraction finds what is there (a broken extractor would make the check below vacuous)."""
    commands = {e.words[0] for e in EXAMPLES}
    assert {"generate", "convert", "inspect", "train", "evaluate", "predict", "export", "tracker", "submit", "jobs",
            "bench", "quickstart"} <= commands
    assert len(EXAMPLES) > 100
    assert any(e.where.startswith("jobs/evaluate.yaml") and "--checkpoint" in " ".join(e.words) for e in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.where)
def test_every_example_parses(example: Example) -> None:
    failures = []
    for words in expansions(example.words):
        try:
            check(words, example.fragment)
        except (AssertionError, ValueError) as err:   # ConfigError is a ValueError
            failures.append(f"{example}\n  -> {err}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("line, problem", [
    ("evaluate --checkpoint runs/pn/best --data shards/ef", "not a run directory"),
    ("train --data shards/ef --model resnet15 --resume-from runs/pn", "not a run directory"),
    ("train --data raw/toy.npz --model resnet15", "not a raw file"),
    ("train --data shards/ef --model resnet15 --batch-sise 8", "unrecognized arguments: --batch-sise"),
    ("train --data shards/ef --model resnet15 --batch-size 0", "batch_size: must be >= 1"),
    ("bench loader [--jets 10] [--no-such-flag]", "has no flag --no-such-flag"),
    ("convrt --source cms --out o x", "no command `qgdist convrt`"),
    ("submit train --wait -- --data shards/ef --model resnet15 --epocks 3", "unrecognized arguments: --epocks"),
])
def test_the_check_refuses_what_does_not_exist(line: str, problem: str) -> None:
    with pytest.raises((AssertionError, ValueError), match=re.escape(problem)):
        check(shlex.split(line))
