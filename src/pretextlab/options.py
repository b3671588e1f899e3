"""Options defined once, as dataclass fields: their help, type checks and the CLI flags made from them.

An option is a dataclass field made with ``option(default, help, choices=..., metavar=...)``; its
type hint says what a value must be. Values from a study's YAML or a saved ``config.json`` are
checked against those hints (one clear error naming the key, the value and the type expected,
never a ``TypeError`` deep in training or a string ``"false"`` read as true), and ``add_arguments``
generates the command line from the same fields: ``--name-with-dashes``, the type, the default in
the help, choices, ``--x/--no-x`` for booleans, several values for tuples, each flag in the
argument group of its option's section.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Union

from pretextlab.errors import PretextlabError

# The sections of a recipe: a training run's config.json (run format 2) holds one object per
# training section, and ``--help`` shows each section's flags as one argument group. "probe" is
# evaluate's (what is probed and how). A task options dataclass's own fields are section "task"
# by being task options (config.py), so a task's option() need not say it.
SECTIONS: dict[str, str] = {
    "data": "the dataset, its splits and the input pipeline",
    "network": "the network and its initialisation",
    "task": "the pretext task; each task reads its own options (the help names the task)",
    "probe": "what is probed, and the probe's recipe",
    "optimisation": "the schedule, the optimiser and the batch",
    "runtime": "seed, device, precision, loader processes, logging, checkpoints and monitoring",
}


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    metavar: Any = None,
    flag: str | None = None,
    nargs: str | None = None,
    section: str | None = None,
) -> Any:
    """A dataclass field that is an option: its default, its help text, its choices (checked by
    ``check_choices``) and how the command line names its value. ``flag`` names the flag when it is
    not ``--name-with-dashes`` (evaluate's ``--output`` fills ``outputs``); ``nargs`` overrides the
    ``*`` of a list (``+``: at least one value); ``section`` is one of ``SECTIONS``."""
    if section is not None and section not in SECTIONS:
        raise TypeError(f"option section {section!r} is not one of {', '.join(SECTIONS)}")
    metadata = {"help": help, "choices": choices, "metavar": metavar, "flag": flag, "nargs": nargs, "section": section}
    if isinstance(default, (list, dict, set)):
        raise TypeError("an option's default must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata=metadata)


def field_types(cls: type) -> dict[str, Any]:
    """The evaluated type hint of every field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def type_name(hint: Any) -> str:
    """How an error message names a type hint: ``a whole number``, ``true or false``, ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        named = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            plural = {int: "whole numbers", float: "numbers", str: "strings", bool: "true/false values"}
            return f"a list of {plural.get(args[0], type_name(args[0]))}"
        return f"a list of {len(args)} ({', '.join(type_name(a) for a in args)})"
    return {
        bool: "true or false",
        int: "a whole number",
        float: "a number",
        str: "a string",
        dict: "a mapping",
    }.get(hint, getattr(hint, "__name__", str(hint)))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` in the canonical form of ``hint`` (lists -> tuples, ints -> floats), or _Mismatch."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    # bool is an int in Python, and YAML's "false" is a string: neither may pass for the other.
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if hint is Any:
        return value
    raise TypeError(f"options of type {hint!r} are not supported")


def check_value(name: str, value: Any, hint: Any, where: str = "") -> Any:
    """``value`` checked against ``hint`` and in canonical form; a clear error naming ``name`` if not."""
    try:
        return _coerce(value, hint)
    except _Mismatch:
        place = f" in {where}" if where else ""
        raise PretextlabError(
            f"{name}{place} must be {type_name(hint)}, got {value!r} ({type(value).__name__})"
        ) from None


def check_fields(cls: type, data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """The values of ``data`` checked against the field types of ``cls`` and canonicalised.

    Keys that are not fields of ``cls`` are left for the caller to report (it knows which names to
    suggest)."""
    hints = field_types(cls)
    return {key: check_value(key, value, hints[key], where) if key in hints else value for key, value in data.items()}


def check_instance(obj: Any, where: str = "") -> Any:
    """A copy of the dataclass instance ``obj`` with every field checked and canonicalised."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
    return dataclasses.replace(obj, **check_fields(type(obj), values, where))


def check_choices(obj: Any) -> None:
    """Every field of the dataclass instance ``obj`` that has choices holds one of them."""
    for f in dataclasses.fields(obj):
        valid = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if valid and value not in valid:
            raise PretextlabError(f"{f.name} {value!r}: choose one of {', '.join(valid)}")


def section_fields(cls: type) -> dict[str, tuple[str, ...]]:
    """The names of the fields of the dataclass ``cls`` in each section it uses, in ``SECTIONS`` order."""
    fields = dataclasses.fields(cls)
    named = {name: tuple(f.name for f in fields if f.metadata.get("section") == name) for name in SECTIONS}
    return {name: names for name, names in named.items() if names}


def section_dataclass(cls: type, section: str) -> type:
    """A frozen dataclass of the fields of ``cls`` in ``section`` (same names and types): a typed,
    read-only view of that section of an instance, ``view(**{n: getattr(obj, n) for n in ...})``."""
    hints = field_types(cls)
    names = section_fields(cls)[section]
    view = dataclasses.make_dataclass(f"{section.capitalize()}Section", [(n, hints[n]) for n in names], frozen=True)
    view.__module__ = cls.__module__  # where the caller binds it by that name (so it pickles)
    return view


def flag_name(name: str) -> str:
    """The command-line flag of the field ``name``: ``--name-with-dashes``."""
    return "--" + name.replace("_", "-")


def _argument(hint: Any) -> dict[str, Any]:
    """argparse settings (type, nargs) that read a value of the type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        [inner] = [a for a in args if a is not type(None)]
        return _argument(inner)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": args[0], "nargs": "*"}
        return {"type": args[0], "nargs": len(args)}
    return {"type": hint}


def add_arguments(parser: argparse.ArgumentParser, *classes: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclasses ``classes`` (but ``skip``), made from its type and
    metadata, in one argument group per section (``SECTIONS`` order; fields without a section
    stay in the parser's own group)."""
    order = {None: -1, **{name: i for i, name in enumerate(SECTIONS)}}
    specs = [(cls, f) for cls in classes for f in dataclasses.fields(cls) if f.name not in skip]
    # Usage lists the flags by section too, a section's namesake (--task, --network) first.
    specs.sort(key=lambda spec: (order[spec[1].metadata.get("section")], spec[1].name != spec[1].metadata.get("section")))
    used = {f.metadata.get("section") for _, f in specs}
    groups = {name: parser.add_argument_group(f"{name} options", about) for name, about in SECTIONS.items() if name in used}
    for cls, f in specs:
        _add_flag(groups.get(f.metadata.get("section"), parser), cls, f)


def _add_flag(parser: Any, cls: type, f: dataclasses.Field) -> None:
    """The flag of the option field ``f`` of ``cls`` on ``parser`` (a parser or an argument group)."""
    hint, meta = field_types(cls)[f.name], f.metadata
    if "help" not in meta:
        raise TypeError(f"{cls.__name__}.{f.name} has no help: define it with options.option(...)")
    kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": meta["help"]}
    flag = meta.get("flag") or flag_name(f.name)
    if hint is bool or hint == (bool | None):
        if f.default is not None:
            kwargs["help"] += f" (default: {flag if f.default else '--no-' + flag[2:]})"
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        return
    kwargs.update(_argument(hint))
    if meta.get("nargs") is not None:
        kwargs["nargs"] = meta["nargs"]
    if meta.get("choices"):
        kwargs["choices"] = meta["choices"]
    if meta.get("metavar") is not None:
        kwargs["metavar"] = meta["metavar"]
    if f.default is not None:
        shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        kwargs["help"] += f" (default: {shown})"
    parser.add_argument(flag, **kwargs)


def from_arguments(cls: type, args: argparse.Namespace, where: str = "the command line") -> Any:
    """An instance of ``cls`` from the flags ``add_arguments`` made, every value checked."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**check_fields(cls, values, where))
