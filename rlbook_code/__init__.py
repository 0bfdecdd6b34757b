"""rlbook_code: the estimators and the training loop of the rlbook.

One module per estimator family; import them explicitly, e.g.
``from rlbook_code.kl import kl_k3``. Nothing heavy is imported here.
"""

__version__ = "0.1.0"
