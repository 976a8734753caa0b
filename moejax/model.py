"""Decoder-only Transformer whose blocks take their feed-forward from the registry.

Which kind each block uses is config (``model.ffn`` everywhere, ``model.sparse_ffn``
at the blocks named by ``model.sparse_layers``), so MoE, PEER and PKM layers plug
in without this file knowing them.

What makes big configs fit (all config, none changes the maths):

* ``model.remat``: each block runs under ``nnx.remat`` with a policy (``moejax.config.REMAT_POLICIES``);
  ``save_named`` keeps only the activations named with ``checkpoint_name`` (``moejax.config.REMAT_NAMES``).
* ``model.scan_layers``: repeating blocks run under ``nnx.scan`` (:func:`plan_layout`); their
  variables are stacked on a leading ``'layers'`` axis. The stack is built from the same
  per-block init as the unscanned model, so both layouts start from equal weights
  (:func:`to_layout` converts a variable tree between them).
* :meth:`Transformer.hidden` + :meth:`Transformer.output_projection` give what a loss that
  never holds all logits needs (``moejax.layers.vocab_loss``); ``__call__`` still gives logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moejax import sharding
from moejax.config import parse_sparse_layers
from moejax.layers import Aux, build_ffn
from moejax.layers.attention import Attention, RMSNorm
from moejax.layers.projection import project

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def remat_policy(name: str, names: str | tuple[str, ...] = ("attn_out", "ffn_in")):
  """The ``jax.checkpoint`` policy of ``model.remat`` (``full``: save only block inputs)."""
  if name == "full":
    return None
  if name == "save_dots":  # projections saved; attention scores and softmax recomputed
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if name == "save_named":
    if isinstance(names, str):
      names = tuple(n.strip() for n in names.split(",") if n.strip())
    return jax.checkpoint_policies.save_only_these_names(*names)
  raise ValueError(f"no remat policy for {name!r}")


class Block(nnx.Module):
  """Pre-norm block: x + attn(norm(x)); x + ffn(norm(x)).

  ``ctx`` holds what every block sees: ``positions`` (RoPE), ``mask`` (real tokens),
  ``segment_ids`` (document of each token, or None) and ``token_ids`` (handed to FFNs
  whose ``wants_token_ids`` is true, e.g. hash routing by token id). With ``cache`` (a
  KV cache, :meth:`Attention.init_cache`) and ``ctx['index']`` the block decodes: its
  tokens sit at cache slots ``index ..`` and the new cache comes back.
  """

  def __init__(self, config: ml_collections.ConfigDict, ffn_kind: str, *, rngs: nnx.Rngs):
    m = config.model
    dtype = DTYPES[m.dtype]
    self.ffn_kind = ffn_kind
    self.attn_norm = RMSNorm(m.d_model, eps=m.norm_eps)
    self.attn = Attention(m.d_model, m.num_heads, m.head_dim, rope_theta=m.rope_theta,
                          num_kv_heads=m.get("num_kv_heads", 0),
                          bias=m.get("attention_bias", "none"), qk_norm=m.get("qk_norm", "none"),
                          norm_eps=m.norm_eps, dtype=dtype, rngs=rngs)
    self.ffn_norm = RMSNorm(m.d_model, eps=m.norm_eps)
    self.ffn = build_ffn(ffn_kind, config[ffn_kind], d_model=m.d_model, d_ff=m.d_ff, dtype=dtype,
                         rngs=rngs)

  def __call__(self, x, ctx: dict, cache: dict | None = None):
    h = self.attn_norm(x)
    if cache is None:
      a = self.attn(h, ctx["positions"], ctx.get("segment_ids"))
    else:
      a, cache = self.attn.decode(h, ctx["positions"], cache, ctx["index"], ctx.get("kv_valid"))
    x = x + checkpoint_name(a.astype(x.dtype), "attn_out")
    h = checkpoint_name(self.ffn_norm(x), "ffn_in")
    kw = {"token_ids": ctx["token_ids"]} if getattr(self.ffn, "wants_token_ids", False) else {}
    y, aux = self.ffn(h, mask=ctx["mask"], **kw)
    x = x + checkpoint_name(y.astype(x.dtype), "ffn_out")
    return sharding.constrain(x, ("batch", "length", "embed")), aux, cache


def _attn_cache(attn: Attention, batch: int, max_length: int) -> dict[str, jax.Array]:
  """The cache of a stacked (scanned) attention: shapes without the leading layers axis."""
  shape = (batch, max_length) + attn.wk.shape[-2:]
  return {"k": jnp.zeros(shape, attn.dtype), "v": jnp.zeros(shape, attn.dtype)}


class Group(nnx.Module):
  """Consecutive blocks that repeat as a unit under ``nnx.scan`` (variables stacked)."""

  def __init__(self, blocks: list[Block]):
    self.blocks = nnx.List(blocks)


def _has_row_tables(module: nnx.Module) -> bool:
  return any(getattr(m, "row_tables", ()) for _, m in nnx.iter_modules(module))


def plan_layout(kinds: list[str], scannable: list[bool] | None = None
                ) -> list[tuple[int, int, int]]:
  """Segments ``(start, group, repeats)`` covering the blocks in order.

  ``repeats >= 2``: blocks ``start .. start + group*repeats`` are ``repeats`` copies of the
  kinds ``kinds[start:start+group]`` and run as one scan over groups of ``group`` blocks.
  ``repeats == 1`` (then ``group == 1``): one block run as it is. Greedy from the left,
  each time the (group, repeats) covering most blocks, the smallest group on ties:
  ``dense x a + sparse + dense x b`` -> scan(a) + sparse + scan(b); ``every:K`` -> a scan
  over groups of K blocks (plus any partial group at the ends).
  """
  n = len(kinds)
  scannable = scannable or [True] * n
  out, i = [], 0
  while i < n:
    best_g, best_r = 1, 1
    for g in range(1, (n - i) // 2 + 1):
      if not all(scannable[i:i + g]):
        break
      r = 1
      while (i + (r + 1) * g <= n and kinds[i + r * g:i + (r + 1) * g] == kinds[i:i + g]
             and all(scannable[i + r * g:i + (r + 1) * g])):
        r += 1
      if r >= 2 and g * r > best_g * best_r:
        best_g, best_r = g, r
    out.append((i, best_g, best_r))
    i += best_g * best_r
  return out


def _stack(modules: list[nnx.Module]) -> nnx.Module:
  """One module whose variables stack those of ``modules`` (same graph) on a 'layers' axis."""
  graphdef, first = nnx.split(modules[0])
  states = [first] + [nnx.split(m)[1] for m in modules[1:]]

  def stack(*vs):
    value = jnp.stack([v[...] for v in vs])
    meta = vs[0].get_metadata()
    names = meta.get("out_sharding")
    out = vs[0].replace(value)
    if names:
      out.set_metadata(out_sharding=("layers",) + tuple(names))
    return out

  stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, stacked)


class Transformer(nnx.Module):
  """tokens [batch, length] -> logits [batch, length, vocab] (float32), {block name: Aux}.

  Variables: ``embed``, ``blocks/<i>/...`` (unscanned) or ``segments/<j>/...`` (scan_layers:
  a segment is a :class:`Block` run as it is, or a :class:`Group` whose variables carry a
  leading ``layers`` axis of its repeats), ``final_norm``, ``head``.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = config.model
    if m.vocab_size < 1:
      raise ValueError("config.model.vocab_size must be set (train.py takes it from the tokenizer)")
    self.dtype = DTYPES[m.dtype]
    self.remat = m.get("remat", "none")
    self.remat_names = m.get("remat_names", "attn_out,ffn_in")
    self.loss_chunk = m.get("loss_chunk", 0)
    self.scan_layers = m.get("scan_layers", False)
    sparse = set(parse_sparse_layers(m.sparse_layers, m.num_layers))
    self.kinds = tuple(m.sparse_ffn if i in sparse else m.ffn for i in range(m.num_layers))
    self.embed = sharding.param(
        jax.random.normal(rngs.params(), (m.vocab_size, m.d_model)) * m.d_model ** -0.5,
        ("vocab", "embed"))
    blocks = [Block(config, kind, rngs=rngs) for kind in self.kinds]
    if self.scan_layers:
      # Row-sparse training attaches per-layer buffers to table layers: those run unscanned.
      row_sparse = config.optim.get("table_update", "dense") == "row_sparse"
      scannable = [not (row_sparse and _has_row_tables(b)) for b in blocks]
      self.layout = tuple(plan_layout(list(self.kinds), scannable))
      self.segments = nnx.List([
          blocks[i] if r == 1 else
          _stack([Group(blocks[i + t * g:i + (t + 1) * g]) for t in range(r)])
          for i, g, r in self.layout])
    else:
      self.layout = tuple((i, 1, 1) for i in range(m.num_layers))
      self.blocks = nnx.List(blocks)
    self.final_norm = RMSNorm(m.d_model, eps=m.norm_eps)
    self.head = None if m.tie_embeddings else sharding.param(
        nnx.initializers.lecun_normal()(rngs.params(), (m.d_model, m.vocab_size)), ("embed", "vocab"))

  def block_names(self) -> list[str]:
    return [f"block_{i}_{kind}" for i, kind in enumerate(self.kinds)]

  def _remat(self, fn, prevent_cse: bool = True):
    if self.remat == "none":
      return fn
    return nnx.remat(fn, prevent_cse=prevent_cse,
                     policy=remat_policy(self.remat, self.remat_names))

  def _run_blocks(self, x, ctx: dict, cache: list | None = None
                  ) -> tuple[jax.Array, dict[str, Aux], list | None]:
    """Runs the blocks; with ``cache`` (:meth:`init_cache`) decodes and returns the new one."""
    names = self.block_names()
    auxes = {}
    new_cache = None if cache is None else []
    call = lambda block, x, ctx, c: block(x, ctx, c)
    remat = self._remat if cache is None else (lambda fn, prevent_cse=True: fn)
    if not self.scan_layers:
      run = remat(call)
      for i, (name, block) in enumerate(zip(names, self.blocks)):
        x, aux, c = run(block, x, ctx, None if cache is None else cache[i])
        if new_cache is not None:
          new_cache.append(c)
        if block.ffn_kind != "dense":
          auxes[name] = aux
      return x, auxes, new_cache
    for j, ((start, g, r), seg) in enumerate(zip(self.layout, self.segments)):
      seg_cache = None if cache is None else cache[j]
      if r == 1:
        x, aux, c = remat(call)(seg, x, ctx, seg_cache)
        if new_cache is not None:
          new_cache.append(c)
        if seg.ffn_kind != "dense":
          auxes[names[start]] = aux
        continue
      run = remat(call, prevent_cse=False)  # scan already keeps the loop apart

      if seg_cache is None:
        @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=(nnx.Carry, 0),
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def body(x, group, ctx):
          out = []
          for block in group.blocks:
            x, aux, _ = run(block, x, ctx, None)
            out.append(aux)
          return x, tuple(out)

        x, stacked = body(x, seg, ctx)
      else:
        @nnx.scan(in_axes=(nnx.Carry, 0, None, 0), out_axes=(nnx.Carry, 0, 0),
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def body(x, group, ctx, caches):
          out, cs = [], []
          for block, c in zip(group.blocks, caches):
            x, aux, c = run(block, x, ctx, c)
            out.append(aux)
            cs.append(c)
          return x, tuple(out), tuple(cs)

        x, stacked, c = body(x, seg, ctx, seg_cache)
        new_cache.append(c)
      # Aux records come out stacked [repeats, ...]: give each block its own name again.
      for j2, kind in enumerate(self.kinds[start:start + g]):
        if kind == "dense":
          continue
        for t in range(r):
          auxes[names[start + t * g + j2]] = jax.tree.map(lambda a, t=t: a[t], stacked[j2])
    auxes = {n: auxes[n] for n in names if n in auxes}  # block order
    return x, auxes, new_cache

  def _embed(self, tokens):
    x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
    return sharding.constrain(x, ("batch", "length", "embed"))

  def hidden(self, tokens: jax.Array, *, mask: jax.Array | None = None,
             segment_ids: jax.Array | None = None, positions: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, Aux]]:
    """Final (normed) hidden states ``[batch, length, d_model]`` in the compute dtype, auxes.

    ``segment_ids`` / ``positions`` ``[batch, length]`` (packed rows, from the data
    pipeline): attention stays inside each document and RoPE positions are these (they
    restart at each document). None: one document per row, positions ``0 .. length-1``.
    """
    if mask is None:
      mask = jnp.ones(tokens.shape, bool)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    ctx = {"positions": positions, "mask": mask, "segment_ids": segment_ids,
           "token_ids": tokens}
    x, auxes, _ = self._run_blocks(self._embed(tokens), ctx)
    return self.final_norm(x), auxes

  def init_cache(self, batch: int, max_length: int) -> list:
    """An empty KV cache for :meth:`decode`: one entry per block (unscanned) or per segment
    (scan_layers: a tuple over the group's blocks, stacked over its repeats)."""
    if not self.scan_layers:
      return [b.attn.init_cache(batch, max_length) for b in self.blocks]
    out = []
    for (_, g, r), seg in zip(self.layout, self.segments):
      if r == 1:
        out.append(seg.attn.init_cache(batch, max_length))
        continue
      out.append(tuple(jax.tree.map(lambda a: jnp.broadcast_to(a, (r,) + a.shape),
                                    _attn_cache(b.attn, batch, max_length))
                       for b in seg.blocks))
    return out

  def decode(self, tokens: jax.Array, cache: list, index: jax.Array, *,
             positions: jax.Array | None = None, kv_valid: jax.Array | None = None,
             last_only: bool = False) -> tuple[jax.Array, list]:
    """Incremental forward: ``tokens [batch, n]`` at cache slots ``index .. index + n - 1``
    of each row (one document per row), attending to the cached keys / values of the
    earlier slots. Returns (logits ``[batch, n, vocab]`` float32, the new cache).

    ``positions [batch, n]``: RoPE positions (None: the slots). ``kv_valid [batch,
    max_length]``: the cache slots that hold real tokens (None: all); a token at an invalid
    slot is padding (left-padded prompts), attended by no one and routed nowhere.
    ``last_only``: logits of the last token only (``[batch, 1, vocab]``; a prompt's prefill).

    Run it in eval mode (query BatchNorm on its running statistics; MoE layers decode
    without dropping, see ``moejax.generation``).
    """
    b, n = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(index + jnp.arange(n), (b, n))
    mask = (jnp.ones((b, n), bool) if kv_valid is None
            else jax.lax.dynamic_slice_in_dim(kv_valid, index, n, axis=1))
    ctx = {"positions": positions, "mask": mask, "segment_ids": None,
           "token_ids": tokens, "index": index, "kv_valid": kv_valid}
    x, _, cache = self._run_blocks(self._embed(tokens), ctx, cache)
    x = self.final_norm(x[:, -1:] if last_only else x)
    logits = project(x, self.output_projection()).astype(jnp.float32)
    return logits, cache

  def output_projection(self) -> jax.Array:
    """``[d_model, vocab]`` in the compute dtype: logits = hidden @ this."""
    w = self.embed[...].T if self.head is None else self.head[...]
    return w.astype(self.dtype)

  def __call__(self, tokens: jax.Array, *, mask: jax.Array | None = None,
               segment_ids: jax.Array | None = None, positions: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, Aux]]:
    """
    Args:
      tokens: [batch, length] int32.
      mask: [batch, length] bool, True for real tokens (padding is ignored by
        batch statistics in sparse layers). None: all real.
      segment_ids, positions: [batch, length] int32 for packed rows (see :meth:`hidden`).
    """
    x, auxes = self.hidden(tokens, mask=mask, segment_ids=segment_ids, positions=positions)
    logits = project(x, self.output_projection()).astype(jnp.float32)
    return sharding.constrain(logits, ("batch", "length", "vocab")), auxes


