"""The ``FIGURES`` registry: model family (its ``MODELS`` name) ->
``figures(model, train, test, out_dir) -> list[Path]``.

The figure files register into it; ``pyrovae.viz`` imports them all, so the
registry is full whenever the package is imported.
"""

from pyrovae.registry import Registry

FIGURES = Registry("figure set")
