"""Where :mod:`iaerf.influence.task` and the benchmarks import the data adapter from until they import
:mod:`iaerf.indexed_data` (the one adapter, shared with the Hessian operators) directly."""
from iaerf.indexed_data import IndexedData, tuple_item

__all__ = ["IndexedData", "tuple_item"]