# ---------------------------------------------------------------- layout conversion


def _stack_trees(trees: list[dict], consume: bool) -> dict:
  """The leaves of ``trees`` (one structure) stacked on a new leading axis; ``consume``:
  each leaf is removed from its tree once stacked, numpy leaves stacked by numpy."""
  if not consume:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  out = {}
  for k in list(trees[0]):
    if isinstance(trees[0][k], dict):
      out[k] = _stack_trees([t[k] for t in trees], True)
    else:
      xs = [t.pop(k) for t in trees]
      out[k] = np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)
  return out


def to_layout(pure: dict, config: ml_collections.ConfigDict, *, scanned: bool,
              consume: bool = False) -> dict:
  """Converts a model variable tree (``nnx.to_pure_dict(state)``) between the layouts.

  ``pure`` holds the layout of ``config`` with ``model.scan_layers = not scanned``; the
  result holds the other one (``scanned=True``: per-block -> stacked). Use it to evaluate
  or fine-tune a checkpoint in the other layout.

  ``consume`` (per-block -> stacked): each block's arrays leave ``pure`` as they are
  stacked, host (numpy) arrays on the host, so that the model is held once plus one
  stacked variable rather than twice (a checkpoint import).
  """
  import copy
  m = config.model
  sparse = set(parse_sparse_layers(m.sparse_layers, m.num_layers))
  kinds = [m.sparse_ffn if i in sparse else m.ffn for i in range(m.num_layers)]
  if config.optim.get("table_update", "dense") == "row_sparse":
    # which kinds hold row tables needs the modules: build them abstractly
    c = copy.deepcopy(config)
    c.model.scan_layers = True
    layout = nnx.eval_shape(lambda: Transformer(c, rngs=nnx.Rngs(0))).layout
  else:
    layout = plan_layout(kinds)
  out = {k: v for k, v in pure.items() if k not in ("blocks", "segments")}
  # Partial trees (e.g. only BatchStats) convert too: absent blocks stay absent.
  if scanned:
    blocks = pure.get("blocks", {})
    segs = {}
    for j, (i, g, r) in enumerate(layout):
      if r == 1:
        if i in blocks:
          segs[j] = blocks[i]
        continue
      group = {b: _stack_trees([blocks[i + t * g + b] for t in range(r)], consume)
               for b in range(g) if i + b in blocks}
      if group:
        segs[j] = {"blocks": group}
    if segs:
      out["segments"] = segs
  else:
    segs = pure.get("segments", {})
    blocks = {}
    for j, (i, g, r) in enumerate(layout):
      if j not in segs:
        continue
      if r == 1:
        blocks[i] = segs[j]
        continue
      for b, stacked in segs[j]["blocks"].items():
        for t in range(r):
          blocks[i + t * g + b] = jax.tree.map(lambda a, t=t: a[t], stacked)
    if blocks:
      out["blocks"] = dict(sorted(blocks.items()))
  return out
