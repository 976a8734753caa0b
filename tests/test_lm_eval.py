"""The lm-evaluation-harness adapter against moejax's own forward pass and generator."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import chex
import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from cli_env import cli_env
from lm_utils import tiny_config
from moejax import config as config_lib
from moejax.data.tokenizers import ByteTokenizer
from moejax.evaluation.lm_eval import MoejaxLM
from moejax.generation import prepare
from moejax.training import checkpoint as ckpt_lib
from moejax.training import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "tests", "fixtures", "lm_eval")
SEQ_LEN = 64
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  """A tiny byte-level MoE model whose eval capacity would drop tokens (the adapter must
  not): its export dir and the model itself, prepared as the adapter runs it."""
  c = tiny_config(vocab_size=TOK.vocab_size, sparse_ffn="moe", sparse_layers="all")
  c.moe.update(top_k=1, dispatch="einsum", capacity_factor_eval=0.5)
  c.data.seq_len = SEQ_LEN
  config_lib.validate(c)
  ms = state_lib.create_model_state(c)
  path = ckpt_lib.export(str(tmp_path_factory.mktemp("lm_eval") / "export"), ms.state, c, step=3)
  return path, prepare(nnx.merge(ms.graphdef, ms.state))


@pytest.fixture(scope="module")
def lm(export):
  return MoejaxLM(export[0], batch_size=8)


@pytest.fixture(scope="module")
def forward(export):
  """ids -> ``[len(ids) - 1, vocab]`` log-probabilities of each next token, from the model's
  logits on one row (right-padded to SEQ_LEN, which causal attention never sees, and with the
  padding masked: one compilation for every length)."""
  model = export[1]
  logits_fn = jax.jit(lambda tokens, mask: model(tokens, mask=mask)[0])

  def logp(ids: list[int]) -> np.ndarray:
    n = len(ids) - 1
    tokens = np.zeros((1, SEQ_LEN), np.int32)
    tokens[0, :n] = ids[:-1]
    logits = logits_fn(tokens, jnp.asarray(np.arange(SEQ_LEN) < n)[None])[0, :n]
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))

  return logp


def test_padding_is_invisible_to_the_forward(export, forward):
  ids = _ids("The quick brown fox jumps")
  unpadded = jax.jit(lambda t: export[1](t)[0])(jnp.asarray([ids[:-1]], jnp.int32))[0]
  chex.assert_trees_all_close(forward(ids), np.asarray(jax.nn.log_softmax(unpadded, -1)),
                              rtol=1e-5, atol=1e-5)


def _direct(logp_fn, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
  """(log p(cont | ctx), cont is greedy) from the model's logits, truncated as the harness
  does: the last SEQ_LEN + 1 tokens."""
  ids = ((ctx or [TOK.eos_id]) + cont)[-(SEQ_LEN + 1):]
  logp = logp_fn(ids)[-len(cont):]
  targets = np.asarray(ids[-len(cont):])
  return (float(logp[np.arange(len(cont)), targets].sum()),
          bool((logp.argmax(-1) == targets).all()))


def _ids(text: str) -> list[int]:
  return [int(t) for t in TOK.encode(text)]


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


PAIRS = [("The quick brown fox", " jumps"), ("", "hello"), ("Two plus two equals", " four"),
         ("a" * 100 + " and then", " more text"),     # longer than seq_len: left-truncated
         ("x", "y")]


def test_loglikelihood_equals_log_softmax_of_the_forward(lm, forward):
  got = lm.loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
  for (ctx, cont), (logp, greedy) in zip(PAIRS, got):
    want, want_greedy = _direct(forward, _ids(ctx), _ids(cont))
    chex.assert_trees_all_close(logp, want, rtol=1e-5, atol=1e-5)
    assert greedy == want_greedy
  # The model's own argmax continuation is greedy; the same with its last byte changed is not.
  ctx = _ids("Once upon a")
  for _ in range(3):
    ctx.append(int(forward(ctx + [2])[-1].argmax()))
  best = ctx[-3:]
  other = best[:2] + [2 + (best[2] - 1) % 256]
  (_, g1), (_, g2) = lm._loglikelihood_tokens([(None, ctx[:-3], best), (None, ctx[:-3], other)],
                                              disable_tqdm=True)
  assert g1 and not g2


def test_loglikelihood_the_same_on_another_mesh(lm, export):
  other = MoejaxLM(export[0], batch_size=2, mesh_data=4, mesh_model=2)
  assert other.batch_size == 4                       # rounded up to the 4 data shards
  reqs = _requests("loglikelihood", PAIRS[3:4] * 3)  # one batch shape: one compilation
  chex.assert_trees_all_close([r[0] for r in other.loglikelihood(reqs, disable_tqdm=True)],
                              [r[0] for r in lm.loglikelihood(reqs, disable_tqdm=True)],
                              rtol=1e-5, atol=1e-5)


def test_rolling_is_the_sum_over_the_whole_text(lm, forward):
  short = "a document shorter than one window"
  long = " ".join(f"word{i}" for i in range(30))                 # 179 bytes: 3 windows
  got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(short,), (long,)]),
                                 disable_tqdm=True)
  ids = _ids(short)
  want_short = forward([TOK.eos_id] + ids)[np.arange(len(ids)), ids].sum()
  # Windows of SEQ_LEN predicted tokens, each conditioned on as much of the text before it
  # as fits in SEQ_LEN (the first on EOS alone).
  ids, want_long = _ids(long), 0.0
  padded = [TOK.eos_id] + ids
  for start in range(0, len(ids), SEQ_LEN):
    end = min(start + SEQ_LEN, len(ids))
    window = padded[max(0, end - SEQ_LEN):end + 1]
    chunk = ids[start:end]
    want_long += forward(window)[-len(chunk):][np.arange(len(chunk)), chunk].sum()
  chex.assert_trees_all_close(got, [want_short, want_long], rtol=1e-5, atol=1e-4)


def test_generate_until_is_greedy_and_stops_at_a_stop_string(lm, forward):
  prompt, ids = "The quick brown", _ids("The quick brown")
  for _ in range(12):                                            # greedy, from the forward
    ids.append(int(forward(ids + [2])[-1].argmax()))
  new = ids[-12:]
  full = TOK.decode([t for t in new if t != TOK.eos_id])
  assert len(full) >= 4, full
  stop = full[2:4]
  got = lm.generate_until(_requests("generate_until", [
      (prompt, {"until": [], "max_gen_toks": 12}),
      (prompt, {"until": ["\u2603", stop], "max_gen_toks": 12}),
      (prompt, {"until": stop, "max_gen_toks": 12, "do_sample": False}),
  ]), disable_tqdm=True)
  assert got[0] == full
  assert got[1] == got[2] == full[:full.find(stop)]
  assert len(got[1]) <= 2


def _greedy(forward, ids: list[int], n: int) -> list[int]:
  """Up to ``n`` argmax tokens after ``ids``, ending at EOS (included), from the forward."""
  new = []
  while len(new) < n and (not new or new[-1] != TOK.eos_id):
    new.append(int(forward(ids + new + [2])[-1].argmax()))
  return new


def test_local_tasks_equal_what_the_forward_gives(lm, forward, monkeypatch):
  """moejax_local: a multiple-choice, a rolling log-likelihood and a generation task over
  tests/fixtures/lm_eval/mc4.jsonl, run by the harness itself."""
  monkeypatch.chdir(ROOT)                # the tasks' data path is relative to the repository
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  out = lm_eval.simple_evaluate(model=lm, tasks=["moejax_local"],
                                task_manager=TaskManager(include_path=TASKS, include_defaults=False),
                                log_samples=True)
  with open(os.path.join(TASKS, "mc4.jsonl")) as f:
    docs = [json.loads(line) for line in f]
  samples = {task: sorted(s, key=lambda s: s["doc_id"]) for task, s in out["samples"].items()}

  # multiple choice: accuracy from the continuations' log-likelihoods
  lls = [[_direct(forward, _ids(d["question"]), _ids(" " + c))[0] for c in d["choices"]]
         for d in docs]
  want = np.mean([int(np.argmax(l)) == d["answer"] for l, d in zip(lls, docs)])
  assert out["results"]["moejax_mc4"]["acc,none"] == pytest.approx(want, abs=1e-9)
  got = [[r[0] for r in s["filtered_resps"]] for s in samples["moejax_mc4"]]
  chex.assert_trees_all_close(got, lls, rtol=1e-5, atol=1e-5)

  # rolling: each document (shorter than one window) after EOS, every token scored
  texts = [f"{d['question']} {d['choices'][d['answer']]}." for d in docs]
  want = [forward([TOK.eos_id] + _ids(t))[np.arange(len(t)), _ids(t)].sum() for t in texts]
  got = [float(np.ravel(s["filtered_resps"])[0]) for s in samples["moejax_text4"]]
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-4)

  # generation: greedy, 8 new tokens at most, cut at the task's stop strings
  got = [s["filtered_resps"][0] for s in samples["moejax_gen4"]]
  for d, text in zip(docs, got):
    new = _greedy(forward, _ids(d["question"]), 8)
    want = TOK.decode([t for t in new if t != TOK.eos_id])
    for stop in ("\n", "."):
      want = want.split(stop)[0]
    assert text == want, (d["question"], text, want)


def test_registered_and_bad_model_args_name_the_argument(export):
  assert get_model("moejax") is MoejaxLM
  with pytest.raises(ValueError, match="model_args checkpont="):
    MoejaxLM.create_from_arg_string(f"checkpont={export[0]}")
  with pytest.raises(ValueError, match="model_args checkpoint: missing"):
    MoejaxLM.create_from_arg_string("batch_size=8")
  # --model_args win over the command's --batch_size (which it always passes)
  with pytest.raises(ValueError, match="model_args batch_size='auto'"):
    MoejaxLM.create_from_arg_string(f"checkpoint={export[0]},batch_size=auto", {"batch_size": 1})


def test_command_bad_model_arg_is_one_line_exit_2(tmp_path):
  out = tmp_path / "results"
  proc = subprocess.run(
      [sys.executable, "-m", "moejax.evaluation.lm_eval", "--model", "moejax", "--model_args",
       f"checkpoint={tmp_path / 'nothing'},batch_size=8", "--tasks", "moejax_mc4",
       "--include_path", TASKS, "--output_path", str(out)],
      cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      f"error: model_args checkpoint={tmp_path / 'nothing'}: does not exist (pass a training "
      "workdir or its export/ dir)"]
  assert not out.exists()
