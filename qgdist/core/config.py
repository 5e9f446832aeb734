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
import math
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
           aliases: Mapping[str, Any] | None = None, cli: bool = True, min: float | None = None,  # noqa: A002
           max: float | None = None, gt: float | None = None, lt: float | None = None,  # noqa: A002
           check: Callable[[Any], str | None] | None = None) -> Any:
    """A dataclass field with command-line metadata and its valid range.

    ``flag`` renames the option (default ``--field-name``); ``positional`` makes it a positional argument;
    ``parse`` converts the flag's text (e.g. ``"64MiB"`` -> bytes); ``aliases`` adds flags that store a fixed
    value (``{"--quiet": False}`` on ``progress``); ``cli=False`` keeps the field out of the command line.
    Mutable defaults (lists, dicts) are copied per instance.

    The range is declared here once and checked whenever a config is built (``build``, ``from_args``: flags and
    YAML files alike): ``min``/``max`` are inclusive bounds, ``gt``/``lt`` exclusive ones (for a tuple or list
    field, each item's); ``check(value)`` returns the reason a value is refused, or None. Choices come from a
    ``Literal`` type. ``None`` (an unset optional field) is always allowed. A refusal is a ``ConfigError`` whose
    message starts with the field's name: ``batch_size: must be >= 1, got 0``.
    """
    bounds = {k: v for k, v in (("min", min), ("max", max), ("gt", gt), ("lt", lt)) if v is not None}
    meta = {"help": help, "flag": flag, "positional": positional, "metavar": metavar, "parse": parse,
            "aliases": dict(aliases or {}), "cli": cli, "bounds": bounds, "check": check}
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
    bounds = f.metadata.get("bounds")
    allowed = f"; {range_text(bounds)}" if bounds else ""
    # A list or dict default lives in a default_factory (option() copies it per instance): shown all the same.
    default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    if default is dataclasses.MISSING or default is None or default in ((), [], {}):
        return f" ({range_text(bounds)})" if bounds else ""
    value = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
    return f" (default: {value}{allowed})"


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

    Every field's declared range and every config's ``validate()`` are checked (see ``build``); a bad value, an
    unreadable config file or any other ``ValueError`` comes out as ``ConfigError``.
    """
    try:
        return _from_args(cls, args, overrides)
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
            raise ConfigError(f"{where}: unknown setting {key!r}; known: {', '.join(sorted(names))}", field=key)
    return out


def build(cls: type[T], values: Mapping[str, Any], where: str = "config") -> T:
    """Construct ``cls`` (and its sections) from flat or nested values, checked.

    Each value must have its field's type and lie in its declared range (``option(min=..., ...)``), and each
    config's ``validate()`` (checks across fields) must pass; otherwise ``ConfigError`` names the field. A
    missing required field names its flag.
    """
    flat = flatten(cls, values, where)
    try:
        return _construct(cls, flat, where)
    except ConfigError:
        raise
    except ValueError as err:   # a __post_init__ or validate() refusing a combination of values
        raise ConfigError(str(err)) from err


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
                try:
                    value = f.metadata["parse"](value)
                except ValueError as err:
                    raise ConfigError(f"{f.name}: {err}", field=f.name, got=value) from None
                kwargs[f.name] = value
            elif f.metadata.get("parse") and isinstance(value, tuple):
                kwargs[f.name] = value   # what the parser made of a flag (e.g. --workers 2-8 -> (2, 8))
            else:
                kwargs[f.name] = _coerce(tp, value, f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            raise ConfigError(f"{where}: {flag if not f.metadata.get('positional') else f.name.upper()} is required",
                              field=f.name)
    cfg = cls(**kwargs)
    for f in dataclasses.fields(cls):
        if f.init and not is_section(hints[f.name]):
            check_field(f, hints[f.name], getattr(cfg, f.name))
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def _refuse(name: str, reason: str, value: Any, expected: Any = None) -> ConfigError:
    return ConfigError(f"{name}: {reason}, got {value!r}", field=name.split()[0], expected=expected, got=value)


def _coerce(tp: Any, value: Any, name: str = "value") -> Any:
    """A YAML/JSON/flag value as the field's type (lists -> tuples for tuple fields, str paths -> Path, ints ->
    floats for float fields); a value of another type is a ``ConfigError`` naming the field."""
    tp, optional = _strip_optional(tp)
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _refuse(name, "must be a list", value)
        items = typing.get_args(tp)
        item = items[0] if items and (origin is list or len(items) == 2 and items[1] is Ellipsis
                                      or len(set(items)) == 1) else Any
        values = [_coerce(item, v, name) for v in value]
        return tuple(values) if origin is tuple else values
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _refuse(name, "must be a mapping of KEY=VALUE settings", value)
        item = (typing.get_args(tp) or (str, Any))[1]
        return {k: _coerce(item, v, f"{name}[{k}]") for k, v in value.items()} if origin is dict else value
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) or value not in choices:
            raise _refuse(name, f"must be one of {', '.join(map(str, choices))}", value, expected=choices)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _refuse(name, "must be true or false", value, expected=bool)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _refuse(name, "must be an integer", value, expected=int)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _refuse(name, "must be a number", value, expected=float)
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)    # a YAML run name such as 2024
        if not isinstance(value, str):
            raise _refuse(name, "must be text", value, expected=str)
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise _refuse(name, "must be a path", value, expected=Path)
        return Path(value)
    return value


def range_text(bounds: Mapping[str, float]) -> str:
    """``{"min": 1}`` -> ``">= 1"``; ``{"gt": 0, "max": 1}`` -> ``"> 0 and <= 1"``."""
    signs = {"min": ">=", "gt": ">", "max": "<=", "lt": "<"}
    return " and ".join(f"{signs[k]} {bounds[k]:g}" for k in ("min", "gt", "max", "lt") if k in bounds)


def _out_of_range(value: Any, bounds: Mapping[str, float]) -> bool:
    # Written so that NaN is out of every range.
    return not (("min" not in bounds or value >= bounds["min"]) and ("max" not in bounds or value <= bounds["max"])
                and ("gt" not in bounds or value > bounds["gt"]) and ("lt" not in bounds or value < bounds["lt"]))


def _label(f: dataclasses.Field) -> str:
    """The field's name, with its flag where the flag is not simply ``--field-name`` (``tail_lines (--tail)``)."""
    flag = f.metadata.get("flag")
    return f"{f.name} ({flag})" if flag and flag != "--" + f.name.replace("_", "-") else f.name


