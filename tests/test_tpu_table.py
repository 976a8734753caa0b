"""experiments/peer_paper/tpu_table.py: the PEER paper's Table 1 as one plan of commands."""

import importlib.util
import os
import sys

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def table():
  path = os.path.join(ROOT, "experiments", "peer_paper", "tpu_table.py")
  spec = importlib.util.spec_from_file_location("tpu_table", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules["tpu_table"] = mod      # its dataclasses look their module up by name
  spec.loader.exec_module(mod)
  return mod


# ml_collections' config_flags loads config files with importlib's deprecated load_module().
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_the_commands_train_each_arm_at_the_budget_and_evaluate_c4_and_lambada(table):
  plans = table.plan(2e19)
  assert [p.arm.config for p in plans] == ["dense_c4_tpu", "moe_ec_c4_tpu", "pkm_c4_tpu", "peer_c4_tpu"]
  for p in plans:
    train, evaluate, workdir = table.commands(p, 2e19, "gs://b")
    assert f"--config=configs/{p.arm.config}.py:2e19" in train and f"--workdir={workdir}" in train
    assert workdir == f"gs://b/runs/peer_table1_2e19/{p.arm.config}"
    assert "--dataset=c4/en:3.1.0,lambada" in evaluate and f"--checkpoint={workdir}" in evaluate
    # What train.py would read from that flag: the same steps as the plan.
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv)
    fv(["x", train[2]])
    assert fv.config.train.steps == p.steps
    assert p.wall_seconds(0.4) == pytest.approx(2 * p.wall_seconds(0.8))


def test_the_table_shows_compiled_memory_when_there(table, monkeypatch, tmp_path, capsys):
  gib = 2**30
  (tmp_path / "peer_c4_tpu.json").write_text(
      '{"train": {"total_bytes": %d}, "eval": {"total_bytes": %d}, "headroom": 0.5}' % (40 * gib, 20 * gib))
  monkeypatch.setattr(table, "RESULTS", str(tmp_path))
  assert table.main(["--budget", "6e18"]) == 0
  out = capsys.readouterr().out
  peer = next(line for line in out.splitlines() if "peer_c4_tpu.py |" in line)
  assert "40.0 / 20.0 GiB" in peer and "50.0 %" in peer
  dense = next(line for line in out.splitlines() if "dense_c4_tpu.py |" in line)
  assert "not compiled" in dense


@pytest.mark.parametrize("argv, field", [(["--run"], "--bucket"), (["--budget", "0"], "--budget"),
                                         (["--mfu", "2"], "--mfu")])
def test_bad_flags_are_one_line(table, argv, field, capsys):
  with pytest.raises(SystemExit) as e:
    table.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("tpu_table.py: error: " + field) or field in err[-1]
