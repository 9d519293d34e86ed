"""The ``DATASETS`` registry: name -> ``load(split, root, **options) -> ArrayDataset``."""

from pyrovae.registry import Registry

DATASETS = Registry("data set")
