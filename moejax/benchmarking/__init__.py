"""What the ``benchmarks/`` scripts time, as functions their tests can call too.

* :mod:`~moejax.benchmarking.timing`: timing side by side (round-robin medians).
* :mod:`~moejax.benchmarking.train_steps`: train steps on random tokens (a config's, a small
  PEER LM's) and the step's FLOP/s as a fraction of a matmul's.
* :mod:`~moejax.benchmarking.child`: a function run in a fresh process set up as ``train.py``.
* :mod:`~moejax.benchmarking.torch_peers`: moejax layers next to their PyTorch peers, with the
  same weights (needs the ``compare`` extra).
* :mod:`~moejax.benchmarking.row_kernels`: the row-sparse PEER step's native row kernels
  alone, and the host's streaming bandwidth (needs the CPU backend's kernels).

The scripts are leaves: they import from here, nothing imports them. Every module imports JAX
inside its functions, so that a script can set up its process (``backends.prepare_process``)
after importing them and before JAX's first computation.
"""
