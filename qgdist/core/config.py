"""Typed configs are the single source of every flag: dataclass fields become command-line options.

A stage describes its settings once, as a frozen dataclass whose fields carry their help text::

    @dataclass(frozen=True)
    class OptimConfig:
        lr: float | None = option(None, "peak learning rate (default: the recipe's)")
        schedule: Literal["onecycle", "step", "constant"] | None = option(None, "learning-rate schedule")

``add_arguments(parser, Config)`` turns each field into a flag (``lr`` -> ``--lr``; ``Literal`` -> choices;
``bool`` -> ``--x/--no-x``; ``list``/``tuple`` -> several values; ``dict`` -> repeatable ``KEY=VALUE``); a field
whose type is another config dataclass is a *section*: its fields become flags of their own (flat names, so
``--lr`` rather than ``--optim.lr``), shown under the section's heading in ``--help``. ``from_args`` builds the
config from, in increasing priority: the dataclass defaults, a YAML ``--config`` file, and the flags actually
given on the command line. Knowing which flags were given is what lets an explicit flag beat a recipe's default.

Why our own ~200 lines instead of tyro, jsonargparse or simple-parsing: those name nested flags by their path
(``--optim.lr``) and build their own parser objects, while qgdist's flags, job files and k8s manifests use flat
names, and ``qgdist submit`` and the manifest tests check job arguments with the plain argparse parsers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from qgdist.core.errors import ConfigError

T = TypeVar("T")
CONFIG_FLAG = "config"


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,  # noqa: A002
           positional: bool = False, metavar: str | None = None, parse: Callable[[str], Any] | None = None,
           aliases: Mapping[str, Any] | None = None, cli: bool = True) -> Any:
    """A dataclass field with command-line metadata.

    ``flag`` renames the option (default ``--field-name``); ``positional`` makes it a positional argument;
    ``parse`` converts the flag's text (e.g. ``"64MiB"`` -> bytes); ``aliases`` adds flags that store a fixed
    value (``{"--quiet": False}`` on ``progress``); ``cli=False`` keeps the field out of the command line.
    Mutable defaults (lists, dicts) are copied per instance.
    """
    meta = {"help": help, "flag": flag, "positional": positional, "metavar": metavar, "parse": parse,
            "aliases": dict(aliases or {}), "cli": cli}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# -- types ---------------------------------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def is_section(tp: Any) -> bool:
    """True for a field whose type is itself a config dataclass."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _scalar(tp: Any) -> Callable[[str], Any]:
    if typing.get_origin(tp) is Literal:
        first = typing.get_args(tp)[0]
        return type(first)
    if tp in (int, float, str, Path):
        return tp
    raise TypeError(f"no command-line parser for type {tp!r}")


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` with its ValueError shown to the user as the reason (argparse hides it otherwise)."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a JSON value (``k=3`` -> 3, ``k=[1,2]`` -> list), plain text when it is not JSON."""
    key, value = _key_text(text)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _key_text(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` with VALUE kept as written (``dict[str, str]`` fields, e.g. environment variables)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"want KEY=VALUE, got {text!r}")
    return key, value


# -- walking a config class -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Leaf:
    """One command-line field: where it sits in the config (``path``), its flat name, type and metadata."""

    path: tuple[str, ...]
    field: dataclasses.Field
    type: Any

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def dest(self) -> str:
        return "__".join(self.path)


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str | None, Leaf]]:
    """Every field of ``cls`` (sections flattened), with the section it belongs to."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if is_section(tp):
            for _, leaf in leaves(tp, prefix + (f.name,)):
                yield f.name, leaf
        elif f.init:
            yield (prefix[-1] if prefix else None), Leaf(prefix + (f.name,), f, tp)


def flat_names(cls: type) -> dict[str, tuple[str, ...]]:
    """Flat field name -> path in the nested config; flat names are unique (they are the flags)."""
    out: dict[str, tuple[str, ...]] = {}
    for _, leaf in leaves(cls):
        if leaf.name in out:
            raise TypeError(f"{cls.__name__}: field name {leaf.name!r} appears in two sections; flags must be unique")
        out[leaf.name] = leaf.path
    return out


# -- argparse ------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, cls: type, config_file: bool = True) -> None:
    """Add one option per field of ``cls`` (and its sections) to ``parser``; defaults are the dataclass's."""
    flat_names(cls)  # refuses duplicate names early
    if config_file:
        parser.add_argument(f"--{CONFIG_FLAG}", metavar="FILE.yaml", default=argparse.SUPPRESS,
                            help="YAML file of settings (flat names or sections); flags given here override it")
    # config_cls lets `qgdist submit` build the config to check a job's arguments; command names errors.
    parser.set_defaults(config_cls=cls, command_name=parser.prog)
    groups: dict[str | None, Any] = {None: parser}
    for section, leaf in leaves(cls):
        if not leaf.field.metadata.get("cli", True):
            continue
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} options")
        _add_leaf(groups[section], leaf)


def _default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING or f.default is None:
        return ""
    value = ",".join(map(str, f.default)) if isinstance(f.default, (tuple, list)) else f.default
    return f" (default: {value})"


