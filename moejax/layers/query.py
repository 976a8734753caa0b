"""The product-key query network shared by PEER and PKM, and its config checks.

:class:`ProductKeyQuery`: per-head query projection, query normalisation (BatchNorm over
real tokens / per-head LayerNorm / none) and sub-keys, returning raw scores and indices of
the k best product keys per head. The top-k itself is a kernel
(:mod:`moejax.kernels`: the Pallas retrieval on TPU/GPU, the plain-JAX reference on CPU),
run per batch shard under a mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moejax import kernels, sharding
from moejax.layers.projection import project

QUERY_NORMS = ("batch", "whiten", "layer", "none")


def _divides(size: int, axes: tuple[str, ...]) -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return size % math.prod(mesh.shape[a] for a in axes) == 0


def topk_batch_parallel(queries: jax.Array, keys1: jax.Array, keys2: jax.Array, k: int, *,
                        ops: kernels.Ops | None = None) -> tuple[jax.Array, jax.Array]:
  """``ops.topk`` (default: the reference ``product_key_topk``) run per batch shard under a
  mesh (GSPMD would otherwise all-gather the half-scores and candidates of the whole batch
  around the top-k sorts, and a Pallas kernel cannot be partitioned by GSPMD at all)."""
  ops = ops or kernels.get("reference")
  mesh = jax.sharding.get_abstract_mesh()
  batch_ax = () if mesh.empty else sharding.mesh_axes("batch")
  if not batch_ax or not _divides(queries.shape[0], batch_ax):
    return ops.topk(queries, keys1, keys2, k)
  spec = P(batch_ax)
  return jax.shard_map(lambda q, a, b: ops.topk(q, a, b, k), in_specs=(spec, P(), P()),
                       out_specs=(spec, spec), check_vma=ops.name == "reference")(
                           queries, keys1, keys2)


def _init_affine_and_mean(norm: nnx.Module, heads: int, d_key: int, momentum: float,
                          epsilon: float, use_running_average: bool) -> None:
  """What the batch-statistics query norms share: scale, bias, running mean, settings."""
  names = ("key_heads", "key_dim")
  norm.scale = sharding.param(jnp.ones((heads, d_key), jnp.float32), names)
  norm.bias = sharding.param(jnp.zeros((heads, d_key), jnp.float32), names)
  norm.mean = sharding.param(jnp.zeros((heads, d_key), jnp.float32), names, kind=nnx.BatchStat)
  norm.momentum = momentum
  norm.epsilon = epsilon
  norm.use_running_average = use_running_average


def _real_token_weights(q: jax.Array, mask: jax.Array | None):
  """``[b, l, 1, 1]`` weights of the real tokens of ``q [b, l, h, d]``, their count, and the
  count as a divisor (at least 1)."""
  w = (jnp.ones(q.shape[:2], q.dtype) if mask is None else mask.astype(q.dtype))[..., None, None]
  count = jnp.sum(w)
  return w, count, jnp.maximum(count, 1.0)


def _update_running(pairs, count: jax.Array, momentum: float) -> None:
  """``running = momentum · running + (1 − momentum) · batch`` for each ``(stat, batch)``
  (flax's convention); a batch with no real token leaves the statistics unchanged."""
  for stat, batch in pairs:
    old = stat[...]
    new = momentum * old + (1 - momentum) * jax.lax.stop_gradient(batch).astype(old.dtype)
    stat[...] = jnp.where(count > 0, new, old)


class MaskedBatchNorm(nnx.Module):
  """BatchNorm over the query features ``[h, d_key]``; statistics over real tokens only.

  Training (``use_running_average=False``): mean / variance over every unmasked token of
  the batch. Under jit + GSPMD these sums over the (sharded) batch axes are global, i.e.
  the statistics are those of the whole data-parallel batch, like a synchronised BN.
  Running statistics (``nnx.BatchStat``) are updated with ``momentum`` (flax convention:
  ``ra = momentum·ra + (1-momentum)·batch``) and used after ``model.eval()``.
  A batch with no real token leaves the running statistics unchanged.
  """

  def __init__(self, heads: int, d_key: int, *, momentum: float = 0.99, epsilon: float = 1e-5,
               use_running_average: bool = False):
    _init_affine_and_mean(self, heads, d_key, momentum, epsilon, use_running_average)
    self.var = sharding.param(jnp.ones((heads, d_key), jnp.float32), ("key_heads", "key_dim"),
                              kind=nnx.BatchStat)

  def __call__(self, q: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``q [b, l, h, d]`` float32 -> normalised ``q``."""
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      w, count, denom = _real_token_weights(q, mask)
      mean = jnp.sum(q * w, axis=(0, 1)) / denom
      var = jnp.sum(jnp.square(q - mean) * w, axis=(0, 1)) / denom
      _update_running(((self.mean, mean), (self.var, var)), count, self.momentum)
    return (q - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[...] + self.bias[...]


class MaskedWhitening(nnx.Module):
  """BatchNorm that also decorrelates: ZCA whitening of each head's query over real tokens.

  An experiment, not a recommendation: in the cpu-scale study it raised the training loss
  and lowered expert usage against per-feature BatchNorm (``experiments/peer_paper``); kept
  so that the result can be rerun and the idea taken further.

  Per-feature BatchNorm gives every query feature unit variance but leaves the features
  correlated. When the layer's inputs span few directions (a small model on byte tokens),
  each head's half-queries lie near a low-dimensional subspace, the top-k of one half
  predicts the top-k of the other, and most product keys (i1, i2) are never formed: expert
  usage stays far below 100% however large the eval set (measured in
  ``experiments/peer_paper/README.md``). ZCA, ``(q − μ) Σ^{-1/2}``, rotates back to the original
  feature axes after scaling, so it is the whitening closest to the un-normalised query.
  Whitened inputs of a freshly initialised layer do reach nearly every expert
  (``experiments/peer_paper/query_rank.py``); training with whitened queries did not keep
  that (see above).

  Training: mean ``μ [h, d]`` and covariance ``Σ [h, d, d]`` over the unmasked tokens (global
  under GSPMD, as :class:`MaskedBatchNorm`), held constant in the backward (stop-gradient:
  the gradient of an eigendecomposition is unstable where eigenvalues nearly coincide,
  which is exactly the low-rank case this is for). Running ``μ``, ``Σ`` with ``momentum``
  are used after ``model.eval()``. ``epsilon`` is added to Σ's diagonal. Then a learnt
  per-feature scale and bias, as BatchNorm's.
  """

  def __init__(self, heads: int, d_key: int, *, momentum: float = 0.99, epsilon: float = 1e-5,
               use_running_average: bool = False):
    _init_affine_and_mean(self, heads, d_key, momentum, epsilon, use_running_average)
    self.cov = sharding.param(jnp.broadcast_to(jnp.eye(d_key, dtype=jnp.float32), (heads, d_key, d_key)),
                              ("key_heads", "key_dim", None), kind=nnx.BatchStat)

  def __call__(self, q: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``q [b, l, h, d]`` float32 -> whitened ``q``."""
    if self.use_running_average:
      mean, cov = self.mean[...], self.cov[...]
    else:
      w, count, denom = _real_token_weights(q, mask)
      qs = jax.lax.stop_gradient(q)
      mean = jnp.sum(qs * w, axis=(0, 1)) / denom                              # [h, d]
      centred = (qs - mean) * w
      cov = jnp.einsum("blhd,blhe->hde", centred, qs - mean) / denom          # [h, d, d]
      _update_running(((self.mean, mean), (self.cov, cov)), count, self.momentum)
    d = q.shape[-1]
    evals, evecs = jnp.linalg.eigh(cov + self.epsilon * jnp.eye(d, dtype=cov.dtype))
    inv_sqrt = jnp.einsum("hde,he,hfe->hdf", evecs, jax.lax.rsqrt(jnp.maximum(evals, self.epsilon)),
                          evecs)
    inv_sqrt = jax.lax.stop_gradient(inv_sqrt)
    y = jnp.einsum("blhd,hde->blhe", q - jax.lax.stop_gradient(mean), inv_sqrt)
    return y * self.scale[...] + self.bias[...]


class HeadLayerNorm(nnx.Module):
  """LayerNorm of each head's query over d_key (per-token, so causal-safe)."""

  def __init__(self, heads: int, d_key: int, *, epsilon: float = 1e-5):
    names = ("key_heads", "key_dim")
    self.scale = sharding.param(jnp.ones((heads, d_key), jnp.float32), names)
    self.bias = sharding.param(jnp.zeros((heads, d_key), jnp.float32), names)
    self.epsilon = epsilon

  def __call__(self, q: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    del mask
    mean = jnp.mean(q, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(q - mean), axis=-1, keepdims=True)
    return (q - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[...] + self.bias[...]


class ProductKeyQuery(nnx.Module):
  """Per-head queries -> top-k product keys. Shared by PEER and PKM.

  Parameters (all ordinary ``nnx.Param``, not tables):
    ``query``  ``[d_model, h, d_key]`` ('embed', 'key_heads', 'key_dim'),
      init N(0, (query_init_scale)² / d_model): unit-variance queries for unit-variance x
      (LeCun); with BatchNorm the scale only matters for the first step.
    ``keys1``, ``keys2`` ``[h or 1, n, d_key/2]`` ('key_heads', 'subkeys', 'key_dim'),
      init N(0, (key_init_scale)² / (d_key/2)): every sub-key has expected unit norm, so for
      unit-variance query halves each half-score is ~N(0, 1) and the full score ~N(0, 2):
      softmax over the top k is neither one-hot nor flat at the start. (XLM uses
      U(±1/√(d_key/2)), i.e. the same up to a factor √3; PEER-pytorch uses N(0, 1).)
    ``norm``: :class:`MaskedBatchNorm` ('batch'), :class:`MaskedWhitening` ('whiten'),
      :class:`HeadLayerNorm` ('layer') or None.

  Returns raw scores ``[b, l, h, k]`` (float32, sorted descending) and int32 indices
  ``[b, l, h, k]`` into the n² product keys.
  """

  def __init__(self, d_model: int, *, num_keys_sqrt: int, heads: int, top_k: int, d_key: int,
               per_head_keys: bool = False, query_norm: str = "batch", bn_momentum: float = 0.99,
               norm_epsilon: float = 1e-5, query_init_scale: float = 1.0,
               key_init_scale: float = 1.0, dtype=jnp.float32, rngs: nnx.Rngs):
    if d_key % 2:
      raise ValueError(f"d_key={d_key} must be even")
    if query_norm not in QUERY_NORMS:
      raise ValueError(f"query_norm={query_norm!r} not in {QUERY_NORMS}")
    self.n, self.heads, self.top_k, self.d_key = num_keys_sqrt, heads, top_k, d_key
    self.dtype = dtype
    q_std = query_init_scale / math.sqrt(d_model)
    self.query = sharding.param(
        q_std * jax.random.normal(rngs.params(), (d_model, heads, d_key), jnp.float32),
        ("embed", "key_heads", "key_dim"))
    hk = heads if per_head_keys else 1
    k_std = key_init_scale / math.sqrt(d_key // 2)
    names = ("key_heads", "subkeys", "key_dim")
    self.keys1 = sharding.param(
        k_std * jax.random.normal(rngs.params(), (hk, num_keys_sqrt, d_key // 2), jnp.float32), names)
    self.keys2 = sharding.param(
        k_std * jax.random.normal(rngs.params(), (hk, num_keys_sqrt, d_key // 2), jnp.float32), names)
    if query_norm == "batch":
      self.norm = MaskedBatchNorm(heads, d_key, momentum=bn_momentum, epsilon=norm_epsilon)
    elif query_norm == "whiten":
      self.norm = MaskedWhitening(heads, d_key, momentum=bn_momentum, epsilon=norm_epsilon)
    elif query_norm == "layer":
      self.norm = HeadLayerNorm(heads, d_key, epsilon=norm_epsilon)
    else:
      self.norm = None

  def queries(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Normalised queries ``[b, l, h, d_key]`` in float32 (or wider)."""
    q = project(x.astype(self.dtype), self.query[...].astype(self.dtype))   # [b, l, h, d_key]
    q = q.astype(jnp.promote_types(q.dtype, jnp.float32))
    if self.norm is not None:
      q = self.norm(q, mask)
    return q

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               ops: kernels.Ops | None = None) -> tuple[jax.Array, jax.Array]:
    """``ops``: the kernels for the top-k (default: the plain-JAX reference)."""
    q = self.queries(x, mask)
    scores, indices = topk_batch_parallel(q, self.keys1[...], self.keys2[...], self.top_k,
                                          ops=ops)
    names = ("batch", "length", "key_heads", None)
    return sharding.constrain(scores, names), sharding.constrain(indices, names)


def validate_common(section: str, cfg, *, n_field: str, width: int) -> None:
  """Checks the fields PEER and PKM share; raises ConfigError (one line)."""
  from moejax.errors import config_error

  def fail(field, why, fix):
    return config_error(f"{section}.{field}", cfg[field], why, fix)

  n = cfg[n_field]
  if n < 1:
    raise fail(n_field, "must be >= 1", f"set --config.{section}.{n_field}=128")
  if cfg.heads < 1:
    raise fail("heads", "must be >= 1", f"set --config.{section}.heads=8")
  if cfg.top_k < 1 or cfg.top_k > n:
    raise fail("top_k", f"must be in [1, {section}.{n_field}={n}]",
               f"set --config.{section}.top_k={min(max(cfg.top_k, 1), n)}")
  if cfg.d_key < 2 or cfg.d_key % 2:
    raise fail("d_key", "must be even and >= 2 (it is split into two sub-key halves)",
               f"set --config.{section}.d_key={max(2, cfg.d_key + cfg.d_key % 2)}")
  if cfg.kernel not in kernels.CHOICES:
    raise fail("kernel", f"must be one of {list(kernels.CHOICES)}",
               f"set --config.{section}.kernel=auto")
  try:
    kernels.resolve(cfg.kernel, width=width)
  except ValueError as e:
    raise fail("kernel", str(e).split(" (")[0].replace(f"kernel={cfg.kernel!r} ", ""),
               f"set --config.{section}.kernel=auto, or interpret to run the TPU kernels "
               "in interpret mode") from None
  if cfg.query_norm not in QUERY_NORMS:
    raise fail("query_norm", f"must be one of {list(QUERY_NORMS)}",
               f"set --config.{section}.query_norm=batch")
  if not 0.0 <= cfg.bn_momentum < 1.0:
    raise fail("bn_momentum", "must be in [0, 1)", f"set --config.{section}.bn_momentum=0.99")
  if cfg.norm_epsilon <= 0:
    raise fail("norm_epsilon", "must be > 0", f"set --config.{section}.norm_epsilon=1e-5")
  for f in [f for f in cfg.keys() if f.endswith("init_scale")]:
    if cfg[f] <= 0:
      raise fail(f, "must be > 0", f"set --config.{section}.{f}=1.0")
