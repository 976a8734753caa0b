"""eval.py outputs that can be wrong: one row per dataset with its own numbers, and plots
with the right number of bars (MoE expert load) / points (PEER sorted usage).

Exports come from tiny in-process training runs (2 steps) on small local_text directories.
"""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from cli_env import cli_env
from moejax import config as config_lib
from moejax.data import local_text
from moejax.evaluation import plots
from moejax.evaluation import run as eval_run
from moejax.training import loop
from test_end_to_end import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MOE_EXPERTS = 4
PEER_SQRT = 4   # N = 16


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def other_text_dir(tmp_path_factory):
  """Text unlike ``text_dir``'s (random printable characters): a different loss."""
  d = tmp_path_factory.mktemp("other_text")
  for i in range(8):
    r = random.Random(i)
    (d / f"noise{i}.txt").write_text("".join(chr(r.randrange(33, 127)) for _ in range(3000)))
  return str(d)


def _prepared_name(text_dir: str, data_dir: str) -> str:
  """Builds ``text_dir`` into ``data_dir``; its TFDS name, readable as any other dataset."""
  b = local_text.prepare(local_text.builder(text_dir=text_dir, data_dir=data_dir))
  return f"local_text/{b.builder_config.name}"


def _train(workdir: str, text_dir: str, data_dir: str, **model) -> str:
  c = config_lib.default_config()
  c.model.update(dict(d_model=32, num_layers=2, num_heads=2, head_dim=16, d_ff=64))
  for key, value in model.items():
    section, _, field = key.partition("__")
    c[section][field] = value
  c.data.seq_len, c.data.batch_size = 32, 8
  c.data.text_dir, c.data.data_dir = text_dir, data_dir
  c.train.steps, c.train.log_every, c.train.eval_batches = 2, 1, 1
  c.train.checkpoint_every = 2
  c.train.progress_bar = False
  c.mesh.data = 1
  loop.train(c, workdir)
  export = os.path.join(workdir, "export")
  assert os.path.isdir(os.path.join(export, "model")), os.listdir(workdir)
  return export


@pytest.fixture(scope="module")
def moe_export(tmp_path_factory, text_dir, data_dir):
  """Top-2 MoE with MOE_EXPERTS experts in both blocks (two sparse layers)."""
  wd = str(tmp_path_factory.mktemp("moe") / "wd")
  return _train(wd, text_dir, data_dir, model__sparse_ffn="moe", model__sparse_layers="all",
                moe__num_experts=MOE_EXPERTS, moe__top_k=2)


@pytest.fixture(scope="module")
def peer_export(tmp_path_factory, text_dir, data_dir):
  """PEER with N = PEER_SQRT² experts in the middle block."""
  wd = str(tmp_path_factory.mktemp("peer") / "wd")
  return _train(wd, text_dir, data_dir, model__sparse_ffn="peer", model__sparse_layers="middle",
                peer__num_experts_sqrt=PEER_SQRT, peer__heads=2, peer__top_k=2, peer__d_key=8,
                peer__query_norm="layer")


@pytest.fixture
def captured(monkeypatch):
  """Every figure eval saves: {file name: summary of its axes} (read before it is closed)."""
  seen = {}
  original = plots._save

  def save(fig, path):
    ax = fig.axes[0]
    lines = ax.get_lines()
    seen[os.path.basename(path)] = {
        "bars": [p.get_height() for p in ax.patches],
        "line_x": [np.asarray(l.get_xdata(), float) for l in lines],
        "line_y": [np.asarray(l.get_ydata(), float) for l in lines],
        "title": ax.get_title(),
    }
    return original(fig, path)

  monkeypatch.setattr(plots, "_save", save)
  return seen


def _is_png(path):
  with open(path, "rb") as f:
    head = f.read(8)
  return head == PNG_MAGIC and os.path.getsize(path) > 1000


# ------------------------------------------------------------------ plotting functions


