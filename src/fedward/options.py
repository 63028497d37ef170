"""Typed options: every setting is a dataclass field declared once, with its default, help and check.

The run's common settings (:class:`fedward.config.RunConfig`), each method's options class
(``Algorithm.Options``) and each data set's (``Options`` in its module) are all built from
:func:`option`. The CLI flags, ``fedward run --help``, YAML keys and validation are derived from
these fields, so a setting is written in one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, Field, field, fields
from typing import Any, Callable

from fedward.errors import ConfigError

# A check is (predicate, what a good value is): ``(lambda v: v > 0, "positive")``.
Check = tuple[Callable[[Any], bool], str]


def option(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
           check: Check | None = None, choices: tuple[str, ...] | None = None, lower: bool = False,
           reference: bool = False, const: str | None = None) -> Any:
    """A setting. ``choices``: the allowed strings (``lower``: compared case-insensitively and stored
    lower-case); ``check``: a predicate on the value; ``reference``: a flag of the Fed-MAS reference
    code that its commands pass to every method, accepted at its default by methods it does not
    apply to; ``const``: the value of the bare flag (``--pre_trained_tv`` alone)."""
    metadata = {"help": help, "check": check, "choices": choices, "lower": lower, "reference": reference,
                "const": const}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def at_least(n: float) -> Check:
    return (lambda v: v >= n, f"at least {n}")


POSITIVE: Check = (lambda v: v > 0, "positive")
NON_NEGATIVE: Check = (lambda v: v >= 0, ">= 0")
UNIT_INTERVAL: Check = (lambda v: 0 <= v <= 1, "in [0, 1]")
OPEN_UNIT: Check = (lambda v: 0 < v <= 1, "in (0, 1]")
PROBABILITY_LT1: Check = (lambda v: 0 <= v < 1, "in [0, 1)")


def option_fields(cls: type) -> tuple[Field, ...]:
    return tuple(f for f in fields(cls) if f.init)


def default_of(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def kind_of(f: Field) -> str:
    """The annotation as text ('int', 'float | None', 'list[str]', ...)."""
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def is_bool(f: Field) -> bool:
    return kind_of(f).startswith("bool")


def coerce(f: Field, value: Any) -> Any:
    """A YAML or flag value converted to the field's type, with an error naming the setting."""
    kind, name = kind_of(f), f.name
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"'{name}' must not be empty")
    try:
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind.startswith("list"):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"'{name}' must be {kind.split(' |')[0]}, got {value!r}") from None


def check_value(f: Field, value: Any) -> Any:
    """The value after the field's choices and check (lower-cased where the field says so)."""
    choices, check = f.metadata.get("choices"), f.metadata.get("check")
    if choices is not None and value is not None:
        if f.metadata.get("lower"):
            value = str(value).lower()
        if value not in choices:
            raise ConfigError(f"--{f.name} '{value}' is unknown; expected one of: {', '.join(choices)}")
    if check is not None and value is not None:
        predicate, expected = check
        if not predicate(value):
            raise ConfigError(f"--{f.name} must be {expected}, got {value}")
    return value


def build_options(cls: type, values: dict[str, Any]) -> Any:
    """An instance of options class ``cls`` from the given values (the rest at their defaults)."""
    by_name = {f.name: f for f in option_fields(cls)}
    kwargs = {name: check_value(by_name[name], coerce(by_name[name], value)) for name, value in values.items()}
    instance = cls(**kwargs)
    for f in by_name.values():  # defaults pass the checks too (a subclass may override one)
        if f.name not in kwargs:
            check_value(f, getattr(instance, f.name))
    return instance


def as_dict(options: Any) -> dict[str, Any]:
    return {f.name: getattr(options, f.name) for f in option_fields(type(options))} if options is not None else {}


def new_default(cls: type, name: str, value: Any) -> Any:
    """Option ``name`` of options class ``cls`` with another default (same help and check), for a
    subclass that redeclares it: ``momentum: float = new_default(LocalTraining, "momentum", 0.0)``."""
    known = cls.__dataclass_fields__.get(name)
    if known is None:
        raise ValueError(f"{cls.__name__} has no option {name!r}")
    return field(default=value, metadata=known.metadata)


@dataclasses.dataclass
class NoOptions:
    """A method or data set without settings of its own."""
