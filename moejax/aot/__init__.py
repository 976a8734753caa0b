"""Ahead-of-time compiles for TPU slices that are not there (needs libtpu: ``jax[tpu]``).

  chips.py    per-chip figures (peak FLOP/s, HBM) and the topology names libtpu accepts
  targets.py  a topology's devices as compile targets; compile any function for them
  report.py   what a compiled train/eval step says: memory, cost, estimate; out-of-memory advice
  compile.py  a config's train and eval steps compiled for a topology -> ``CompileReport``

The command line is ``python -m moejax.compile`` (``moejax/compile.py``).
"""
