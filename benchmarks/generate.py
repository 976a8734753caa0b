"""Prefill and decode tokens/s of moejax next to transformers' ``generate``, same model.

    nice -n 5 python benchmarks/generate.py [--prompt_len 128] [--new 64] [--batches 1,8]

Builds a Mixtral-shaped model with random weights (transformers' ``MixtralConfig``: d_model
512, 4 blocks, 8 experts, top-2, GQA 8/2 heads, vocab 32000), saves it as a Hugging Face
checkpoint, imports it with ``moejax.interop.hf`` and, at each batch size, alternately
times (``--repeats`` rounds, medians):

* prefill: moejax's prefill call, transformers' forward with ``use_cache`` and
  ``logits_to_keep=1`` (what ``generate`` runs first); tokens/s = batch x prompt_len / time;
* decode: a whole greedy generation of ``--new`` tokens (``min_new_tokens`` = ``--new``, no
  eos) minus the median prefill time; tokens/s = batch x (new - 1) / that time (the first
  new token comes from the prefill).

Also prints the memory-bandwidth roofline of a float32 decode step (:func:`_roofline`): the
bytes of weights a step must read at each batch size (the experts its tokens choose, every
other weight once, one embedding row per token) over the fastest streaming read rate
measured here (:func:`_stream_gbs`), about the fastest decode any float32 implementation
could reach, as a ratio to transformers'. (Part of the weights may stay in a large cache
between steps, so a decoder can come out a little above it.)

Torch runs on ``--threads`` threads (XLA's CPU client uses every core: 2 on the machines
this was written for). Compilation is excluded (one warm-up call each). Also prints the
fraction of greedy tokens on which both agree (random weights leave near ties, so a
difference after a near tie is not an error) and the ratios moejax / transformers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moejax import platform_env  # noqa: E402

platform_env.skip_absent_tpu()   # before JAX is imported: no libtpu start-up lines without a TPU


def _hf_model(path: str, seed: int):
  import torch
  from transformers import MixtralConfig, MixtralForCausalLM
  torch.manual_seed(seed)
  cfg = MixtralConfig(vocab_size=32000, hidden_size=512, intermediate_size=1792,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False)
  model = MixtralForCausalLM(cfg).eval()
  model.save_pretrained(path)
  return model


def _weight_bytes(state) -> tuple[int, int, int]:
  """(bytes of one expert summed over the blocks, bytes of every other weight a decode step
  reads whole, bytes of one embedding row) of a moejax model state."""
  import jax
  expert = other = row = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    key = jax.tree_util.keystr(path)
    nbytes = leaf.size * leaf.dtype.itemsize
    if "['experts']" in key:
      expert += nbytes // leaf.shape[0]
    elif key.startswith("['embed']"):
      row = nbytes // leaf.shape[0]
    else:
      other += nbytes
  return expert, other, row


def _stream_gbs(nbytes: int, repeats: int) -> tuple[float, str]:
  """(median GB/s, how) of the fastest streaming read of ``nbytes`` found here: a jitted
  float32 sum, and on CPU the native one-row matmul over the same bytes (several rows in
  flight per thread; XLA's sum keeps fewer reads in flight and reads slower)."""
  import jax
  import jax.numpy as jnp
  from moejax.backends.cpu import native
  rows = 4096
  a = jnp.ones((rows, nbytes // 4 // rows), jnp.float32)
  ways = {"jitted float32 sum": (jax.jit(jnp.sum), (a,))}
  if native.usable("few_row_matmul", a):
    ways["native one-row matmul"] = (jax.jit(native.few_row_matmul),
                                     (jnp.ones((1, rows), jnp.float32), a))
  best = (0.0, "")
  for how, (fn, args) in ways.items():
    fn(*args).block_until_ready()
    times = [_timed(lambda: fn(*args).block_until_ready())[0] for _ in range(max(repeats, 3))]
    best = max(best, (a.size * 4 / statistics.median(times) / 1e9, how))
  return best


def _roofline(b: int, num_experts: int, top_k: int, weights: tuple[int, int, int],
              gbs: float) -> tuple[float, float]:
  """(MB a decode step of ``b`` tokens reads, the tokens/s of reading it at ``gbs``): the
  experts chosen (``b`` = 1: ``top_k`` per block; more: the expected number of distinct
  experts among ``b`` uniform top-k choices per block), every other weight, ``b`` rows."""
  expert, other, row = weights
  used = top_k if b == 1 else num_experts * (1 - ((num_experts - top_k) / num_experts) ** b)
  nbytes = used * expert + other + b * row
  return nbytes / 1e6, b / (nbytes / (gbs * 1e9))


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompt_len", type=int, default=128)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--threads", type=int, default=2)
  args = ap.parse_args()

  import torch
  torch.set_num_threads(args.threads)
  from moejax import backends
  backends.prepare_process()   # before JAX's first computation
  import jax
  from flax import nnx
  from moejax.evaluation import run as eval_run
  from moejax.generation import Generator, left_pad
  from moejax.interop import hf

  tmp = tempfile.mkdtemp(prefix="moejax_generate_bench_")
  hf_model = _hf_model(os.path.join(tmp, "hf"), seed=0)
  hf.import_checkpoint(os.path.join(tmp, "hf"), os.path.join(tmp, "moejax"))
  _, ms, _ = eval_run.load(os.path.join(tmp, "moejax", "export"))
  gen = Generator(nnx.merge(ms.graphdef, ms.state))

  print(f"# {jax.devices()[0].platform} ({os.cpu_count()} cores), torch threads "
        f"{torch.get_num_threads()}; Mixtral-shaped d_model 512, 4 blocks, 8 experts top-2, "
        f"vocab 32000; prompt {args.prompt_len} tokens, {args.new} new tokens, greedy, "
        f"median of {args.repeats}")
  weights = _weight_bytes(ms.state)
  total = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(ms.state))
  gbs, how = _stream_gbs(total, args.repeats)
  print(f"# streaming read of every weight's bytes ({how}, the faster): {gbs:.1f} GB/s")
  print(f"{'batch':>5s} {'':12s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
  rng = np.random.default_rng(0)
  for b in [int(x) for x in args.batches.split(",")]:
    prompts = rng.integers(3, 32000, size=(b, args.prompt_len)).astype(np.int32)
    ids = torch.from_numpy(prompts.astype(np.int64))
    tokens, padding = left_pad(prompts.tolist())

    def mj_prefill():
      jax.block_until_ready(gen.prefill(tokens, padding, args.new))

    def mj_generate():
      return np.stack(gen.generate(prompts.tolist(), args.new, temperature=0.0))

    def hf_prefill():
      with torch.inference_mode():
        hf_model(ids, use_cache=True, logits_to_keep=1)

    def hf_generate():
      with torch.inference_mode():
        out = hf_model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new,
                                do_sample=False, eos_token_id=None, pad_token_id=0,
                                attention_mask=torch.ones_like(ids))
      return out[:, args.prompt_len:].numpy()

    mj_prefill(), mj_generate(), hf_prefill(), hf_generate()   # compile / warm up
    times = {k: [] for k in ("mj_prefill", "mj_generate", "hf_prefill", "hf_generate")}
    last = {}
    for _ in range(args.repeats):
      for name, fn in (("mj_prefill", mj_prefill), ("hf_prefill", hf_prefill),
                       ("mj_generate", mj_generate), ("hf_generate", hf_generate)):
        t, out = _timed(fn)
        times[name].append(t)
        last[name] = out
    med = {k: statistics.median(v) for k, v in times.items()}
    rates = {}
    for who in ("mj", "hf"):
      pre, total = med[f"{who}_prefill"], med[f"{who}_generate"]
      rates[who] = (b * args.prompt_len / pre, b * (args.new - 1) / max(total - pre, 1e-9))
      label = "moejax" if who == "mj" else "transformers"
      print(f"{b:5d} {label:12s} {rates[who][0]:14.0f} {rates[who][1]:13.1f}")
    agree = float(np.mean(last["mj_generate"] == last["hf_generate"]))
    print(f"{b:5d} {'ratio':12s} {rates['mj'][0] / rates['hf'][0]:13.2f}x "
          f"{rates['mj'][1] / rates['hf'][1]:12.2f}x   (greedy tokens agreeing: {agree:.0%})")
    mb, bound = _roofline(b, 8, 2, weights, gbs)
    print(f"{b:5d} {'roofline':12s} {'':14s} {bound:13.1f}   ({mb:.0f} MB read per step: "
          f"at most {bound / rates['hf'][1]:.2f}x transformers' decode)")


if __name__ == "__main__":
  main()
