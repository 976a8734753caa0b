"""moejax layers next to their PyTorch peers, at the same shapes with the same weights.

Each workload is a :class:`Case`: a torch fn and moejax variants, each a zero-argument timed
fn, built with the weights copied from the torch module into the moejax one
(:mod:`moejax.interop.torch_modules`), so that where both compute the same function their
outputs agree (``Case.check``). ``benchmarks/vs_pytorch.py`` times them round-robin.

Conventions: PEER-pytorch's ``dim_key`` is the size of ONE sub-key half and its keys are
per head; moejax's ``d_key`` is the whole query (two halves). So moejax d_key = 128 with
``per_head_keys=True`` is PEER-pytorch dim_key = 64: the same function, the same FLOPs.
HF Mixtral's experts run the ``Shapes.mixtral_impl`` experts implementation.

The PyTorch peers are the optional extra ``compare`` (:data:`INSTALL`).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import sys
from typing import Callable

from moejax.benchmarking import timing

INSTALL = "pip install -e '.[compare]'"


def require_torch_peers():
  """(torch, PEER_pytorch, transformers), or exit with one ``error:`` line naming the extra."""
  try:
    import torch
    import PEER_pytorch
    import transformers
  except ImportError as e:
    sys.stderr.write(f"error: {e.name} is missing (the PyTorch peers are an optional extra): "
                     f"{INSTALL}\n")
    sys.exit(2)
  return torch, PEER_pytorch, transformers


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The workloads' shapes (``benchmarks/vs_pytorch.py``'s flags of the same names)."""
  batch: int = 8
  length: int = 512
  n: int = 1024                   # PEER N = n²
  n_small: int = 128              # the second, small PEER N = n²
  peer_d: int = 256
  heads: int = 8
  top_k: int = 16
  d_key: int = 128                # moejax d_key (PEER-pytorch dim_key = d_key / 2)
  lm_query_norm: str = "batch"    # query norm of the LM steps' PEER
  moe_d: int = 512
  moe_ff: int = 1024              # hidden size of each expert
  experts: int = 8
  moe_top_k: int = 2
  capacity_factor: float = 1.25
  mixtral_impl: str = "grouped_mm"   # transformers' experts implementation: eager | grouped_mm | batched_mm


@dataclasses.dataclass
class Case:
  """One workload: a torch peer and moejax variants, each a zero-argument timed fn.

  ``jax``: (label, factory) pairs; ``factory()`` builds the fn (lazily, so that with
  ``pairwise`` only one big moejax variant is alive at a time: each is then timed
  round-robin against the torch fn on its own). ``check``: (torch_y, jax_y) fns returning
  numpy outputs of the same function with the same weights, for tests.
  """
  title: str
  tokens: int
  torch_label: str | None
  torch_fn: Callable | None
  jax: list[tuple[str, Callable[[], Callable]]]
  pairwise: bool = False
  check: tuple[Callable, Callable] | None = None


def run_case(case: Case, iters: int) -> list[tuple[str, float | None, str, float]]:
  """[(moejax label, torch seconds or None, torch label, moejax seconds)], timed round-robin."""
  rows = []
  groups = [[j] for j in case.jax] if case.pairwise else [case.jax]
  for group in groups:
    fns = [factory() for _, factory in group]
    lead = [case.torch_fn] if case.torch_fn else []
    ts = timing.round_robin(lead + fns, iters)
    t_torch = ts[0] if lead else None
    rows += [(label, t_torch, case.torch_label, t) for (label, _), t in zip(group, ts[len(lead):])]
    del fns
    gc.collect()
  return rows


# ------------------------------------------------------------------------------ helpers


def _np(t):
  return t.detach().cpu().numpy()


def _tokens(torch, b, l, d, seed=0):
  g = torch.Generator().manual_seed(seed)
  return torch.randn(b, l, d, generator=g)


