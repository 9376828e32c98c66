"""Validation through pydantic, and the one place its errors become messages.

Config sections and training records are pydantic dataclasses (:func:`validated`),
HTTP request bodies pydantic models; :func:`explain` words their errors, naming the
key path, what the key accepts and the value received (``training.rank must be an
integer in [1, 4096], got -3``). What a key accepts is read from its declaration:
the type, the annotated-types constraints pydantic keeps in the field's metadata
(``Ge``, ``Gt``, ``Le``, ``Lt``, ``MinLen``) and ``json_schema_extra`` entries:
``enum`` (the values allowed), ``also`` (values allowed outside the range, with
what they mean) and ``expected`` (the whole text, for unions).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import reprlib
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, TypeVar, Union, cast, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic.fields import FieldInfo
from pydantic_core import ArgsKwargs
from typing_extensions import dataclass_transform

T = TypeVar("T")

# Stands for the record's path in messages of rules between its fields.
HERE = "{here}"


@dataclasses.dataclass(frozen=True)
class Style:
    """How messages read for one kind of input."""

    noun: str = "field"  # "unknown field", "missing field"
    yaml: bool = False  # YAML keys: lists shown whole, hints for numbers as strings
    reasons: bool = False  # request bodies: pydantic's sentence, values as JSON


CONFIG = Style(noun="key", yaml=True)
RECORD = Style()
HTTP = Style(reasons=True)

# Messages name the offending value; a stored record may hold a megabyte string or a
# list nested past the interpreter's recursion limit, so values are shown abridged.
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 60
_REPR.maxother = 60


def show(value: Any, *, type_ok: bool = True, as_json: bool = False) -> str:
    """A value as messages quote it: abridged, with its type when that is wrong."""
    if as_json:
        scalar = isinstance(value, (str, int, float, bool, type(None)))
        text = json.dumps(value) if scalar else type(value).__name__
        return text if len(text) <= 60 else text[:57] + "..."
    text = _REPR.repr(value)
    return text if type_ok else f"{text} ({type(value).__name__})"


def unknown(what: str, name: str, allowed: list[str]) -> str:
    """``unknown key 'a.b' (allowed: ...); did you mean 'c'?``"""
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown {what} (allowed: {', '.join(allowed)}){hint}"


def _num(x: float) -> str:
    """A bound as written in messages: integers in full, floats shortest."""
    if isinstance(x, int) or (x.is_integer() and abs(x) < 2**53):
        return str(int(x))
    return repr(x)


def _range(metadata: list[Any]) -> str:
    lo: Any = None
    hi: Any = None
    lo_open = hi_open = False
    for m in metadata:
        if isinstance(m, (at.Ge, at.Gt)):
            lo, lo_open = (m.ge, False) if isinstance(m, at.Ge) else (m.gt, True)
        elif isinstance(m, (at.Le, at.Lt)):
            hi, hi_open = (m.le, False) if isinstance(m, at.Le) else (m.lt, True)
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {_num(lo)}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {_num(hi)}"
    return ""


def _one_of(values: Iterable[Any]) -> str:
    shown = (repr(v) if isinstance(v, str) else _num(v) for v in values)
    return f"one of [{', '.join(shown)}]"


def _members(annotation: Any) -> list[Any]:
    if get_origin(annotation) in (Union, types.UnionType):
        return list(get_args(annotation))
    return [annotation]


def _unpack(annotation: Any, metadata: list[Any]) -> tuple[Any, list[Any]]:
    """``Annotated[int, Ge(0)]`` -> ``(int, [Ge(0)])``."""
    if get_origin(annotation) is Annotated:
        info = FieldInfo.from_annotation(annotation)
        return info.annotation, [*metadata, *info.metadata]
    return annotation, metadata


def _kind(annotation: Any, metadata: list[Any], *, plural: bool = False) -> str:
    tp, metadata = _unpack(annotation, metadata)
    nonempty = any(isinstance(m, at.MinLen) and m.min_length > 0 for m in metadata)
    if get_origin(tp) is list:
        items = _kind(get_args(tp)[0], [], plural=True)
        kind = ("non-empty list" if nonempty else "list") + ("s" if plural else "")
        return f"{'' if plural else 'a '}{kind} of {items}"
    if hasattr(tp, "__pydantic_fields__"):
        name = tp.__name__
        return f"{name} records or mappings" if plural else f"a {name} or a mapping"
    if tp is bool:
        return "true or false"
    noun = {int: "integer", float: "finite number", str: "string"}.get(tp, tp.__name__)
    if tp is str and nonempty:
        noun = "non-empty string"
    if plural:
        return f"{noun}s{_range(metadata)}"
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}{_range(metadata)}"


def _extra(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def accepts(info: FieldInfo) -> str:
    """Everything a field accepts, in words: ``null or an integer in [16, 1073741824]``."""
    extra = _extra(info)
    if "expected" in extra:
        return str(extra["expected"])
    members = [m for m in _members(info.annotation) if m is not type(None)]
    if "enum" in extra:
        text = _one_of(extra["enum"])
    else:
        text = " or ".join(_kind(m, info.metadata) for m in members)
    also = "".join(
        f"{_num(v)} ({what}) or " for v, what in extra.get("also", {}).items()
    )
    nullable = len(members) < len(_members(info.annotation))
    return ("null or " if nullable else "") + also + text


# PyYAML (YAML 1.1) reads a float only with a dot, and an exponent only when signed:
# 1e-4 and 1.0e300 are strings, 1.0e-4 and 1.0e+300 are floats.
_EXPONENT = re.compile(r"([-+]?[0-9_]*)(\.[0-9_]*)?[eE]([-+]?)([0-9]+)")


def _signed_exponent(text: str) -> str:
    m = _EXPONENT.fullmatch(text)
    if not m:
        return text
    mantissa, fraction, sign, power = m.groups()
    return f"{mantissa}{fraction or '.0'}e{sign or '+'}{power}"


def _yaml_number(text: str, *, integer: bool) -> str | None:
    """How to write the number in ``text`` so that YAML reads a number, or None."""
    s = text.strip()
    try:
        number = float(s)
    except ValueError:
        return None
    if not math.isfinite(number) or (integer and not number.is_integer()):
        return None
    whole = str(int(number)) if integer else s
    for candidate in (s, whole, _signed_exponent(s), _signed_exponent(repr(number))):
        try:
            value = yaml.safe_load(f"v: {candidate}")["v"]
        except (yaml.YAMLError, ValueError):
            continue
        if type(value) in ((int,) if integer else (int, float)) and value == number:
            return candidate
    return None


def _yaml_hint(value: str, info: FieldInfo) -> str:
    members = _members(info.annotation)
    if float not in members and int not in members:
        return ""
    integer = float not in members
    written = _yaml_number(value, integer=integer)
    if written is None:
        return ""
    if written == value.strip():
        return f" (a string: write {written} without quotes)"
    if not integer and _EXPONENT.search(value):
        return (
            " (YAML reads this as a string: an exponent needs a dot and a "
            f"sign, as in {written})"
        )
    return f" (YAML reads this as a string: write {written})"


def _fields(model: Any) -> dict[str, FieldInfo]:
    return getattr(model, "__pydantic_fields__", None) or {}


def _model_in(annotation: Any) -> Any:
    """The pydantic model or dataclass a field holds (directly, in a list or union)."""
    tp, _ = _unpack(annotation, [])
    if _fields(tp):
        return tp
    for arg in get_args(tp):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _item(info: FieldInfo) -> FieldInfo:
    for member in _members(_unpack(info.annotation, [])[0]):
        if get_origin(member) is list:
            return FieldInfo.from_annotation(get_args(member)[0])
    return info


def _locate(
    model: Any, loc: tuple[int | str, ...]
) -> tuple[str, Any, FieldInfo | None]:
    """(path, the model reached, the field or item at ``loc``).

    Parts that name no field (union members' tags) are skipped.
    """
    path, info = "", None
    for part in loc:
        if isinstance(part, int) and info is not None:
            path += f"[{part}]"
            info = _item(info)
        elif isinstance(part, str) and part in _fields(model):
            path += f".{part}"
            info = _fields(model)[part]
            model = _model_in(info.annotation)
    return path.lstrip("."), model, info


_UNKNOWN = ("extra_forbidden", "unexpected_keyword_argument", "invalid_key")


def explain(
    exc: ValidationError,
    model: Any,
    *,
    name: str = "",
    style: Style = RECORD,
    values: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """One sentence for the first thing wrong in ``exc``, and the path at fault.

    Args:
        exc (ValidationError): What pydantic found in an instance of ``model``.
        name (str): How messages name the root ("generation"). Default: none.
        style (Style): How the message reads. Default: :data:`RECORD`.
        values (Mapping, optional): The input, to show a key's whole value.
    """
    errors = exc.errors(include_url=False)
    kind, loc, value = errors[0]["type"], errors[0]["loc"], errors[0]["input"]
    if style.yaml and len(loc) > 1 and values is not None and loc[0] in values:
        kind, loc, value = "item", loc[:1], values[str(loc[0])]
    path, owner, info = _locate(model, loc[:-1] if kind in _UNKNOWN else loc)
    if kind in _UNKNOWN:
        path = f"{path}.{loc[-1]}".lstrip(".")
    full = f"{name}.{path}" if name and path else name or path
    if kind in _UNKNOWN:
        allowed = list(_fields(owner))
        return unknown(f"{style.noun} '{full}'", str(loc[-1]), allowed), path
    if kind == "missing":
        return f"missing {style.noun} '{full}'", path
    reason = str(errors[0]["ctx"]["error"]) if kind == "value_error" else None
    if info is None or (reason and HERE in reason):
        # A rule between the fields of the record at ``loc``.
        message = reason or errors[0]["msg"]
        message = message if HERE in message else f"{HERE}: {message}"
        return message.replace(HERE, full), path
    if style.reasons:
        shown = show(value, as_json=True)
        same = [e for e in errors if _locate(model, e["loc"])[0].startswith(path)]
        if len(same) > 1 and "expected" in _extra(info):
            return f"{full} must be {accepts(info)}, got {shown}", path
        msg = errors[0]["msg"]
        return f"{full}: {reason or msg[0].lower() + msg[1:]}, got {shown}", path
    shown = show(value, type_ok=not kind.endswith("_type"))
    hint = _yaml_hint(value, info) if style.yaml and isinstance(value, str) else ""
    return f"{full} must be {reason or accepts(info)}, got {shown}{hint}", path


@dataclass_transform(field_specifiers=(dataclasses.field,))
def validated(
    name: str | None = None, *, style: Style = RECORD, **config: Any
) -> Callable[[type[T]], type[T]]:
    """Make a class a pydantic dataclass whose constructor raises a
    :class:`ValueError` worded by :func:`explain`.

    Args:
        name (str, optional): How messages name an instance. Default: the class name.
        style (Style): How messages read. Default: :data:`RECORD`.
        **config: pydantic ``ConfigDict`` entries besides the defaults (unknown
            members refused, no infinities or NaN).
    """

    def decorate(cls: type[T]) -> type[T]:
        settings = {"extra": "forbid", "allow_inf_nan": False, **config}
        out: Any = pydantic_dataclass(cls, config=cast(ConfigDict, settings))
        out.__validation__ = (name or cls.__name__, style)
        out.__init__ = functools.wraps(out.__init__)(
            lambda self, *args, **kwargs: _fill(self, args, kwargs)
        )
        return out  # type: ignore[no-any-return]

    return decorate


def _fill(
    obj: Any, args: tuple[Any, ...], kwargs: dict[Any, Any], name: str | None = None
) -> None:
    """Validate ``args`` and ``kwargs`` into ``obj``, as its constructor would."""
    cls = type(obj)
    try:
        cls.__pydantic_validator__.validate_python(
            ArgsKwargs(args, kwargs), self_instance=obj
        )
    except ValidationError as e:
        own_name, style = cls.__validation__
        message, _ = explain(e, cls, name=name or own_name, style=style, values=kwargs)
        raise ValueError(message) from None


def build(cls: type[T], data: Any) -> T:
    """An instance of a :func:`validated` class from a mapping of its fields.

    Raises:
        ValueError: When ``data`` is no mapping or does not validate.
    """
    if not isinstance(data, Mapping):
        name, style = cls.__validation__  # type: ignore[attr-defined]
        raise ValueError(
            f"{name} must be a mapping of {style.noun}s to values, "
            f"got {show(data, type_ok=False)}"
        )
    obj = cls.__new__(cls)
    _fill(obj, (), dict(data))
    return obj


def revalidate(obj: Any, name: str | None = None) -> None:
    """Validate and normalize a :func:`validated` instance again, in place.

    Args:
        obj: The instance, possibly changed since it was built.
        name (str, optional): How messages name it. Default: its class's name.
    """
    _fill(
        obj, (), {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, name
    )
