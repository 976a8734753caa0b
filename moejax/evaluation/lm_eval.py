"""lm-evaluation-harness adapter: a moejax export or training workdir as an ``lm_eval`` model.

    pip install 'moejax[eval]'
    python -m moejax.evaluation.lm_eval --model moejax \\
        --model_args checkpoint=WORKDIR_OR_EXPORT,batch_size=8 --tasks lambada_openai

or from Python::

    import lm_eval
    from moejax.evaluation.lm_eval import MoejaxLM
    lm_eval.simple_evaluate(model=MoejaxLM("WORKDIR/export", batch_size=8), tasks=[...])

Importing this module registers the model under the name ``moejax`` (``simple_evaluate(
model="moejax", model_args="checkpoint=...")`` works after the import). The harness's own
``lm_eval`` command (0.4.x) finds models only inside its source tree, so the command above
(and ``moejax-lm-eval``) is lm_eval's command line run after that import: every flag of
``lm_eval`` is accepted.

Model arguments: ``checkpoint`` (an export, a workdir or its checkpoints/ -- the newest
checkpoint), ``batch_size`` (rows per forward; rounded up to a multiple of the devices the
batch is split over), ``mesh_data`` / ``mesh_expert`` / ``mesh_model`` (the mesh, as
``eval.py`` builds it: all devices on the data axis by default), ``max_gen_toks`` (for
generation requests that do not set it). A bad one is a :class:`ModelArgsError` naming it;
the command prints it as one ``error:`` line and exits 2 before the harness starts.

What each request type computes:

* ``loglikelihood``: the context and continuation are tokenized together and left-truncated
  to the model's ``data.seq_len`` + 1 tokens; the result is the sum of the continuation
  tokens' log-probabilities and whether each was the argmax. Requests are sorted by length
  and batched; a batch is padded to ``[batch_size, L]`` with ``L`` the next power of two
  (at most ``seq_len``), so few shapes are compiled.
* ``loglikelihood_rolling``: the whole document's log-likelihood, scored in windows of
  ``seq_len`` tokens (lm_eval's rolling windows, made disjoint): every token once, the
  first window after EOS, each later one after as much of the text before it as fits.
* ``generate_until``: greedy decoding (sampling when the task sets ``do_sample``) with
  :class:`moejax.generation.Generator`, up to ``max_gen_toks`` new tokens (the prompt is
  left-truncated so that both fit ``seq_len``); a row stops decoding at its first stop
  string (checked between chunks of steps), and its text is cut there.

The model runs as in :mod:`moejax.generation`: eval mode, MoE layers without dropping, so a
request's score does not depend on the other requests of its batch.
"""

from __future__ import annotations

import re

from moejax import platform_env

# Run as a command, this is before JAX is imported (no libtpu start-up without a TPU);
# imported into a program that already imported JAX, it changes nothing.
platform_env.skip_absent_tpu()

try:
  import lm_eval.models  # noqa: F401  (the harness's own models stay registered)
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:
  raise ImportError("moejax.evaluation.lm_eval needs lm-evaluation-harness: "
                    "pip install 'moejax[eval]'") from e

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from moejax import data, sharding
from moejax.errors import CheckpointError
from moejax.evaluation import run
from moejax.evaluation.locate import locate
from moejax.generation import Generator, cut_at_stop, end_ids, prepare, stop_at_strings

_MIN_BUCKET = 16
DEFAULT_MAX_GEN_TOKS = 256    # new tokens of a generate_until request that does not say


def _bucket(n: int, cap: int) -> int:
  """The padded length of a batch whose longest row has ``n`` tokens."""
  return min(max(_MIN_BUCKET, 1 << (n - 1).bit_length()), cap)


class ModelArgsError(ValueError):
  """A model argument the adapter cannot use; the message names it and says the fix."""


_MODEL_ARGS = ("checkpoint", "batch_size", "mesh_data", "mesh_expert", "mesh_model",
               "max_gen_toks")
