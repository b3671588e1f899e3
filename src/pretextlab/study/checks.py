"""Checks of a study file's YAML values: known keys, choices, whole numbers, types; each refusal names
the key, the value and what is expected."""

from __future__ import annotations

from typing import Any, Iterable

from pretextlab.errors import PretextlabError


def _where(context: str) -> str:
    return f" in {context}" if context else ""


def _check_keys(section: Any, valid: Iterable[str], context: str) -> dict[str, Any]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise PretextlabError(f"{context} must be a mapping of keys ({', '.join(valid)}), got {type(section).__name__}")
    unknown = [str(k) for k in section if k not in valid]
    if unknown:
        raise PretextlabError(f"unknown key {', '.join(map(repr, unknown))}{_where(context)}: valid keys are {', '.join(valid)}")
    return section


def _type_name(value: Any) -> str:
    return "null" if value is None else {"str": "a string", "int": "a whole number", "float": "a number", "bool": "true/false",
                                          "list": "a list", "dict": "a mapping"}.get(type(value).__name__, type(value).__name__)


def _wrong_type(context: str, value: Any, expected: str) -> PretextlabError:
    """One message for a YAML value of the wrong type: the key, the value (and what YAML made of it), the type wanted."""
    return PretextlabError(f"{context} must be {expected}, got {value!r} ({_type_name(value)})")


def _optional_number(value: Any, context: str, *, whole: bool, minimum: float, expected: str) -> Any:
    if value is None:
        return None
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
        raise _wrong_type(context, value, expected)
    return value


def _optional_string(value: Any, context: str, expected: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _wrong_type(context, value, expected)
    return value


def _section_list(value: Any, context: str, example: str) -> list[Any]:
    """A list of mappings (grids, evaluations); a single mapping counts as a list of one."""
    if isinstance(value, dict):
        return [value]
    if not isinstance(value, list) or not value:
        raise _wrong_type(context, value, f"a non-empty list of mappings, e.g. {example}")
    return value


def _as_list(value: Any, context: str) -> list[Any]:
    if value is None:
        raise PretextlabError(f"{context} is missing: give a list")
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _choices(values: Iterable[Any], valid: Iterable[Any], what: str, context: str) -> tuple[Any, ...]:
    valid = tuple(valid)
    values = tuple(values)
    for value in values:
        if value not in valid:
            raise PretextlabError(f"unknown {what} {value!r}{_where(context)}: choose one of {', '.join(map(str, valid))}")
    if not values:
        raise PretextlabError(f"{context} is empty: give at least one {what} ({', '.join(map(str, valid))})")
    return values


def _positive_ints(values: Iterable[Any], what: str, context: str, allow_none: bool = False) -> tuple[Any, ...]:
    result = []
    for value in values:
        if value is None and allow_none:
            result.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            extra = " or null" if allow_none else ""
            raise PretextlabError(f"{what} {value!r}{_where(context)} must be a whole number >= 1{extra}")
        result.append(value)
    if not result:
        raise PretextlabError(f"{context} is empty: give at least one {what}")
    return tuple(result)