def check_field(f: dataclasses.Field, tp: Any, value: Any) -> None:
    """Raise ``ConfigError`` if ``value`` lies outside field ``f``'s declared range or fails its ``check``."""
    if value is None:
        return
    meta = f.metadata
    bounds = meta.get("bounds") or {}
    numbers = value if isinstance(value, (tuple, list)) else list(value.values()) if isinstance(value, Mapping) \
        else [value]
    for number in numbers:
        if isinstance(number, float) and not math.isfinite(number):
            raise _refuse(_label(f), "must be a finite number", number)
        if bounds and isinstance(number, (int, float)) and not isinstance(number, bool) \
                and _out_of_range(number, bounds):
            each = "each value " if isinstance(value, (tuple, list, Mapping)) else ""
            raise _refuse(_label(f), f"{each}must be {range_text(bounds)}", number, expected=range_text(bounds))
    check = meta.get("check")
    reason = check(value) if check is not None else None
    if reason:
        raise _refuse(_label(f), reason, value)


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
    """The resolved config as indented YAML, printed at the start of a run (credentials in URIs masked)."""
    import yaml

    from qgdist.core.secrets import redact_config

    return yaml.safe_dump(redact_config(to_dict(cfg)), sort_keys=False, default_flow_style=None, width=110).rstrip()
