"""Shared infrastructure of the engine, one floor below everything else (imports nothing of iaerf above it).

- :mod:`~iaerf.core.io`: atomic writes, JSON, checksummed torch files, settings keys;
- :mod:`~iaerf.core.identity`: the one fingerprint scheme (tensors, files, module states, callables);
- :mod:`~iaerf.core.indexed_data`: the one data contract (Dataset, DataLoader, tensors, tuples, dict items);
- :mod:`~iaerf.core.heads`: the classifier-head finder, ``eval_mode`` and the model checks;
- :mod:`~iaerf.core.distributed`: process-group primitives and sharding;
- :mod:`~iaerf.core.train_loop`, :mod:`~iaerf.core.progress`, :mod:`~iaerf.core.plotting`,
  :mod:`~iaerf.core.extension`: the one training loop, the one progress bar, figure helpers, the native extension.
"""
