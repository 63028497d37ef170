"""The method registry: ``@register_method`` on an :class:`~fedward.algorithms.base.Algorithm`
subclass makes it a method of ``fedward run --method`` (its options become flags), of the
simulation and of the Flower deployment, with no other file changed."""

from __future__ import annotations

from typing import TypeVar

from fedward.errors import ConfigError

METHOD_REGISTRY: dict[str, type] = {}
A = TypeVar("A", bound=type)


def register_method(cls: A) -> A:
    """Class decorator: register a method under ``cls.name``."""
    name = getattr(cls, "name", "")
    if not name or name == "base" or name != name.lower():
        raise ValueError(f"{cls.__name__}: a method needs a lower-case `name`, got {name!r}")
    if name in METHOD_REGISTRY and METHOD_REGISTRY[name] is not cls:
        raise ValueError(f"method {name!r} is registered twice ({METHOD_REGISTRY[name].__name__}, {cls.__name__})")
    METHOD_REGISTRY[name] = cls
    return cls


def get_algorithm(name: str) -> type:
    try:
        return METHOD_REGISTRY[str(name).lower()]
    except KeyError:
        raise ConfigError(f"--method '{name}' is unknown; expected one of: {', '.join(METHOD_REGISTRY)}") from None


def list_methods() -> list[str]:
    return list(METHOD_REGISTRY)
