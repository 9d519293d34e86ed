"""The ``MODELS`` registry: name -> ``build(x_dim, **options) -> LatentModel``.

The model files register into it; ``pyrovae.models`` imports them all, so the
registry is full whenever the package is imported.
"""

from pyrovae.registry import Registry

MODELS = Registry("model")
