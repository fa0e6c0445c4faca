"""Typed YAML configuration.

Each stage declares its settings as (nested) dataclasses; ``load_config`` reads a YAML file
into them.  Unknown keys are an error that names the file and section and lists the valid keys
(with a "did you mean" suggestion), wrong types are an error naming the key, and every default
is visible in one place: the dataclass.  ``config_to_dict`` gives the resolved configuration
back (it is stored with models and checkpoints).

Example::

    @dataclass
    class Optim:
        lr: float = 1e-3

    @dataclass
    class Train:
        epochs: int = 10
        optim: Optim = field(default_factory=Optim)

    cfg = load_config("train.yaml", Train)
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Union

from .errors import ConfigError

_NONE = type(None)


def _where(source, path):
    loc = f" in section '{path}'" if path else ""
    src = f" of {source}" if source else ""
    return loc + src


def _describe(tp) -> str:
    """A type annotation in words, for messages ('an integer or 'auto'', not typing's repr)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or (origin is not None and str(origin) == "types.UnionType"):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return " or ".join(map(repr, args))
    if origin in (list, tuple):
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            _NONE: "null (omitted)"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value, tp, key, source, path):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    full = f"{path}.{key}" if path else key
    if tp is Any:
        return value
    if origin is Union or (origin is not None and str(origin) == "types.UnionType"):
        if value is None and _NONE in args:
            return None
        for a in args:
            if a is _NONE:
                continue
            try:
                return _coerce(value, a, key, source, path)
            except ConfigError:
                pass          # the union's message below names every alternative
        quoted = ""
        if isinstance(value, str):
            try:
                float(value)
                quoted = " (a quoted number is a string: write it without quotes)"
            except ValueError:
                pass
        raise ConfigError(f"'{full}'{_where(source, '')}: {value!r} does not fit: expected {_describe(tp)}{quoted}")
    if origin is typing.Literal:
        if isinstance(value, bool) and value not in args and {"on", "off"} <= set(args):
            # YAML 1.1 reads an unquoted on/off as a boolean ('progress_bar: off' was refused)
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(
                f"'{full}'{_where(source, '')}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{full}'{_where(source, '')}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"'{full}'{_where(source, '')}: expected {len(args)} items")
            return tuple(_coerce(v, a, key, source, path) for v, a in zip(value, args))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, key, source, path) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{full}'{_where(source, '')}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, key, source, path): _coerce(v, vt, key, source, full)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, path=full)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{full}'{_where(source, '')}: expected true or false, got {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{full}'{_where(source, '')}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"'{full}'{_where(source, '')}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{full}'{_where(source, '')}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{full}'{_where(source, '')}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data, *, source=None, path: str = ""):
    """Build dataclass ``cls`` from a mapping, validating keys and types recursively."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"section '{path or '<top>'}'{_where(source, '')} must be a mapping, "
                          f"got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    # inline fields: a nested dataclass whose keys are written in this section itself (the
    # descriptor spec inside the ``descriptor:`` section)
    data = dict(data)
    inline = {}
    for f in fields.values():
        if f.metadata.get("inline"):
            sub = {sf.name for sf in dataclasses.fields(hints[f.name])}
            inline[f.name] = from_dict(hints[f.name], {k: data.pop(k) for k in list(data) if k in sub},
                                       source=source, path=path)
    valid = [k for k in fields if k not in inline] + [sf.name for name in inline
                                                      for sf in dataclasses.fields(hints[name])]
    unknown = [k for k in data if k not in fields or k in inline]
    if unknown:
        msgs = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), valid, n=1)
            msgs.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(msgs)}{_where(source, path)}; "
            f"valid keys are: {', '.join(sorted(valid))}")
    kwargs = {k: _coerce(v, hints[k], k, source, path) for k, v in data.items()}
    for k, v in kwargs.items():
        if fields[k].metadata.get("path"):
            kwargs[k] = expand_path(v, f"{path}.{k}" if path else k, source)
    for k, v in kwargs.items():
        _check_bounds(fields[k], v, f"{path}.{k}" if path else k, source)
    kwargs.update(inline)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"section '{path or '<top>'}'{_where(source, '')}: {exc}") from None
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


# bounds of numeric settings, declared where the setting is: field(default=..., metadata=BOUNDS)
def bounds(ge=None, gt=None, le=None, lt=None, **extra) -> dict:
    """Field metadata for numeric limits: ``epochs: int = field(default=100, metadata=bounds(ge=1))``."""
    return {"bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None},
            **extra}


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


# settings that name files or folders, declared where the setting is:
# field(default=..., metadata=paths("in")) for what is read, paths("out") for what is written
def paths(kind: str = "in", **extra) -> dict:
    """Field metadata of a path setting (a string or a list of strings): ``~`` and environment
    variables ($SCRATCH, ${USER}) are expanded as a shell would, an unset variable is an error,
    and a relative input path is taken from the working directory (as on the command line),
    which :func:`load_config` checks against the configuration file's folder."""
    assert kind in ("in", "out")
    return {"path": kind, **extra}


_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_path(value, full: str, source=None):
    """``~`` and ``$VARIABLES`` of a path setting expanded; an unset variable is a ConfigError.
    (They were taken literally: 'output: ~/runs/a' trained into a folder named '~' in the working
    directory, and '$SCRATCH/train.h5' was 'does not exist', sweep 20.)"""
    if isinstance(value, (list, tuple)):
        return type(value)(expand_path(v, full, source) for v in value)
    if not isinstance(value, str):
        return value
    for m in _VARIABLE.finditer(value):
        name = m.group(1).strip("{}")
        if name not in os.environ:
            raise ConfigError(f"'{full}'{_where(source, '')}: {value!r} uses the environment variable ${name}, "
                              f"which is not set in this job (paths expand ~ and $VARIABLES as a shell does)")
    return os.path.expanduser(os.path.expandvars(value))


def _path_fields(obj, prefix: str = ""):
    """(dotted key, owning dataclass, field) of every path setting of a configuration dataclass,
    recursively (inline sections list their keys in the enclosing one)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _path_fields(v, prefix if f.metadata.get("inline") else f"{prefix}{f.name}.")
        elif f.metadata.get("path"):
            yield f"{prefix}{f.name}", obj, f


def _path_settings(obj):
    """(key, kind, value) of every path setting of a configuration dataclass that is set."""
    for key, owner, f in _path_fields(obj):
        v = getattr(owner, f.name)
        if v:
            yield key, f.metadata["path"], v


def absolute_paths(obj):
    """A copy of configuration ``obj`` whose relative path settings are absolute, taken from the
    working directory as the run took them.  What a run records (its config.yaml) must mean the
    same files from wherever it is read: with the paths as given, ``train run/config.yaml
    --resume auto`` or ``evaluate --split`` from another directory looked for the data there
    (left by sweep 20)."""
    import copy

    out = copy.deepcopy(obj)
    for _, owner, f in _path_fields(out):
        setattr(owner, f.name, absolute_path_value(getattr(owner, f.name)))
    return out


def absolute_path_value(v):
    """A path setting's value (a string or a list of them) with relative paths made absolute."""
    if isinstance(v, (list, tuple)):
        return type(v)(os.path.abspath(p) if isinstance(p, str) and p else p for p in v)
    return os.path.abspath(v) if isinstance(v, str) and v else v


def path_keys(obj) -> set:
    """The dotted keys ("data.train", ...) of every path setting of a configuration dataclass."""
    return {key for key, _, _ in _path_fields(obj)}


def check_relative_paths(obj, source) -> None:
    """Relative input paths are taken from the working directory, not from the folder of the
    configuration file ``source``.  A batch script that changes directory before the run made a
    relative path miss (an error naming the path alone) or, worse, hit another file of the same
    name (sweep 20).  Now: a path missing from the working directory that exists beside the
    configuration is an error naming both; one that exists in both places as different files is
    a warning naming the one used."""
    if source is None:
        return
    home = Path(os.path.abspath(source)).parent
    cwd = Path.cwd()
    try:
        if home.resolve() == cwd.resolve():
            return
    except OSError:
        return
    for key, kind, value in _path_settings(obj):
        if kind != "in":
            continue
        for p in (value if isinstance(value, (list, tuple)) else [value]):
            if not isinstance(p, str) or os.path.isabs(p) or any(c in p for c in "*?[{"):
                continue
            here, there = cwd / p, home / p
            if not there.exists():
                continue
            if not here.exists():
                raise ConfigError(f"'{key}' of {source}: {p} does not exist in the working directory {cwd}; "
                                  f"{there} does: relative paths in a configuration are taken from the working "
                                  f"directory, not from the configuration's folder: write {there}, or run from {home}")
            try:
                same = os.path.samefile(here, there)
            except OSError:
                same = False
            if not same:
                from .utils.launch import placement
                from .utils.log import warn

                if placement().rank == 0:
                    warn(f"'{key}' of {source}: {p} is {here} (relative paths in a configuration are taken from "
                         f"the working directory); the configuration's folder holds another {there}")


def _check_bounds(f, value, full, source) -> None:
    """The declared limits of field ``f`` (each number of a list too)."""
    limits = f.metadata.get("bounds") if f.metadata else None
    if not limits or value is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        for op, lim in limits.items():
            ok = {"ge": v >= lim, "gt": v > lim, "le": v <= lim, "lt": v < lim}[op]
            if not ok:
                raise ConfigError(f"'{full}'{_where(source, '')}: {value!r} must be {_BOUND_TEXT[op]} {lim}")


def check_declared_bounds(obj) -> None:
    """Check the declared limits of a dataclass built in code (the loader checks them itself)."""
    for f in dataclasses.fields(obj):
        _check_bounds(f, getattr(obj, f.name), f.name, None)


def load_yaml(path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    return data or {}


def load_config(path, cls, overrides: dict | None = None):
    """Read YAML file ``path`` into dataclass ``cls``; ``overrides`` (dotted keys) win."""
    data = load_yaml(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        node = data
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    try:
        cfg = from_dict(cls, data, source=str(path) if path is not None else None)
        check_relative_paths(cfg, path)
        return cfg
    except ConfigError as exc:
        # the message names the file; a key or value that came from --set did not come from it
        msg = str(exc)
        hit = [d for d in (overrides or {}) if f"'{d}'" in msg or f"'{d.split('.')[-1]}'" in msg]
        if hit:
            raise ConfigError(f"{msg} (from --set {', '.join(f'{d}={overrides[d]!r}' for d in hit)})") from None
        raise


def config_to_dict(obj) -> dict:
    """The mapping :func:`from_dict` reads back (inline fields written into their section)."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            v = config_to_dict(getattr(obj, f.name))
            if f.metadata.get("inline"):
                out.update(v)
            else:
                out[f.name] = v
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(config_to_dict(v) for v in obj)
    if isinstance(obj, dict):
        return {k: config_to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str):
    """Parse a ``--set key.sub=value`` command-line override (value parsed as YAML)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.subkey=value")
    key, val = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(val)
    except yaml.YAMLError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"--set {text}: the value is not valid YAML ({msg}); e.g. --set model.hidden=[8,8]") from None
