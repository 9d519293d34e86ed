"""Name -> object registries filled by a ``register(name)`` decorator.

The CLI and the benchmark suites look names up here; an unknown name gives an
error that lists the known ones instead of a bare ``KeyError``.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

T = TypeVar("T")


class Registry(Dict[str, Any]):
    """A plain ``dict`` with a decorator to fill it and a helpful lookup error."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self[name] = obj
            return obj

        return decorator

    def __missing__(self, name: str) -> Any:
        known = ", ".join(sorted(self)) or "(none)"
        raise KeyError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}")

    def get_checked(self, name: str) -> Any:
        """Same as ``self[name]`` but raises ``ValueError`` (friendlier in CLIs)."""
        try:
            return self[name]
        except KeyError as err:
            raise ValueError(err.args[0]) from None


def _parameters(fn: Callable, skip: Sequence[str]) -> Tuple[Optional[List[str]], Dict[str, Any], bool]:
    """Keyword parameter names of ``fn``, their defaults, and whether it also
    takes ``**kwargs``; names None when there is no signature to read."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None, {}, True
    names, defaults, var_kw = [], {}, False
    for name, param in sig.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
            continue
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            continue
        if name in skip or name == "self":
            continue
        names.append(name)
        if param.default is not inspect.Parameter.empty:
            defaults[name] = param.default
    return names, defaults, var_kw


def signature_options(fn: Callable, skip: Sequence[str]) -> Tuple[Optional[List[str]], Dict[str, Any]]:
    """Keyword options ``fn`` accepts (None when it takes ``**kwargs``) and their defaults."""
    names, defaults, var_kw = _parameters(fn, skip)
    return (None if var_kw else names), defaults


def builder_options(build: Callable) -> Tuple[Optional[List[str]], Dict[str, Any]]:
    """Options a ``MODELS`` entry accepts besides ``x_dim``, and their defaults.

    A builder function that passes ``**options`` on to the class named by its
    return annotation accepts its own parameters plus that class's; None
    means the options cannot be known before the model is built.
    """
    names, defaults, var_kw = _parameters(build, skip=("x_dim",))
    if names is None or not var_kw:
        return names, defaults
    try:
        target = typing.get_type_hints(build).get("return")
    except (NameError, TypeError):
        return None, defaults
    if not isinstance(target, type):
        return None, defaults
    cls_names, cls_defaults, cls_var_kw = _parameters(target, skip=("x_dim",))
    if cls_names is None or cls_var_kw:
        return None, defaults
    return list(dict.fromkeys(names + cls_names)), {**cls_defaults, **defaults}
