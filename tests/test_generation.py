"""KV-cache decoding: equals the full forward for every FFN kind; left-padded batches decode
as their rows alone; sampling; one trace per shape."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_utils import tiny_config
from moejax import config as config_lib
from moejax.generation import (Generator, end_ids, full_forward_logits, generate, left_pad,
                               prepare, sample_logits, stop_at_strings)
from moejax.model import Transformer

KINDS = {
    "dense": dict(),
    "switch_capacity": dict(sparse_ffn="moe", moe=dict(top_k=1, dispatch="einsum",
                                                       capacity_factor_eval=0.5)),
    "top2_dropless": dict(sparse_ffn="moe", moe=dict(top_k=2, dispatch="dropless")),
    "gshard_noncausal": dict(sparse_ffn="moe", moe=dict(
        top_k=2, dispatch="einsum", second_policy_eval="random", capacity_factor_eval=0.5,
        allow_noncausal=True)),
    "expert_choice": dict(sparse_ffn="moe", moe=dict(router="expert_choice", dispatch="einsum",
                                                     allow_noncausal=True)),
    "hash": dict(sparse_ffn="moe", moe=dict(router="hash", top_k=2)),
    "peer": dict(sparse_ffn="peer", peer=dict(num_experts_sqrt=8, heads=2, top_k=3, d_key=8)),
    "pkm": dict(sparse_ffn="pkm", pkm=dict(num_keys_sqrt=8, heads=2, top_k=3, d_key=8)),
}


def _config(kind, **model):
  spec = dict(KINDS[kind])
  sparse = spec.pop("sparse_ffn", "dense")
  c = tiny_config(sparse_ffn=sparse, sparse_layers="all" if sparse != "dense" else "none",
                  **model)
  for section, fields in spec.items():
    c[section].update(fields)
  config_lib.validate(c)
  return c


def _model(kind, **model):
  c = _config(kind, **model)
  m = Transformer(c, rngs=nnx.Rngs(params=0, router=1))
  # non-trivial running statistics for query BatchNorm (PEER / PKM): one train-mode pass
  m.train()
  m(jax.random.randint(jax.random.key(7), (4, 16), 0, 32))
  m.eval()
  return m


PROMPT = [3, 7, 11, 2, 9]


@pytest.mark.parametrize("kind", list(KINDS))
def test_greedy_with_cache_is_argmax_of_full_forward(kind):
  model = _model(kind)
  gen = Generator(model)
  new = gen.generate([PROMPT], max_new_tokens=10, temperature=0.0)[0]
  assert len(new) == 10
  seq = np.array(PROMPT + list(new), np.int32)
  logits = full_forward_logits(prepare(model), jnp.asarray(seq)[None])[0]
  n = len(PROMPT)
  np.testing.assert_array_equal(np.argmax(logits[n - 1:-1], -1), new)


@pytest.mark.parametrize("kind", ["dense", "top2_dropless", "expert_choice", "peer", "pkm"])
@pytest.mark.parametrize("scan", [False, True])
def test_decode_logits_equal_full_forward(kind, scan):
  """Prefill a chunk, then one token at a time: every position's logits = full forward."""
  model = prepare(_model(kind, num_layers=3, scan_layers=scan))
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 32)
  full = full_forward_logits(model, tokens)
  cache = model.init_cache(2, 16)
  decode = nnx.jit(lambda model, x, cache, pos: model.decode(x, cache, pos))   # as generate runs it
  got = []
  lg, cache = decode(model, tokens[:, :5], cache, jnp.int32(0))
  got.append(lg)
  for t in range(5, 12):
    lg, cache = decode(model, tokens[:, t:t + 1], cache, jnp.int32(t))
    got.append(lg)
  np.testing.assert_allclose(jnp.concatenate(got, 1), full, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("kind", ["dense", "top2_dropless", "peer", "pkm"])
def test_left_padded_prefill_and_decode_equal_full_forward_of_each_row(kind):
  """Rows of different lengths, left-padded, one prefill then one token at a time: at every
  real position the logits are the full forward's of that row alone."""
  model = prepare(_model(kind))
  rows = [[3, 7, 11], [9, 3, 4, 8, 10, 2, 14, 1, 5, 6, 12]]
  tokens, padding = left_pad(rows)                       # [2, 16]: 13 and 5 pads
  width, extra = tokens.shape[1], 4
  follow = np.array([[4, 5, 6, 7], [8, 9, 10, 11]], np.int32)
  kv_valid = jnp.arange(width + extra)[None, :] >= jnp.asarray(padding)[:, None]
  cache = model.init_cache(2, width + extra)
  positions = jnp.maximum(jnp.arange(width)[None, :] - padding[:, None], 0)
  decode = nnx.jit(lambda model, x, cache, pos, positions, kv_valid: model.decode(
      x, cache, pos, positions=positions, kv_valid=kv_valid))       # as generate runs it
  lg, cache = decode(model, jnp.asarray(tokens), cache, jnp.int32(0), positions, kv_valid)
  got = [lg]
  for t in range(extra):
    slot = width + t
    lg, cache = decode(model, jnp.asarray(follow[:, t:t + 1]), cache, jnp.int32(slot),
                       jnp.asarray(slot - padding)[:, None], kv_valid)
    got.append(lg)
  got = jnp.concatenate(got, 1)
  for i, row in enumerate(rows):
    full = full_forward_logits(model, jnp.asarray(row + follow[i].tolist())[None])[0]
    chex.assert_trees_all_close(got[i, padding[i]:], full, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("kind", ["dense", "top2_dropless", "peer"])
def test_batch_rows_of_different_lengths_equal_rows_alone(kind):
  gen = Generator(_model(kind))
  prompts = [[5, 6, 7], [9, 3, 4, 8, 10, 2, 14, 1, 5, 6, 12], [4]]
  both = gen.generate(prompts, max_new_tokens=6, temperature=0.0)
  for p, row in zip(prompts, both):
    np.testing.assert_array_equal(row, gen.generate([p], max_new_tokens=6, temperature=0.0)[0])
  # eos: each row stops at its own first eos, the others go on
  eos = int(both[0][2])
  cut = gen.generate(prompts, max_new_tokens=6, temperature=0.0, eos_id=eos)
  for row, new in zip(both, cut):
    hit = np.flatnonzero(row == eos)
    np.testing.assert_array_equal(new, row[:hit[0] + 1] if len(hit) else row)
  assert len(cut[0]) <= 3 < len(both[0])
  # the public function, two prompts per batch: the same rows
  assert generate(gen, prompts, 6, batch_size=2) == [r.tolist() for r in both]


def test_compiled_once_per_batch_and_length():
  gen = Generator(_model("dense"))
  gen.generate([[1, 2, 3]], 8, temperature=0.0)
  gen.generate([[4, 5, 6]], 8, temperature=0.7, top_k=5, top_p=0.9, seed=3)
  gen.generate([[4, 5, 6, 7, 8]], 8)          # same prompt bucket (8), same new tokens
  assert gen.traces == 1
  gen.generate([[4, 5]], 9)
  assert gen.traces == 2
  gen.generate([list(range(1, 10))], 9)       # 9 tokens: bucket 16
  assert gen.traces == 3


def test_sampling_reproducible_and_cut_by_top_k_top_p():
  gen = Generator(_model("pkm"))
  kw = dict(max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0)
  a = gen.generate([PROMPT, [4, 4]], seed=11, **kw)
  b = gen.generate([PROMPT, [4, 4]], seed=11, **kw)
  c = gen.generate([PROMPT, [4, 4]], seed=12, **kw)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(a, c))
  greedy = gen.generate([PROMPT], 16, temperature=0.0)[0]
  np.testing.assert_array_equal(gen.generate([PROMPT], 16, temperature=1.0, top_k=1, seed=5)[0],
                                greedy)
  np.testing.assert_array_equal(gen.generate([PROMPT], 16, temperature=1.0, top_p=1e-6,
                                             seed=5)[0], greedy)


def test_sample_logits_cuts():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.key(0)
  s = sample_logits(logits, keys, 1.0, 2, 1.0)
  assert set(np.unique(s)) == {0, 1}
  np.testing.assert_allclose(np.mean(s == 0), 0.5 / 0.8, atol=0.03)
  s = sample_logits(logits, keys, 1.0, 0, 0.7)     # 0.5 < 0.7 <= 0.8: keep {0, 1}
  assert set(np.unique(s)) == {0, 1}
  s = sample_logits(logits, keys, 1.0, 0, 1.0)
  assert set(np.unique(s)) == {0, 1, 2, 3}
  np.testing.assert_array_equal(sample_logits(logits, keys, 0.0, 0, 1.0), 0)


def test_eos_stops_a_row():
  model = _model("dense")
  gen = Generator(model)
  free = gen.generate([PROMPT], 12, temperature=0.0)[0]
  eos = int(free[3])
  first = int(np.flatnonzero(free == eos)[0])
  cut = gen.generate([PROMPT], 12, temperature=0.0, eos_id=eos)[0]
  np.testing.assert_array_equal(cut, free[:first + 1])


def test_any_of_several_end_ids_stops_a_row():
  """eos_id may name several ids (a model's own and its tokenizer's): a row ends at the
  first of any; end_ids joins them without repeats."""
  assert end_ids(2, (7, 2, 9)) == (2, 7, 9) and end_ids(2, ()) == (2,)
  gen = Generator(_model("dense"))
  free = gen.generate([PROMPT], 12, temperature=0.0)[0]
  a, b = int(free[5]), int(free[2])
  first = min(int(np.flatnonzero(free == t)[0]) for t in (a, b))
  cut = gen.generate([PROMPT], 12, temperature=0.0, eos_id=(a, b))[0]
  np.testing.assert_array_equal(cut, free[:first + 1])
  assert first <= 2


def test_stop_ends_rows_early_at_their_first_stop_sequence():
  """``stop`` (here: stop strings over a token -> letter decoding) ends each row at the
  token that completes its stop sequence, the others run on; the decode loop stops once
  every row has ended (fewer steps than max_new_tokens); sequences that span chunks count."""
  model = _model("dense")
  gen = Generator(model)
  prompts = [PROMPT, [5, 1], [8, 8, 2, 4]]
  free = gen.generate(prompts, 24, temperature=0.0)
  decode = lambda ids: "".join(chr(97 + t % 26) for t in ids)
  # row 0: the text of its new tokens 5..7 (spans the chunks of 4); row 1: none; row 2: 2..3
  strings = [[decode(free[0][5:8])], [], ["@", decode(free[2][2:4])]]
  want_len = []
  for row, ss in zip(free, strings):
    hits = [n for n in range(1, len(row) + 1) if any(s in decode(row[:n]) for s in ss)]
    want_len.append(hits[0] if hits else len(row))
  assert want_len[0] <= 8 and want_len[1] == 24 and want_len[2] <= 4
  rows = gen.generate(prompts, 24, temperature=0.0, check_every=4,
                      stop=stop_at_strings(strings, decode))
  for row, row_free, n in zip(rows, free, want_len):
    np.testing.assert_array_equal(row, row_free[:n])
  # batches of 2: the stop sees each prompt's own index
  rows = gen.generate(prompts, 24, temperature=0.0, check_every=4, batch_size=2,
                      stop=stop_at_strings(strings, decode))
  assert [len(r) for r in rows] == want_len

  # every row stopped: the loop ends early, after the chunk in which the last one stopped
  asked = []
  def stop(i, new):
    asked.append(len(new))
    return len(new) >= 3
  rows = gen.generate(prompts, 24, temperature=0.0, check_every=2, stop=stop)
  assert [len(r) for r in rows] == [3, 3, 3]
  assert max(asked) == 3   # chunks end at 3 and 5 tokens: the rows end after the first


def test_generate_cli_decodes_a_prompts_file_in_batches(tmp_path):
  """generate.py --prompts_file, 3 prompts in batches of 2, greedy: each prompt followed by
  the tokens the Generator gives that prompt alone."""
  from moejax.data.tokenizers import ByteTokenizer
  from moejax.training import checkpoint as ckpt_lib
  tok = ByteTokenizer()
  c = tiny_config(vocab_size=ByteTokenizer.vocab_size)
  config_lib.validate(c)
  model = Transformer(c, rngs=nnx.Rngs(params=0))
  texts = ["def ", "hello world", "x"]
  gen = Generator(model)
  free = [gen.generate([list(tok.encode(t))], 5, temperature=0.0, eos_id=tok.eos_id)[0]
          for t in texts]
  # the model's own end id (as kept from a HF checkpoint) ends prompt 1's row at its 3rd
  # token; a --stop string (prompt 0's 2nd-3rd new bytes) cuts prompt 0's text
  c.special_tokens.eos_token_id = (int(free[1][2]),)
  stop = tok.decode([int(t) for t in free[0][1:3]])
  assert stop and "\\n" not in stop
  ckpt_lib.export(str(tmp_path / "export"), nnx.state(model), c)
  (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, os.path.join(root, "generate.py"), f"--checkpoint={tmp_path}/export",
       f"--prompts_file={tmp_path}/prompts.txt", "--batch_size=2", "--temperature=0",
       "--max_new_tokens=5", f"--stop={stop}"], cwd=root, capture_output=True, text=True,
      timeout=600, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  ends = (tok.eos_id, int(free[1][2]))
  want = ""
  for i, (text, row) in enumerate(zip(texts, free)):
    hit = [n for n, t in enumerate(row) if t in ends]
    row = row[:hit[0]] if hit else row
    out = tok.decode([int(t) for t in row])
    want += f"=== {i}\n" + text + (out[:out.find(stop)] if stop in out else out) + "\n"
  assert proc.stdout == want
  plain = "".join(f"=== {i}\n{t}{tok.decode([int(x) for x in r])}\n"
                  for i, (t, r) in enumerate(zip(texts, free)))
  assert want != plain      # the end id and the stop string both cut something
