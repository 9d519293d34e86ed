"""The ``GUIDES`` registry: name -> ``build(x_dim, z_dim, **options)``, an
encoder network whose forward pass returns the parameters of q(z | x).

The guide files register into it; ``pyrovae.guides`` imports them all, so the
registry is full whenever the package is imported.
"""

from pyrovae.registry import Registry

GUIDES = Registry("guide")