# What the harness passes to every model; nothing here uses it.
_HARNESS_ARGS = ("device", "max_batch_size")


def _integer(args: dict, name: str, example: str, *, all_devices: bool = False) -> int:
  """``args[name]`` as an integer >= 1 (or -1 where ``all_devices``), else ModelArgsError."""
  value = args[name]
  text = str(value).strip()
  if isinstance(value, bool) or not re.fullmatch(r"-?\d+", text) or not (
      int(text) >= 1 or all_devices and int(text) == -1):
    rule = "an integer >= 1 or -1 (all devices)" if all_devices else "an integer >= 1"
    raise ModelArgsError(f"model_args {name}={value!r}: must be {rule} (e.g. {name}={example})")
  return int(text)


def check_model_args(args: dict) -> dict:
  """The model arguments, checked (no JAX work: a bad one is known before the model loads).

  Raises :class:`ModelArgsError` naming an unknown argument, a missing or unreadable
  ``checkpoint`` or a bad number. Returns them with the numbers as ints.
  """
  unknown = sorted(k for k, v in args.items()
                   if k not in _MODEL_ARGS + _HARNESS_ARGS and v is not None)
  if unknown:
    raise ModelArgsError(f"model_args {unknown[0]}={args[unknown[0]]!r}: unknown (known: "
                         f"{', '.join(_MODEL_ARGS)})")
  out = {"batch_size": 8, "mesh_data": -1, "mesh_expert": 1, "mesh_model": 1,
         "max_gen_toks": DEFAULT_MAX_GEN_TOKS}
  out.update({k: v for k, v in args.items() if k in _MODEL_ARGS and v is not None})
  if not out.get("checkpoint"):
    raise ModelArgsError("model_args checkpoint: missing (checkpoint=WORKDIR or WORKDIR/export)")
  try:
    locate(str(out["checkpoint"]))
  except CheckpointError as e:
    raise ModelArgsError(str(e).replace("--checkpoint=", "model_args checkpoint=", 1)) from None
  out["batch_size"] = _integer(out, "batch_size", "8; 'auto' is not supported")
  out["max_gen_toks"] = _integer(out, "max_gen_toks", "256")
  out["mesh_data"] = _integer(out, "mesh_data", "-1", all_devices=True)
  for name in ("mesh_expert", "mesh_model"):
    out[name] = _integer(out, name, "1")
  return out