def _split_fwd(module):
  """x -> y of an nnx layer, jitted through split / merge (only y leaves the jit): a
  ``functools.partial`` of the jitted function and the layer's state."""
  import jax
  from flax import nnx
  graphdef, state = nnx.split(module)
  f = jax.jit(lambda s, x: nnx.merge(graphdef, s, copy=True)(x)[0])
  return functools.partial(f, state)


def _fwd_bwd_params(module, with_aux: bool):
  """x -> (loss, grads w.r.t. every nnx.Param) with loss = mean(y²) [+ aux losses]: a
  ``functools.partial`` of the jitted function and the layer's parameters and rest."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def loss(params, rest, x):
    y, aux = nnx.merge(graphdef, params, rest, copy=True)(x)
    out = jnp.mean(jnp.square(y.astype(jnp.float32)))
    return out + aux.total_loss() if with_aux else out

  f = jax.jit(jax.value_and_grad(loss))
  return functools.partial(f, params, rest)


def _torch_fwd_bwd(tm, xt):
  def run():
    tm.zero_grad(set_to_none=True)
    loss = tm(xt).square().mean()
    loss.backward()
    return loss.detach()
  return run


# ------------------------------------------------------------------------------ PEER


def torch_peer(s: Shapes, n: int):
  """PEER-pytorch's PEER at N = n² (softmax scores), seeded."""
  torch, PEER_pytorch, _ = require_torch_peers()
  torch.manual_seed(0)
  return PEER_pytorch.PEER(dim=s.peer_d, heads=s.heads, num_experts=n * n,
                           num_experts_per_head=s.top_k, dim_key=s.d_key // 2,
                           non_competing_scores=False)


def moejax_peer_like(s: Shapes, n: int, tp):
  """moejax PEER computing the same function as PEER-pytorch ``tp`` (weights copied; its
  shapes are ``tp``'s: ``s`` and ``n`` only name them)."""
  from moejax.interop.torch_modules import peer_from_pytorch
  return peer_from_pytorch(tp)


def peer_fwd_case(s: Shapes) -> Case:
  """PEER forward at N = s.n² (torch under no_grad; moejax jitted, only y leaves the jit)."""
  import jax.numpy as jnp
  import numpy as np
  torch, _, _ = require_torch_peers()
  n, b, l = s.n, s.batch, s.length
  tp = torch_peer(s, n).eval()
  xt = _tokens(torch, b, l, s.peer_d)
  xj = jnp.asarray(_np(xt))
  fwd = _split_fwd(moejax_peer_like(s, n, tp))

  def torch_fn():
    with torch.no_grad():
      return tp(xt)

  return Case(f"PEER forward, N = {n}², d = {s.peer_d}, h = {s.heads}, k = {s.top_k}, "
              f"d_key = {s.d_key}", b * l, "PEER-pytorch PEER (no_grad)", torch_fn,
              [("PEER (jit)", lambda: lambda: fwd(xj))],
              check=(lambda: _np(torch_fn()), lambda: np.asarray(fwd(xj))))


def peer_adam_dense_step(m, lr):
  """(step(state, x) -> (state, loss), state): optax Adam over every parameter (dense [N, d]
  table gradients and moments). ``step`` is not jitted (jit it with the state donated)."""
  import jax.numpy as jnp
  import optax
  from flax import nnx
  opt = nnx.Optimizer(m, optax.adam(lr), wrt=nnx.Param)
  graphdef, state = nnx.split((m, opt))

  def step(state, x):
    model, opt = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(
        lambda mdl: jnp.mean(jnp.square(mdl(x)[0])), argnums=nnx.DiffState(0, nnx.Param))(model)
    opt.update(model, grads)
    return nnx.state((model, opt)), loss

  return step, state


