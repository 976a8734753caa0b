"""moejax layers with reference PyTorch layers' weights compute the same function
(``moejax.interop.torch_modules``): PEER = PEER-pytorch, dropless MoE = HF Mixtral's sparse
MoE block, gated silu DenseFFN = a SwiGLU. Tiny shapes, float32."""

import jax
import numpy as np
import pytest
from flax import nnx

# The PyTorch peers are the optional extra `compare` (pip install -e '.[compare]').
torch = pytest.importorskip("torch")
PEER_pytorch = pytest.importorskip("PEER_pytorch")
pytest.importorskip("transformers")

from moejax.interop import torch_modules  # noqa: E402

B, L = 2, 32


def _tokens(d, seed=0):
  g = torch.Generator().manual_seed(seed)
  return torch.randn(B, L, d, generator=g)


def _forward(module, x):
  return np.asarray(nnx.jit(lambda m, x: m(x)[0])(module, jax.numpy.asarray(x.numpy())))


def test_peer_equals_peer_pytorch():
  torch.manual_seed(0)
  tp = PEER_pytorch.PEER(dim=64, heads=2, num_experts=16 * 16, num_experts_per_head=4,
                         dim_key=16, non_competing_scores=False).eval()
  x = _tokens(64)
  with torch.no_grad():
    want = tp(x).numpy()
  got = _forward(torch_modules.peer_from_pytorch(tp), x)
  assert got.shape == want.shape == (B, L, 64)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_peer_pytorch_relu_scores_are_refused():
  tp = PEER_pytorch.PEER(dim=16, heads=1, num_experts=4 * 4, num_experts_per_head=2,
                         dim_key=4, non_competing_scores=True)
  with pytest.raises(ValueError, match="non_competing_scores"):
    torch_modules.peer_from_pytorch(tp)


def test_dropless_moe_equals_mixtral_block():
  from transformers import MixtralConfig
  from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
  cfg = MixtralConfig(hidden_size=64, intermediate_size=64, num_local_experts=8,
                      num_experts_per_tok=2, router_jitter_noise=0.0)
  torch.manual_seed(0)
  block = MixtralSparseMoeBlock(cfg).eval()
  with torch.no_grad():                    # the block alone allocates with torch.empty
    for p in block.parameters():
      p.normal_(0.0, 64 ** -0.5)
  x = _tokens(64)
  with torch.no_grad():
    out = block(x)
  want = (out[0] if isinstance(out, tuple) else out).numpy()
  got = _forward(torch_modules.moe_from_mixtral(block), x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_gated_dense_equals_swiglu():
  nn = torch.nn
  torch.manual_seed(0)
  gate, up, down = nn.Linear(64, 96, bias=False), nn.Linear(64, 96, bias=False), nn.Linear(96, 64, bias=False)
  x = _tokens(64)
  with torch.no_grad():
    want = down(nn.functional.silu(gate(x)) * up(x)).numpy()
  got = _forward(torch_modules.dense_from_swiglu(gate, up, down), x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
