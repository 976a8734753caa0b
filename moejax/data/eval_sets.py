"""Where the text of a named evaluation set lives: its split and its text feature.

``config.eval.datasets`` is a comma list of TFDS names; most keep their text in ``text`` and
have a ``validation`` split (``config.data.text_key``, ``config.eval.split``). Sets that do not
are listed here, so a list like ``c4/en:3.1.0,lambada`` needs no per-set flags. The PEER
paper's Table 1 evaluates on Curation, LAMBADA, the Pile, Wikitext and C4; of these TFDS
provides C4 and LAMBADA (no Wikitext, Pile or Curation builder in tfds 4.9).
"""

from __future__ import annotations

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class EvalSet:
  split: str        # the split that holds the held-out text
  text_key: str     # the feature holding the text


# TFDS builder name (without config or version) -> where its evaluation text is.
EVAL_SETS: dict[str, EvalSet] = {
    "lambada": EvalSet(split="test", text_key="passage"),   # train/test only; 5,153 test passages
}


def builder_name(dataset: str) -> str:
  """``c4/en:3.1.0`` -> ``c4``: the key of :data:`EVAL_SETS`."""
  return dataset.split(":")[0].split("/")[0]


def data_config_for(data_cfg: ml_collections.ConfigDict, dataset: str,
                    split: str | None, default_split: str) -> ml_collections.ConfigDict:
  """A copy of ``config.data`` that reads ``dataset``'s evaluation text.

  ``split`` (a command-line choice) wins; else the set's own split from :data:`EVAL_SETS`;
  else ``default_split`` (``config.eval.split``). The text feature comes from
  :data:`EVAL_SETS`, else ``config.data.text_key``.
  """
  known = EVAL_SETS.get(builder_name(dataset))
  out = ml_collections.ConfigDict(data_cfg.to_dict())
  out.dataset = dataset
  out.eval_split = split or (known.split if known else default_split)
  if known:
    out.text_key = known.text_key
  return out
