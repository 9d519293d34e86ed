"""Closed-form mathematics of the model families, on plain tensors; beneath
``models/`` and ``infer/``, importing neither.

* :mod:`pyrovae.maths.linear`: the linear-Gaussian family (factor analysis,
  probabilistic PCA): exact marginal log-density and posterior through the
  K x K capacitance matrix, maximum-likelihood PPCA, varimax rotation.
* :mod:`pyrovae.maths.mixture`: Gaussian mixtures: the parameter container,
  component log-densities and responsibilities, the M-step, k-means++ seeding
  and Lloyd's k-means.

The models (``pyrovae.models``) and the EM algorithms (``pyrovae.infer.em``,
``pyrovae.infer.em_mixture``) both import these downward.
"""