def test_expert_load_draws_one_bar_per_expert(tmp_path, captured):
  load = np.array([5.0, 0.0, 3.0, 2.0, 10.0])
  path = plots.expert_load("block_1_moe", load, str(tmp_path / "load.png"))
  assert _is_png(path)
  fig = captured["load.png"]
  assert len(fig["bars"]) == 5
  np.testing.assert_allclose(fig["bars"], load / load.sum())
  assert "block_1_moe" in fig["title"]


def test_sorted_usage_draws_used_experts_sorted(tmp_path, captured):
  scores = np.array([0.0, 4.0, 1.0, 0.0, 2.0, 0.5, 0.0, 0.0])
  path = plots.sorted_usage("block_1_peer", scores, str(tmp_path / "usage.png"))
  assert _is_png(path)
  fig = captured["usage.png"]
  x, y = fig["line_x"][0], fig["line_y"][0]
  assert len(x) == len(y) == 4   # the 4 experts with a non-zero score, not the 8
  np.testing.assert_array_equal(x, [1, 2, 3, 4])
  np.testing.assert_allclose(y, np.array([4.0, 2.0, 1.0, 0.5]) / 7.5)
  assert "4/8" in fig["title"]


# ------------------------------------------------------------------ several datasets


def test_two_datasets_give_one_row_each_with_own_numbers(tmp_path, moe_export, text_dir,
                                                         other_text_dir, data_dir):
  same = _prepared_name(text_dir, data_dir)          # the config's local_text, by another name
  other = _prepared_name(other_text_dir, data_dir)
  names = ["local_text", other, same]
  out = str(tmp_path / "eval")
  report = eval_run.evaluate(moe_export, datasets=names, max_batches=2, data_dir=data_dir,
                             out_dir=out)
  rows = report["datasets"]
  assert list(rows) == names
  for r in rows.values():
    assert np.isfinite(r["loss"]) and r["tokens"] > 0 and r["batches"] >= 1
  # Same text under two names: the same numbers. Different text: different numbers.
  assert rows[same]["loss"] == pytest.approx(rows["local_text"]["loss"], rel=1e-5)
  assert rows[same]["tokens"] == rows["local_text"]["tokens"]
  assert abs(rows[other]["loss"] - rows["local_text"]["loss"]) > 1e-3
  assert rows[other]["bits_per_byte"] != pytest.approx(rows["local_text"]["bits_per_byte"], rel=1e-3)
  # Expert statistics are per dataset too.
  loads = {n: rows[n]["experts"]["block_0_moe"]["load_kl_uniform"] for n in names}
  assert loads[same] == pytest.approx(loads["local_text"], rel=1e-5, abs=1e-7)
  # eval.json on disk and the printed table: one row per dataset.
  on_disk = json.load(open(os.path.join(out, "eval.json")))
  assert list(on_disk["datasets"]) == names
  assert on_disk["datasets"][other]["loss"] == pytest.approx(rows[other]["loss"])
  table = eval_run.format_table(report).splitlines()
  data_rows = [l for l in table if not l.startswith((" ", "-", "dataset"))]
  assert [l.split()[0] for l in data_rows] == names
  assert [float(l.split()[1]) for l in data_rows] == pytest.approx(
      [rows[n]["loss"] for n in names], abs=1e-4)


def test_eval_cli_dataset_list(tmp_path, moe_export, other_text_dir, data_dir):
  other = _prepared_name(other_text_dir, data_dir)
  env = cli_env(2)
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "eval.py"), f"--checkpoint={moe_export}",
       f"--dataset=local_text,{other}", "--max_batches=2", f"--data_dir={data_dir}",
       f"--out={tmp_path / 'cli'}", "--json"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout[:proc.stdout.rindex("}") + 1])
  rows = report["datasets"]
  assert list(rows) == ["local_text", other]
  assert abs(rows["local_text"]["loss"] - rows[other]["loss"]) > 1e-3