def peer_adam_row_sparse_step(m, batch_shape: tuple[int, int], lr):
  """(step(state, x) -> (state, loss), state): lazy Adam on the retrieved table rows of
  ``x [*batch_shape, d]`` (RowDelta taps, TableAdam), optax Adam on the other parameters.
  ``step`` is not jitted (jit it with the state donated)."""
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from moejax.layers.base import RowDelta, TableParam
  from moejax.training import row_sparse
  b, l = batch_shape
  others = nnx.All(nnx.Param, nnx.Not(TableParam))
  opt = nnx.Optimizer(m, optax.adam(lr), wrt=others)
  table_adam = row_sparse.TableAdam(m, lr_schedule=lambda count: lr, b1=0.9, b2=0.999, eps=1e-8)
  graphdef, state = nnx.split((m, opt, table_adam))

  def step(state, x):
    model, opt, ta = nnx.merge(graphdef, state)
    row_sparse.attach(model, b, l)
    loss, grads = nnx.value_and_grad(
        lambda mdl: jnp.mean(jnp.square(mdl(x)[0])),
        argnums=nnx.DiffState(0, nnx.Any(others, RowDelta)))(model)
    grads, delta_grads = nnx.split_state(grads, nnx.Not(RowDelta), RowDelta)
    rows = ta.row_grads(model, delta_grads)
    row_sparse.detach(model)
    ta.apply(model, rows, opt.step[...] + 1)
    opt.update(model, grads)
    return nnx.state((model, opt, ta)), loss

  return step, state


def _donated_run(step, state, x):
  """() -> loss: one jitted ``step`` on the state held here, donated (updated in place)."""
  import jax
  step = jax.jit(step, donate_argnums=0)
  holder = {"s": state}

  def run():
    holder["s"], loss = step(holder["s"], x)
    return loss
  return run


def _jax_peer_adam_dense(m, x, lr):
  """() -> loss: :func:`peer_adam_dense_step` jitted, its state donated."""
  return _donated_run(*peer_adam_dense_step(m, lr), x)


def _jax_peer_adam_row_sparse(m, x, lr):
  """() -> loss: :func:`peer_adam_row_sparse_step` jitted, its state donated (tables and
  moments updated in place)."""
  return _donated_run(*peer_adam_row_sparse_step(m, x.shape[:2], lr), x)


def peer_adam_case(s: Shapes, n: int) -> Case:
  """PEER + Adam step (loss = mean(y²)) at N = n². Pairwise from N = 512²: one moejax variant
  alive at a time next to torch."""
  import jax.numpy as jnp
  torch, _, _ = require_torch_peers()
  b, l, lr = s.batch, s.length, 1e-3
  tp = torch_peer(s, n).train()
  opt = torch.optim.Adam(tp.parameters(), lr=lr, fused=True)
  xt = _tokens(torch, b, l, s.peer_d)
  xj = jnp.asarray(_np(xt))

  def torch_fn():
    loss = tp(xt).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)       # no [N, d] gradients held between steps
    return loss.detach()

  return Case(f"PEER + Adam step (loss = mean(y²)), N = {n}²", b * l,
              "PEER-pytorch + torch.optim.Adam (fused)", torch_fn,
              [("PEER + optax Adam (dense tables)",
                lambda: _jax_peer_adam_dense(moejax_peer_like(s, n, tp), xj, lr)),
               ("PEER + lazy row-sparse Adam on tables (≠ dense Adam)",
                lambda: _jax_peer_adam_row_sparse(moejax_peer_like(s, n, tp), xj, lr))],
              pairwise=n >= 512)


# ------------------------------------------------------------------------------ MoE / dense


def torch_mixtral(s: Shapes):
  """transformers' MixtralSparseMoeBlock in train mode, weights ~ N(0, 1/d), seeded."""
  torch, _, _ = require_torch_peers()
  from transformers import MixtralConfig
  from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
  cfg = MixtralConfig(hidden_size=s.moe_d, intermediate_size=s.moe_ff,
                      num_local_experts=s.experts, num_experts_per_tok=s.moe_top_k,
                      router_jitter_noise=0.0)
  cfg._experts_implementation = s.mixtral_impl
  torch.manual_seed(0)
  m = MixtralSparseMoeBlock(cfg).train()
  with torch.no_grad():                    # the block alone allocates with torch.empty
    for p in m.parameters():
      p.normal_(0.0, s.moe_d ** -0.5)
  return m


