"""moejax.benchmarking.torch_peers at tiny shapes: every workload builds and runs on both
sides, and where both compute the same function (same weights copied in) they agree."""

import sys

import numpy as np
import pytest

# The PyTorch peers are the optional extra `compare` (pip install -e '.[compare]').
pytest.importorskip("torch")
pytest.importorskip("PEER_pytorch")
pytest.importorskip("transformers")

from moejax.benchmarking import torch_peers  # noqa: E402

# N = 16², T = 2 × 32 = 64 tokens, d = 64.
ARGS = torch_peers.Shapes(batch=2, length=32, n=16, n_small=8, peer_d=64, heads=2, top_k=4, d_key=32,
                 moe_d=64, moe_ff=64)


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
  case = torch_peers.dense_case(ARGS)
  y_torch, y_jax = (f() for f in case.check)
  assert y_torch.shape == y_jax.shape == (2, 32, 64)
  np.testing.assert_allclose(y_jax, y_torch, rtol=1e-5, atol=1e-5)
  t, (j,) = _losses(case)
  assert np.isfinite(t) and np.isfinite(j)
  np.testing.assert_allclose(j, t, rtol=1e-5)


def test_peer_forward_same_weights_same_outputs():
  case = torch_peers.peer_fwd_case(ARGS)
  y_torch, y_jax = (f() for f in case.check)
  assert y_torch.shape == y_jax.shape == (2, 32, 64)
  assert np.isfinite(y_jax).all()
  np.testing.assert_allclose(y_jax, y_torch, rtol=1e-4, atol=1e-4)


def test_peer_adam_steps_start_from_the_same_loss():
  case = torch_peers.peer_adam_case(ARGS, ARGS.n)
  t, (dense, lazy) = _losses(case)
  for v in (t, dense, lazy):
    assert v.shape == () and np.isfinite(v)
  np.testing.assert_allclose(dense, t, rtol=1e-4)
  np.testing.assert_allclose(lazy, t, rtol=1e-4)


def test_moe_dropless_matches_mixtral_and_einsum_runs():
  case = torch_peers.moe_case(ARGS)
  y_torch, y_jax = (f() for f in case.check)
  assert y_torch.shape == y_jax.shape == (2, 32, 64)
  np.testing.assert_allclose(y_jax, y_torch, rtol=1e-4, atol=1e-5)
  t, (dropless, einsum) = _losses(case)
  for v in (t, dropless, einsum):
    assert v.shape == () and np.isfinite(v)


def test_missing_extra_is_one_line(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "PEER_pytorch", None)
  with pytest.raises(SystemExit) as e:
    torch_peers.require_torch_peers()
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "pip install -e '.[compare]'" in err