def _add_leaf(group: Any, leaf: Leaf) -> None:
    f, meta = leaf.field, leaf.field.metadata
    tp, _ = _strip_optional(leaf.type)
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    flag = meta.get("flag") or "--" + leaf.name.replace("_", "-")
    helptext = (meta.get("help") or "") + ("" if required else _default_text(f))
    kw: dict[str, Any] = {"dest": leaf.dest, "default": argparse.SUPPRESS, "help": helptext}
    kw["metavar"] = meta.get("metavar") or leaf.name.upper()
    if required and not meta.get("positional"):
        kw["help"] += " (required)"
    origin = typing.get_origin(tp)
    if meta.get("parse"):
        kw["type"] = _argparse_type(meta["parse"])
    elif tp is bool:
        kw["action"] = argparse.BooleanOptionalAction
        del kw["metavar"]
    elif origin in (list, tuple):
        item = typing.get_args(tp)[0]
        kw["type"], kw["nargs"] = _scalar(item), "+"
        if typing.get_origin(item) is Literal:
            kw["choices"] = typing.get_args(item)
            del kw["metavar"]
    elif origin in (dict, Mapping):
        text = typing.get_args(tp)[1:] == (str,)
        kw["type"], kw["action"] = (_key_text if text else _key_value), "append"
        kw["metavar"] = meta.get("metavar") or "KEY=VALUE"
        kw["help"] += " (repeatable" + ("" if text else "; values are JSON") + ")"
    else:
        kw["type"] = _scalar(tp)
        if typing.get_origin(tp) is Literal:
            kw["choices"] = typing.get_args(tp)
            del kw["metavar"]
    if meta.get("positional"):
        dest = kw.pop("dest")
        if kw.get("nargs") is None and not required:
            kw["nargs"] = "?"
        group.add_argument(dest, **kw)
    else:
        group.add_argument(flag, **kw)
    for alias, value in meta.get("aliases", {}).items():
        group.add_argument(alias, dest=leaf.dest, action="store_const", const=value, default=argparse.SUPPRESS,
                           help=f"same as setting {flag.lstrip('-')} to {value}")


# -- building configs ----------------------------------------------------------------------------------------------
def from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build ``cls`` from defaults < ``--config`` file < flags given on the command line < ``overrides``.

    A config may define ``validate()`` for checks across fields; it is called here. Any ``ValueError`` (or an
    unreadable config file) comes out as ``ConfigError``.
    """
    try:
        cfg = _from_args(cls, args, overrides)
        validate = getattr(cfg, "validate", None)
        if callable(validate):
            validate()
        return cfg
    except ConfigError:
        raise
    except (ValueError, OSError) as err:
        raise ConfigError(str(err)) from err


def _from_args(cls: type[T], args: argparse.Namespace, overrides: dict[str, Any]) -> T:
    values: dict[str, Any] = {}
    path = getattr(args, CONFIG_FLAG, None)
    if path:
        values.update(read_config_file(cls, path))
    names = {leaf.dest: leaf for _, leaf in leaves(cls)}
    for dest, value in vars(args).items():
        if dest in names:
            leaf = names[dest]
            tp, _ = _strip_optional(leaf.type)
            if typing.get_origin(tp) in (dict, Mapping) and isinstance(value, list):
                value = dict(value)
            values[leaf.name] = value
    values.update(overrides)
    return build(cls, values, where="the command line")


def read_config_file(cls: type, path: str | Path) -> dict[str, Any]:
    """Flat settings from a YAML file holding flat names (``lr: 0.001``) and/or sections (``optim: {lr: ...}``)."""
    import yaml

    text = Path(path).read_text()
    doc = yaml.safe_load(text) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a config file holds a mapping of settings, not {type(doc).__name__}")
    return flatten(cls, doc, where=str(path))


def flatten(cls: type, doc: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """Nested or flat settings -> flat ``{name: value}``; unknown names are an error naming ``where``."""
    names = flat_names(cls)
    sections = {f.name: _hints(cls)[f.name] for f in dataclasses.fields(cls) if is_section(_hints(cls)[f.name])}
    out: dict[str, Any] = {}
    for key, value in doc.items():
        key = key.replace("-", "_")
        if key in sections and isinstance(value, Mapping):
            out.update(flatten(sections[key], value, where=f"{where}: section {key}"))
        elif key in names:
            out[key] = value
        else:
            raise ValueError(f"{where}: unknown setting {key!r}; known: {', '.join(sorted(names))}")
    return out


def build(cls: type[T], values: Mapping[str, Any], where: str = "config") -> T:
    """Construct ``cls`` (and its sections) from flat or nested values; missing required ones name their flag."""
    flat = flatten(cls, values, where)
    return _construct(cls, flat, where)


def _construct(cls: type[T], flat: Mapping[str, Any], where: str) -> T:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if is_section(tp):
            kwargs[f.name] = _construct(tp, flat, where)
        elif f.name in flat:
            value = flat[f.name]
            if f.metadata.get("parse") and isinstance(value, str):   # e.g. "64MiB" from a YAML file
                value = f.metadata["parse"](value)
            kwargs[f.name] = _coerce(tp, value)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            raise ValueError(f"{where}: {flag if not f.metadata.get('positional') else f.name.upper()} is required")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any) -> Any:
    """YAML/JSON values into the field's type (lists -> tuples for tuple fields, str paths -> Path)."""
    tp, optional = _strip_optional(tp)
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if origin is list and isinstance(value, (list, tuple)):
        return list(value)
    if tp is Path and isinstance(value, str):
        return Path(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as nested plain data (JSON- and YAML-friendly)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def to_flat_dict(cfg: Any) -> dict[str, Any]:
    """A config's fields by flat name (sections flattened); for logging as MLflow parameters."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(to_flat_dict(value))
        else:
            out[f.name] = value
    return out


def describe(cfg: Any) -> str:
    """The resolved config as indented YAML, printed at the start of a run."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=110).rstrip()