@register_model("moejax")
class MoejaxLM(TemplateLM):
  """A moejax model for lm-evaluation-harness (see the module doc)."""

  def __init__(self, checkpoint: str | None = None, batch_size: int | str = 8, mesh_data: int = -1,
               mesh_expert: int = 1, mesh_model: int = 1, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
               **harness_args):
    super().__init__()
    args = check_model_args(dict(harness_args, checkpoint=checkpoint, batch_size=batch_size,
                                 mesh_data=mesh_data, mesh_expert=mesh_expert,
                                 mesh_model=mesh_model, max_gen_toks=max_gen_toks))
    checkpoint, rows = args["checkpoint"], args["batch_size"]
    mesh_data, mesh_expert, mesh_model = args["mesh_data"], args["mesh_expert"], args["mesh_model"]
    self.config, ms, self.step = run.load(
        checkpoint, {"data": mesh_data, "expert": mesh_expert, "model": mesh_model})
    self.checkpoint = checkpoint
    self.tokenizer = data.load_tokenizer(self.config.data.tokenizer)
    self._mesh, self._rules = ms.mesh, ms.rules
    model = nnx.merge(ms.graphdef, ms.state)
    self._graphdef, self._state = nnx.split(prepare(model))
    self._generator = Generator(model, mesh=ms.mesh, rules=ms.rules)
    # Rows split over (data, expert): a batch is a multiple of that many rows.
    shards = ms.mesh.shape["data"] * ms.mesh.shape["expert"]
    self._batch_size = -(-rows // shards) * shards
    self._max_gen_toks = args["max_gen_toks"]
    self._row_sharding = sharding.batch_sharding(ms.mesh)
    self._score = jax.jit(self._score_rows, out_shardings=sharding.replicated(ms.mesh))

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    """As the harness's, but ``--model_args`` win over the command's defaults (the
    command always passes ``batch_size``, 1 unless given)."""
    from lm_eval.utils import simple_parse_args_string
    return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
    merged = {k: v for k, v in (additional_config or {}).items() if v is not None}
    merged.update(arg_dict)
    return cls(**merged)

  # ------------------------------------------------------------ what the harness asks

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def max_length(self) -> int:
    return int(self.config.data.seq_len)

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def device(self) -> str:
    return jax.default_backend()

  @property
  def tokenizer_name(self) -> str:
    return str(self.config.data.tokenizer)

  def get_model_info(self) -> dict:
    return {"checkpoint": self.checkpoint, "step": self.step}

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    return [int(t) for t in self.tokenizer.encode(string)]

  def tok_decode(self, tokens) -> str:
    return self.tokenizer.decode(tokens)

  # ------------------------------------------------------------ scoring

  def _score_rows(self, state, tokens, targets, mask, weights):
    """Per row: (sum of ``weights`` * log p(target), all weighted targets the argmax).

    tokens, targets ``[batch, length]`` int32; mask, weights ``[batch, length]`` (real
    tokens; continuation tokens to score).
    """
    model = nnx.merge(self._graphdef, state)
    with jax.sharding.use_abstract_mesh(self._mesh.abstract_mesh), \
        nnx.logical_axis_rules(self._rules):
      logits, _ = model(tokens, mask=mask)
    # log p(target) = logit(target) - logsumexp(logits): no second [batch, length, vocab] array
    token_logp = (jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
                  - jax.nn.logsumexp(logits, axis=-1))
    greedy = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
    return jnp.sum(token_logp * weights, axis=-1), jnp.all(greedy, axis=-1)

  def _global(self, array: np.ndarray) -> jax.Array:
    """A host array (the same on every process) as a global array with rows over the mesh."""
    return jax.make_array_from_callback(array.shape, self._row_sharding, lambda i: array[i])

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, cache: bool = True
                            ) -> list[tuple[float, bool]]:
    """``requests``: (key, context ids, continuation ids) -> (log-likelihood, is greedy)."""
    seq_len, rows = self.max_length, []
    for key, ctx, cont in requests:
      if len(cont) > seq_len:
        raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's "
                         f"data.seq_len={seq_len} (request {key!r:.80})")
      whole = (list(ctx) or [self.eot_token_id]) + list(cont)
      whole = whole[-(seq_len + 1):]
      rows.append((whole[:-1], whole[1:], len(cont)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    b = self._batch_size
    for start in tqdm(range(0, len(order), b), disable=disable_tqdm, desc="moejax loglikelihood"):
      chunk = order[start:start + b]
      length = _bucket(len(rows[chunk[0]][0]), seq_len)
      tokens = np.full((b, length), self.tokenizer.pad_id, np.int32)
      targets = np.zeros((b, length), np.int32)
      mask = np.zeros((b, length), bool)
      weights = np.zeros((b, length), np.float32)
      for r, i in enumerate(chunk):
        inp, tgt, n_cont = rows[i]
        n = len(inp)
        tokens[r, :n], targets[r, :n], mask[r, :n] = inp, tgt, True
        weights[r, n - n_cont:n] = 1.0
      sums, greedy = self._score(self._state, *map(self._global, (tokens, targets, mask, weights)))
      sums, greedy = np.asarray(sums.addressable_data(0)), np.asarray(greedy.addressable_data(0))
      for r, i in enumerate(chunk):
        results[i] = (float(sums[r]), bool(greedy[r]))
        if cache and requests[i][0] is not None:
          self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, req in enumerate(requests):
      (text,) = req.args
      for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
          self.tok_encode(text), prefix_token=self.eot_token_id, max_seq_len=self.max_length,
          context_len=1)):
        windows.append((None, ctx, cont))
        owner.append(i)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm, cache=False)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owner, scores):
      totals[i] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # ------------------------------------------------------------ generation

  def _gen_settings(self, gen_kwargs: dict) -> tuple[list[str], int, float, int, float]:
    """-> (stop strings, max new tokens, temperature, top_k, top_p) of a request."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
    sample = bool(kw.pop("do_sample", False))
    temperature = float(kw.pop("temperature", 0.0) or 0.0) if sample else 0.0
    top_k = int(kw.pop("top_k", 0) or 0)
    top_p = float(kw.pop("top_p", 1.0) or 1.0)
    # The last token must still be a position the model was trained on.
    max_new = max(1, min(max_new, self.max_length - 1))
    return [s for s in until if s], max_new, temperature, top_k, top_p

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Per request ``(context, gen_kwargs)``: the generated text up to the first stop string."""
    prompts, settings = [], []
    for req in requests:
      context, gen_kwargs = req.args
      until, max_new, temperature, top_k, top_p = self._gen_settings(gen_kwargs)
      ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.eot_token_id]
      prompts.append(ids)
      settings.append((until, (max_new, temperature, top_k, top_p)))
    # Requests with the same decoding settings run together, longest prompts first.
    order = sorted(range(len(requests)), key=lambda i: (settings[i][1], -len(prompts[i])))
    out: list[str | None] = [None] * len(requests)
    b = self._batch_size
    groups: dict[tuple, list[int]] = {}
    for i in order:
      groups.setdefault(settings[i][1], []).append(i)
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="moejax generate_until")
    # rows also end at the model's own end-of-sequence ids (kept from its HF checkpoint)
    ends = end_ids(self.eot_token_id, self.config.special_tokens.eos_token_id)
    for (max_new, temperature, top_k, top_p), members in groups.items():
      for start in range(0, len(members), b):
        chunk = members[start:start + b]
        batch = [prompts[i] for i in chunk]
        batch += [[self.eot_token_id]] * (b - len(batch))    # one batch shape
        # rows end at their first stop string (checked between chunks of decoding steps)
        until = [settings[i][0] for i in chunk] + [[]] * (b - len(chunk))
        decode = lambda ids: self.tok_decode([t for t in ids if t not in ends])
        rows = self._generator.generate(batch, max_new, temperature=temperature, top_k=top_k,
                                        top_p=top_p, eos_id=ends,
                                        pad_id=self.tokenizer.pad_id,
                                        stop=stop_at_strings(until, decode))
        for i, row in zip(chunk, rows):
          text = decode([int(t) for t in row])
          out[i] = cut_at_stop(text, settings[i][0])
          self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        bar.update(len(chunk))
    bar.close()
    return out


def _check_command(argv: list[str]) -> None:
  """``--model moejax`` with a bad model argument: one ``error:`` line and exit 2, before the
  harness indexes its tasks and before anything is written."""
  import argparse

  from lm_eval.utils import simple_parse_args_string

  from moejax import cli as moejax_cli
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--model")
  parser.add_argument("--model_args", default="")
  known, _ = parser.parse_known_args(argv)
  if known.model != "moejax":
    return
  try:
    check_model_args(simple_parse_args_string(known.model_args))
  except ModelArgsError as e:
    moejax_cli.fail(str(e))


def cli() -> None:
  """``lm_eval``'s command line with the ``moejax`` model registered."""
  import sys

  from lm_eval.__main__ import cli_evaluate

  from moejax import cli as moejax_cli
  from moejax.errors import ConfigError, DataError
  _check_command(sys.argv[1:])
  try:
    cli_evaluate()
  except (ModelArgsError, ConfigError, DataError, CheckpointError) as e:
    # e.g. a mesh the devices cannot hold, a tokenizer file gone: still one line. hard: a
    # failed checkpoint read leaves threads that would print on the way out.
    moejax_cli.fail(str(e), hard=True)


if __name__ == "__main__":
  cli()