def moejax_moe_like(s: Shapes, tm, dispatch: str):
  """moejax MoE with Mixtral's weights (dropless computes Mixtral's function)."""
  from moejax.interop.torch_modules import moe_from_mixtral
  m = moe_from_mixtral(tm, dispatch=dispatch, capacity_factor=s.capacity_factor)
  m.train()
  return m


def torch_swiglu(s: Shapes):
  """Three bias-free nn.Linear as a SwiGLU of hidden moe_top_k · moe_ff, seeded."""
  torch, _, _ = require_torch_peers()
  nn = torch.nn
  hidden = s.moe_top_k * s.moe_ff

  class SwiGLU(nn.Module):
    def __init__(self):
      super().__init__()
      self.w1 = nn.Linear(s.moe_d, hidden, bias=False)   # gate (silu)
      self.w3 = nn.Linear(s.moe_d, hidden, bias=False)   # up
      self.w2 = nn.Linear(hidden, s.moe_d, bias=False)   # down

    def forward(self, x):
      return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))

  torch.manual_seed(0)
  return SwiGLU()


def moe_case(s: Shapes) -> Case:
  """MoE fwd+bwd, grads w.r.t. parameters only (x needs no grad): HF Mixtral's block vs
  moejax dropless and einsum (capacity) dispatch, train mode, default aux losses."""
  import jax.numpy as jnp
  import numpy as np
  torch, _, _ = require_torch_peers()
  tm = torch_mixtral(s)
  xt = _tokens(torch, s.batch, s.length, s.moe_d)
  xj = jnp.asarray(_np(xt))

  def jax_row(dispatch):
    f = _fwd_bwd_params(moejax_moe_like(s, tm, dispatch), with_aux=True)
    return lambda: f(xj)

  dropless = moejax_moe_like(s, tm, "dropless")
  return Case(f"MoE fwd+bwd, top-{s.moe_top_k} of {s.experts} SwiGLU experts, d = {s.moe_d}, "
              f"expert hidden {s.moe_ff}", s.batch * s.length,
              f"HF MixtralSparseMoeBlock ({s.mixtral_impl})", _torch_fwd_bwd(tm, xt),
              [("MoE dropless (+ z / balance losses)", lambda: jax_row("dropless")),
               (f"MoE einsum cf={s.capacity_factor} (+ z / balance losses)",
                lambda: jax_row("einsum"))],
              check=(lambda: _np(tm(xt)), lambda: np.asarray(_split_fwd(dropless)(xj))))


def dense_case(s: Shapes) -> Case:
  """Dense SwiGLU FFN fwd+bwd (the active parameters of the MoE's top-k experts), grads
  w.r.t. parameters only."""
  import jax.numpy as jnp
  import numpy as np
  from moejax.interop.torch_modules import dense_from_swiglu
  torch, _, _ = require_torch_peers()
  tm = torch_swiglu(s)
  xt = _tokens(torch, s.batch, s.length, s.moe_d)
  xj = jnp.asarray(_np(xt))
  m = dense_from_swiglu(tm.w1, tm.w3, tm.w2)
  f = _fwd_bwd_params(m, with_aux=False)
  return Case(f"Dense SwiGLU FFN fwd+bwd, d = {s.moe_d}, hidden {s.moe_top_k * s.moe_ff}",
              s.batch * s.length, "3 × nn.Linear SwiGLU", _torch_fwd_bwd(tm, xt),
              [("DenseFFN (silu, gated)", lambda: lambda: f(xj))],
              check=(lambda: _np(tm(xt)), lambda: np.asarray(_split_fwd(m)(xj))))
