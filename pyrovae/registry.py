"""Name -> object registries filled by a ``register(name)`` decorator.

The CLI and the benchmark suites look names up here; an unknown name gives an
error that lists the known ones instead of a bare ``KeyError``. The options a
registered thing takes, and the type each value must have, are read from its
signature here too (:func:`option_types`, :func:`value_problems`), once for the
run pipeline and the suite files alike.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar

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


# Options that are sizes wherever they appear (model, data set, objective,
# [grid.fit], [grid.em]): integers >= 1 (for "hidden", every entry). Learning
# rates are numbers > 0.
POSITIVE_SIZES = (
    "z_dim", "x_dim", "K", "hidden", "batch_size", "epochs", "steps", "num_particles",
    "train_size", "test_size", "n", "max_iter", "n_init",
)
LEARNING_RATES = ("lr", "learning_rate")


# -- option types --------------------------------------------------------------------
#
# Every option is checked against the type its signature implies, so that a
# suite with z_dim = 2.5 fails at validation, naming the key, instead of in
# every cell. The type comes from the parameter's annotation when that is a
# plain type (int, float, bool, str, a table or a list of them) or an Optional
# or Union of such; otherwise from its default: an int default needs an
# integer, a float default a number, a bool default true or false, a str
# default a string, a tuple or list default a list. A parameter without any
# annotation (Pyro's objectives) whose default is an int takes any number:
# such code writes float options with integer defaults (RenyiELBO's alpha=0).


@dataclass(frozen=True)
class OptionType:
    """What a value may be: some of "int", "float", "bool", "str", "table",
    "list" (with ``item`` the entries' type, None when unchecked)."""

    kinds: frozenset
    item: Optional["OptionType"] = None

    def accepts(self, value: Any) -> bool:
        if _is_int(value) and "int" in self.kinds:
            return True
        if _is_number(value) and "float" in self.kinds:
            return True
        if isinstance(value, bool) and "bool" in self.kinds:
            return True
        if isinstance(value, str) and "str" in self.kinds:
            return True
        if isinstance(value, dict) and "table" in self.kinds:
            return True
        if isinstance(value, list) and "list" in self.kinds:
            return self.item is None or all(self.item.accepts(v) for v in value)
        return False

    def describe(self, plural: bool = False) -> str:
        words = {
            "int": ("an integer", "integers"), "float": ("a number", "numbers"),
            "bool": ("true or false", "true or false"), "str": ("a string", "strings"),
            "table": ("a table", "tables"),
        }
        parts = [words[k][plural] for k in ("int", "float", "bool", "str", "table") if k in self.kinds]
        if "int" in self.kinds and "float" in self.kinds:
            parts.remove(words["int"][plural])  # "a number" says it
        if "list" in self.kinds:
            inner = f" of {self.item.describe(plural=True)}" if self.item is not None else ""
            parts.append(("lists" if plural else "a list") + inner)
        return " or ".join(parts)


_PLAIN = {bool: "bool", int: "int", float: "float", str: "str"}


def _type_of_hint(hint: Any) -> Optional[OptionType]:
    """The :class:`OptionType` of an annotation, None when it is not a plain one."""
    if hint in _PLAIN:
        return OptionType(frozenset({_PLAIN[hint]}))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is dict or origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        return OptionType(frozenset({"table"}))
    if origin in (typing.Union, types.UnionType):
        members = [_type_of_hint(a) for a in args if a is not type(None)]
        if not members or any(m is None for m in members):
            return None
        items = [m.item for m in members if m.item is not None]
        return OptionType(frozenset().union(*(m.kinds for m in members)), items[0] if items else None)
    if hint in (list, tuple) or origin in (list, tuple, collections.abc.Sequence,
                                            collections.abc.MutableSequence):
        entries = [_type_of_hint(a) for a in args if a is not Ellipsis]
        item = None
        if entries and all(e is not None for e in entries):
            item = OptionType(frozenset().union(*(e.kinds for e in entries)))
        return OptionType(frozenset({"list"}), item)
    return None


def _type_of_default(default: Any, annotated: bool) -> Optional[OptionType]:
    if isinstance(default, bool):
        return OptionType(frozenset({"bool"}))
    if isinstance(default, int):
        return OptionType(frozenset({"int"} if annotated else {"int", "float"}))
    if isinstance(default, float):
        return OptionType(frozenset({"float"}))
    if isinstance(default, str):
        return OptionType(frozenset({"str"}))
    if isinstance(default, (tuple, list)):
        return OptionType(frozenset({"list"}))
    return None


def type_hints(obj: Any) -> Dict[str, Any]:
    targets = [obj.__init__, obj] if isinstance(obj, type) else [obj]
    hints: Dict[str, Any] = {}
    for target in targets:
        try:
            found = typing.get_type_hints(target)
        except Exception:  # noqa: BLE001  (an unresolvable annotation: use the defaults)
            continue
        for name, hint in found.items():
            hints.setdefault(name, hint)
    return hints


def option_types(obj: Any, skip: Sequence[str] = ()) -> Dict[str, Optional[OptionType]]:
    """Keyword options of ``obj`` (a function or a class) and their types
    (None: not checked). Options passed on through ``**kwargs`` are followed
    to the class a builder returns, or to a class's base classes."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return {}
    hints = type_hints(obj)
    out: Dict[str, Optional[OptionType]] = {}
    var_kw = False
    for name, param in sig.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
            continue
        if (param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY)
                or name in skip or name == "self"):
            continue
        hint = hints.get(name)
        kind = _type_of_hint(hint) if hint is not None else None
        if kind is None and param.default is not inspect.Parameter.empty:
            kind = _type_of_default(param.default, param.annotation is not inspect.Parameter.empty)
        out[name] = kind
    if var_kw:
        if isinstance(obj, type):  # a class passing **kwargs on to its base
            bases = [base for base in obj.__mro__[1:] if base is not object]
            target = bases[0] if bases else None
        else:  # a builder passing them on to the class it returns
            target = hints.get("return")
        if isinstance(target, type):
            for name, kind in option_types(target, skip).items():
                out.setdefault(name, kind)
    return out


def value_problems(options: Mapping[str, Any],
                   types: Mapping[str, Optional[OptionType]]) -> List[Tuple[str, str]]:
    """``(key, message)`` for every option whose value does not fit its type:
    sizes must be integers >= 1 (each entry of a list such as ``hidden``),
    learning rates numbers > 0, everything else what its signature implies."""
    problems: List[Tuple[str, str]] = []
    for key, value in options.items():
        if key in POSITIVE_SIZES:
            kind = types.get(key)
            if kind is not None and kind.kinds == {"list"}:  # e.g. hidden = [200, 100]
                if not isinstance(value, (list, tuple)) or not value:
                    problems.append((key, f"must be a non-empty list of integers >= 1, got {value!r}"))
                    continue
                for i, v in enumerate(value):
                    if not _is_int(v) or v < 1:
                        problems.append((f"{key}[{i}]", f"must be an integer >= 1, got {v!r}"))
            elif not _is_int(value) or value < 1:
                problems.append((key, f"must be an integer >= 1, got {value!r}"))
            continue
        if key in LEARNING_RATES:
            if not _is_number(value) or not value > 0:
                problems.append((key, f"must be a number > 0, got {value!r}"))
            continue
        kind = types.get(key)
        if kind is not None and not kind.accepts(value):
            problems.append((key, f"must be {kind.describe()}, got {value!r}"))
    return problems


def option_problems(fn: Callable, options: Mapping[str, Any]) -> List[str]:
    """``"key: message"`` for every option of ``fn`` (a function or class,
    followed through ``**kwargs``) whose value does not fit its type."""
    return [f"{key}: {message}" for key, message in value_problems(options, option_types(fn))]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


