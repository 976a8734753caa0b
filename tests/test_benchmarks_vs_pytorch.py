"""benchmarks/vs_pytorch.py at tiny shapes: every workload builds and runs on both sides,
and where both compute the same function (same weights copied in) they agree."""

import importlib.util
import os
import sys

import numpy as np
import pytest

# The PyTorch peers are the optional extra `compare` (pip install -e '.[compare]').
pytest.importorskip("torch")
pytest.importorskip("PEER_pytorch")
pytest.importorskip("transformers")

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "vs_pytorch.py")
_spec = importlib.util.spec_from_file_location("vs_pytorch", _PATH)
vs = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("vs_pytorch", vs)   # dataclasses look their module up by name
_spec.loader.exec_module(vs)

# N = 16², T = 2 × 32 = 64 tokens, d = 64.
ARGS = vs.parse_args(["--batch", "2", "--length", "32", "--n", "16", "--n_small", "8",
                      "--peer_d", "64", "--heads", "2", "--top_k", "4", "--d_key", "32",
                      "--moe_d", "64", "--moe_ff", "64", "--iters", "1"])


def _value(out):
  return np.asarray(out.detach().numpy() if hasattr(out, "detach") else out)


def _losses(case):
  """Each side's first timed call (moejax fns built before torch moves its weights)."""
  jax_fns = [factory() for _, factory in case.jax]
  outs = []
  for fn in jax_fns:
    out = fn()
    outs.append(_value(out[0] if isinstance(out, tuple) else out))
  return _value(case.torch_fn()), outs


def test_dense_swiglu_same_weights_same_outputs_and_loss():
  case = vs.dense_case(ARGS)
  y_torch, y_jax = (f() for f in case.check)
  assert y_torch.shape == y_jax.shape == (2, 32, 64)
  np.testing.assert_allclose(y_jax, y_torch, rtol=1e-5, atol=1e-5)
  t, (j,) = _losses(case)
  assert np.isfinite(t) and np.isfinite(j)
  np.testing.assert_allclose(j, t, rtol=1e-5)


def test_peer_forward_same_weights_same_outputs():
  case = vs.peer_fwd_case(ARGS)
  y_torch, y_jax = (f() for f in case.check)
  assert y_torch.shape == y_jax.shape == (2, 32, 64)
  assert np.isfinite(y_jax).all()
  np.testing.assert_allclose(y_jax, y_torch, rtol=1e-4, atol=1e-4)


def test_peer_adam_steps_start_from_the_same_loss():
  case = vs.peer_adam_case(ARGS, ARGS.n)
  t, (dense, lazy) = _losses(case)
  for v in (t, dense, lazy):
    assert v.shape == () and np.isfinite(v)
  np.testing.assert_allclose(dense, t, rtol=1e-4)
  np.testing.assert_allclose(lazy, t, rtol=1e-4)


def test_moe_dropless_matches_mixtral_and_einsum_runs():
  case = vs.moe_case(ARGS)
  y_torch, y_jax = (f() for f in case.check)
  assert y_torch.shape == y_jax.shape == (2, 32, 64)
  np.testing.assert_allclose(y_jax, y_torch, rtol=1e-4, atol=1e-5)
  t, (dropless, einsum) = _losses(case)
  for v in (t, dropless, einsum):
    assert v.shape == () and np.isfinite(v)


def test_missing_extra_is_one_line(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "PEER_pytorch", None)
  with pytest.raises(SystemExit) as e:
    vs.require_torch_peers()
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "pip install -e '.[compare]'" in err


@pytest.mark.slow   # four LM programs compiled in a fresh process (~25 s)
def test_lm_steps_run_in_a_child_process_with_train_py_memory_setting():
  argv = ["--batch", "2", "--length", "16", "--n", "8", "--n_small", "4", "--peer_d", "32",
          "--heads", "2", "--top_k", "2", "--d_key", "16", "--iters", "1"]
  import platform
  times, kept = vs.in_child("lm", argv)
  assert kept == (platform.libc_ver()[0] == "glibc")          # CPU host, setting not turned off
  assert sorted(times) == sorted(f"{u} N={n}²" for n in (8, 4) for u in ("dense", "row_sparse"))
  assert all(0 < t < 60 for t in times.values())
  with pytest.raises(RuntimeError, match="--n"):               # the child's error comes back
    vs.in_child("lm", argv + ["--n", "not-a-number"])