def test_named_eval_sets_read_their_own_split_and_text_feature():
  from moejax.data import eval_sets
  data = config_lib.default_config().data
  lam = eval_sets.data_config_for(data, "lambada:1.0.0", None, "validation")
  assert (lam.dataset, lam.eval_split, lam.text_key) == ("lambada:1.0.0", "test", "passage")
  c4 = eval_sets.data_config_for(data, "c4/en:3.1.0", None, "validation")
  assert (c4.eval_split, c4.text_key) == ("validation", "text")
  assert eval_sets.data_config_for(data, "lambada", "train", "validation").eval_split == "train"
  assert data.text_key == "text" and data.dataset == "local_text"   # a copy, not the config


def test_eval_reads_a_registered_sets_split(tmp_path, moe_export, other_text_dir, data_dir,
                                            monkeypatch):
  from moejax.data import eval_sets
  other = _prepared_name(other_text_dir, data_dir)
  plain = eval_run.evaluate(moe_export, datasets=[other], max_batches=2, data_dir=data_dir,
                            out_dir=str(tmp_path / "plain"))
  monkeypatch.setitem(eval_sets.EVAL_SETS, "local_text", eval_sets.EvalSet("train", "text"))
  named = eval_run.evaluate(moe_export, datasets=[other], max_batches=2, data_dir=data_dir,
                            out_dir=str(tmp_path / "named"))
  assert plain["splits"] == {other: "validation"} and named["splits"] == {other: "train"}
  assert named["datasets"][other]["loss"] != pytest.approx(plain["datasets"][other]["loss"], rel=1e-6)


def test_a_mesh_the_experts_do_not_divide_is_one_config_line(moe_export):
  from moejax.errors import ConfigError
  with pytest.raises(ConfigError, match=r"moe\.num_experts=4: must be a multiple of the 8 expert shards") as e:
    eval_run.load(moe_export, {"data": 1, "expert": 8, "model": 1})
  assert "\n" not in str(e.value)


# ------------------------------------------------------------------ plots from eval


def test_moe_eval_writes_load_plot_per_sparse_layer(tmp_path, moe_export, data_dir, captured):
  out = str(tmp_path / "eval")
  report = eval_run.evaluate(moe_export, max_batches=2, data_dir=data_dir, out_dir=out)
  load_plots = sorted(os.path.basename(p) for p in report["plots"] if p.endswith("_load.png"))
  assert load_plots == ["block_0_moe_load.png", "block_1_moe_load.png"], report["plots"]
  for name in load_plots:
    assert _is_png(os.path.join(out, name))
    bars = captured[name]["bars"]
    assert len(bars) == MOE_EXPERTS
    assert sum(bars) == pytest.approx(1.0, rel=1e-5)
    assert min(bars) >= 0
  assert _is_png(os.path.join(out, "loss_curve.png"))
  assert not [p for p in report["plots"] if p.endswith("_usage.png")]


def test_peer_eval_writes_sorted_usage_plot(tmp_path, peer_export, data_dir, captured):
  out = str(tmp_path / "eval")
  report = eval_run.evaluate(peer_export, max_batches=2, data_dir=data_dir, out_dir=out)
  usage_plots = [os.path.basename(p) for p in report["plots"] if p.endswith("_usage.png")]
  assert usage_plots == ["block_1_peer_usage.png"], report["plots"]
  assert _is_png(os.path.join(out, usage_plots[0]))
  n = PEER_SQRT ** 2
  fig = captured[usage_plots[0]]
  x, y = fig["line_x"][0], fig["line_y"][0]
  used = report["datasets"]["local_text"]["experts"]["block_1_peer"]["score_sum_usage"]
  assert 0 < len(x) <= n
  assert len(x) == len(y) == round(used * n)   # one point per used expert of the N
  np.testing.assert_array_equal(x, np.arange(1, len(x) + 1))
  assert np.all(np.diff(y) <= 0) and np.all(y > 0)
  assert y.sum() == pytest.approx(1.0, rel=1e-5)
  assert f"/{n} " in fig["title"]
  assert not [p for p in report["plots"] if p.endswith("_load.png")]
