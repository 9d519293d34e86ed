"""Name -> object registries filled by a ``register(name)`` decorator.

The CLI and the benchmark suites look names up here; an unknown name gives an
error that lists the known ones instead of a bare ``KeyError``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, TypeVar

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
