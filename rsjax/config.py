"""Frozen config dataclasses as the API of methods, certifiers and training objectives.

A plug-in (a certification method, a certifier, a training objective) declares its options
once, as the fields of a frozen dataclass built with :func:`option`::

    @dataclasses.dataclass(frozen=True)
    class QCRSConfig:
        qcrs_search: str = option("grid", "how sigma is searched", choices=("grid", "bisection"))
        qcrs_left: float = option(0.12, "lower end of the sigma interval")

        def __post_init__(self):
            check(self.qcrs_left > 0, "--qcrs-left must be > 0")

From that one declaration come the command-line flags (:func:`add_arguments`: ``--qcrs-search``
with its type, default, choices and help), the config from parsed flags (:func:`from_args`)
and the settings recorded with a result (:func:`to_dict`). Validation lives in
``__post_init__`` and raises :class:`rsjax.errors.RsjaxError`, so a config that exists is a
valid one, however it was made (flags, Python, a recorded sidecar).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Optional

from rsjax.errors import RsjaxError

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, choices=None, metavar=None, flag=None):
    """A dataclass field that is also a command-line option.

    ``flag`` overrides the generated flag name (``--field-name``); ``choices`` restricts the
    value; the default and the help text appear in ``--help``.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "metavar": metavar, "flag": flag}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable option defaults are not allowed; use a tuple")
    return dataclasses.field(default=default, metadata=meta)


def check(condition: bool, message: str):
    """Raise :class:`RsjaxError` with ``message`` unless ``condition`` (config validation)."""
    if not condition:
        raise RsjaxError(message)


def _base_type(tp):
    """(python type, optional?) of a field annotation such as ``float`` or ``Optional[int]``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def flag_name(f: dataclasses.Field, prefix: str = "") -> str:
    return f.metadata.get("flag") or "--" + prefix + f.name.replace("_", "-")


def _parse_optional(typ):
    def parse(text):
        if text.lower() in ("none", "null", ""):
            return None
        return typ(text)

    parse.__name__ = typ.__name__
    return parse


def add_arguments(parser, cls, *, prefix: str = "", title: Optional[str] = None):
    """Register one flag per field of the dataclass ``cls`` on ``parser`` (or a new group).

    bool fields become ``--x/--no-x``; ``Optional[T]`` fields accept ``none``. Flags are
    added with ``default=argparse.SUPPRESS`` semantics left to :func:`from_args`, which falls
    back to the dataclass default, so the dataclass stays the one source of defaults.
    """
    hints = typing.get_type_hints(cls)
    target = parser.add_argument_group(title) if title else parser
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        typ, optional = _base_type(hints[f.name])
        default = f.default
        help_ = f.metadata.get("help", "")
        if default is not _MISSING and default is not None:  # a None default's help says what none means
            help_ = f"{help_} (default: {default})" if help_ else f"default: {default}"
        kwargs = dict(dest=prefix.replace("-", "_") + f.name, help=help_, default=None)
        if typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _parse_optional(typ) if optional else typ
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            if f.metadata.get("metavar"):
                kwargs["metavar"] = f.metadata["metavar"]
        target.add_argument(flag_name(f, prefix), **kwargs)
    return target


def from_args(cls, ns, *, prefix: str = "", **overrides):
    """The config ``cls(...)`` from an argparse namespace filled by :func:`add_arguments`.

    A flag the user did not give takes the dataclass default; ``overrides`` win over both.
    """
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        v = getattr(ns, prefix.replace("-", "_") + f.name, None)
        if v is not None:
            values[f.name] = v
    values.update(overrides)
    return cls(**values)


def given_flags(cls, ns, *, prefix: str = "") -> list:
    """Flag names the user gave explicitly for ``cls`` (to refuse options of another plug-in)."""
    return [flag_name(f, prefix) for f in dataclasses.fields(cls)
            if f.init and getattr(ns, prefix.replace("-", "_") + f.name, None) is not None]


def to_dict(cfg) -> dict:
    """JSON-able settings of a config (tuples become lists), for sidecars and metadata."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def from_dict(cls, data: dict):
    """Rebuild a config from :func:`to_dict`'s output; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RsjaxError(f"unknown {cls.__name__} settings: {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for k, v in data.items():
        typ, _ = _base_type(hints[k])
        is_tuple = typ is tuple or typing.get_origin(typ) is tuple
        values[k] = tuple(v) if isinstance(v, list) and is_tuple else v
    return cls(**values)
