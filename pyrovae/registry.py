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


# Options that count something and so must be positive wherever they appear.
POSITIVE_OPTIONS = frozenset({
    "z_dim", "K", "hidden", "batch_size", "epochs", "steps", "num_particles", "train_size",
    "test_size", "max_iter", "n_init", "num_samples", "eval_size",
})


def _expected_type(fn: Callable, name: str) -> Optional[type]:
    """The plain type an option of ``fn`` takes, from its annotation (a type
    or Optional of one) or else from the type of its default; None when
    neither says."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001  (unresolvable annotations say nothing)
        hints = {}
    hint = hints.get(name)
    if hint is not None:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        origin = typing.get_origin(hint)
        if origin is typing.Union and len(args) == 1:
            hint, origin = args[0], typing.get_origin(args[0])
        if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
            return list
        if hint in (int, float, bool, str):
            return hint
        if origin is not None and origin is not typing.Union:
            return None
    try:
        default = inspect.signature(fn).parameters[name].default
    except (KeyError, TypeError, ValueError):
        return None
    if default is inspect.Parameter.empty or default is None:
        return None
    if isinstance(default, (list, tuple)):
        return list
    return type(default) if type(default) in (int, float, bool, str) else None


def option_problems(fn: Callable, options: Dict[str, Any]) -> List[str]:
    """``"name: must be ..., got ..."`` for each option of ``fn`` whose value
    does not have the type the signature implies, or that must be positive
    and is not."""
    problems = []
    for name, value in options.items():
        kind = _expected_type(fn, name)
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            problems.append(f"{name}: must be an integer, got {value!r}")
        elif kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            problems.append(f"{name}: must be a number, got {value!r}")
        elif kind is bool and not isinstance(value, bool):
            problems.append(f"{name}: must be true or false, got {value!r}")
        elif kind is str and not isinstance(value, str):
            problems.append(f"{name}: must be a string, got {value!r}")
        elif kind is list and not isinstance(value, (list, tuple)):
            problems.append(f"{name}: must be a list, got {value!r}")
        elif name in POSITIVE_OPTIONS:
            items = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
                what = "integers >= 1" if isinstance(value, (list, tuple)) else "an integer >= 1"
                problems.append(f"{name}: must be {what}, got {value!r}")
    return problems


def builder_target(build: Callable) -> Callable:
    """The class a builder function hands its ``**options`` to (by its return
    annotation), else the builder itself."""
    names, _, var_kw = _parameters(build, skip=("x_dim",))
    if var_kw:
        try:
            target = typing.get_type_hints(build).get("return")
        except (NameError, TypeError):
            target = None
        if isinstance(target, type):
            return target
    return build
