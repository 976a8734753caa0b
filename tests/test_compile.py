"""moejax.aot and python -m moejax.compile: compile small configs for TPU slices with libtpu (nothing runs).

Each compile takes seconds (tiny models); whole TPU configs are in benchmarks/tpu_compile.py.
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from moejax.aot import chips
from moejax.aot.compile import compile_config
from moejax.aot.report import OutOfMemory
from moejax.aot.targets import libtpu_available

pytestmark = pytest.mark.skipif(not libtpu_available(), reason="needs libtpu (pip install -e '.[tpu]')")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Several test processes on one machine may load libtpu at once (compile-only use).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

TINY = {"model.num_layers": 2, "model.d_model": 64, "model.num_heads": 2, "model.head_dim": 32,
        "model.d_ff": 128, "data.batch_size": 8, "data.seq_len": 32}
TINY_ARGS = [f"--config.{k}={v}" for k, v in TINY.items()]


def load_config(name, **overrides):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  for key, value in {**TINY, **overrides}.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def tpu_lookup_kernels_ready() -> bool:
  try:
    return hasattr(importlib.import_module("moejax.kernels.lookup_tpu"), "lookup")
  except ImportError:
    return False


CONFIGS = {
    "dense": lambda: load_config("dense_small"),
    # Switch with explicit all_to_all over a 2-wide expert axis.
    "moe": lambda: load_config("switch_small", **{"moe.num_experts": 4, "moe.dispatch": "expert_parallel",
                                                  "mesh.data": 2, "mesh.expert": 2}),
    # PEER shrunk (N = 32²); the reference lookup, so that this runs whatever the TPU kernels'
    # state (test_peer_tpu_kernels below compiles the Pallas ones).
    "peer": lambda: load_config("peer_small", **{"peer.num_experts_sqrt": 32, "peer.d_key": 32,
                                                 "peer.kernel": "reference"}),
}
EXPECTED_MESH = {"dense": {"data": 4, "expert": 1, "model": 1},
                 "moe": {"data": 2, "expert": 2, "model": 1},
                 "peer": {"data": 4, "expert": 1, "model": 1}}


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
@pytest.mark.parametrize("kind", ["dense", "moe", "peer"])
def test_compile_config(kind, topology):
  report = compile_config(CONFIGS[kind](), topology, config_name=kind)
  assert report.topology == topology
  assert report.num_devices == 4 and report.mesh_devices == 4
  assert report.mesh == EXPECTED_MESH[kind]
  assert report.vocab_size == 258      # byte tokenizer
  chip = chips.CHIPS[topology.split(":")[0]]
  assert report.hbm_bytes == chip.hbm_usable
  for step in report.steps:
    assert step.argument_bytes > 0 and step.temp_bytes >= 0   # tiny temps may all live in VMEM
    assert step.total_bytes >= step.argument_bytes + step.temp_bytes
    assert step.flops > 0 and step.bytes_accessed > 0
    assert step.estimate_seconds > 0 and step.compile_seconds > 0
  # Train: params + Adam moments as arguments, donated to its outputs.
  assert report.train.argument_bytes > 2 * report.eval.argument_bytes
  assert report.train.flops > 2 * report.eval.flops
  assert report.fits and 0.9 < report.headroom() < 1.0
  table = report.table()
  for needle in ("train step", "eval step", "argument", "temporary", "total", "HBM (usable)",
                 "headroom", "FLOPs / step", "ESTIMATE", "compile time", "verdict: fits",
                 f"mesh data={report.mesh['data']} expert={report.mesh['expert']} model=1"):
    assert needle in table, needle
  d = report.to_dict()
  json.dumps(d)
  assert d["train"]["total_bytes"] == report.train.total_bytes and d["fits"]


@pytest.mark.skipif(not tpu_lookup_kernels_ready(), reason="TPU lookup kernels not wired yet")
def test_peer_tpu_kernels():
  """kernel=auto under the TPU target picks the Pallas (Mosaic) kernels, and they compile."""
  c = CONFIGS["peer"]()
  c.peer.kernel = "auto"
  c.model.d_model = 128      # the TPU lookup works on whole 128-lane rows
  report = compile_config(c, "v5p:2x2x1")
  assert report.fits


def test_kernels_target_tpu_while_tracing(monkeypatch):
  """Layers trace under kernels.target_platform('tpu'), whatever the default backend."""
  from moejax import kernels
  from moejax.layers import peer
  seen = []
  real = kernels.resolve
  monkeypatch.setattr(kernels, "resolve", lambda choice, platform=None, **kw: (
      seen.append(kernels.current_platform()), real("reference"))[1])
  compile_config(CONFIGS["peer"](), "v5e:2x2", eval_step=False)
  assert seen and set(seen) == {"tpu"}
  del peer


def test_topology_names():
  assert chips.resolve_topology("v5p-8") == "v5p:2x2x1"
  assert chips.resolve_topology("v5litepod-4") == "v5e:2x2"
  assert chips.resolve_topology("v4-8") == "v4:2x2x1"
  assert chips.larger_slices("v5p:2x2x1")[0] == "v5p:2x2x2"
  with pytest.raises(chips.TopologyError, match="v5p:2x2x1"):
    chips.resolve_topology("v5x:2x2")


def test_batch_layout_on_a_multi_host_topology():
  """The training loop's batch-layout check reads the topology's processes (v5e:4x8: 8 hosts):
  data parallelism over every device fits; a model axis across hosts is refused."""
  from moejax import sharding
  from moejax.aot import targets
  from moejax.errors import ConfigError
  from moejax.training.loop import check_batch_layout
  devices = targets.topology_devices("v5e:4x8")
  c = load_config("dense_small", **{"data.batch_size": 64})
  check_batch_layout(c, sharding.make_mesh(-1, 1, 1, devices=devices))
  with pytest.raises(ConfigError, match="spans several processes"):
    check_batch_layout(c, sharding.make_mesh(1, 1, -1, devices=devices))
  with pytest.raises(ConfigError, match="multiple of mesh data x expert = 32"):
    check_batch_layout(load_config("dense_small", **{"data.batch_size": 48}),
                       sharding.make_mesh(-1, 1, 1, devices=devices))


def test_mesh_must_divide_topology():
  from moejax.errors import ConfigError
  c = load_config("default", **{"mesh.data": 3})
  with pytest.raises(ConfigError, match=r"config\.mesh.*does not divide the 4 devices"):
    compile_config(c, "v5e:2x2")


def test_oom_is_raised():
  c = load_config("default", **{"data.batch_size": 4096, "data.seq_len": 1024, "model.vocab_size": 32000})
  with pytest.raises(OutOfMemory) as e:
    compile_config(c, "v5e:2x2", eval_step=False)
  line = e.value.one_line()
  assert "\n" not in line and "v5e:2x2" in line and "--config.data.batch_size=2048" in line


# --- the command line ---------------------------------------------------------------------------


def run_cli(*args, timeout=600):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "moejax.compile", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_cli_prints_table_and_json(tmp_path):
  out = tmp_path / "report.json"
  r = run_cli("--config", "configs/default.py", "--topology", "v5e:2x2", *TINY_ARGS,
              "--json", str(out))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "moejax compile check: configs/default.py on v5e:2x2" in r.stdout
  assert "train step" in r.stdout and "ESTIMATE" in r.stdout and "verdict: fits" in r.stdout
  d = json.loads(out.read_text())
  assert d["topology"] == "v5e:2x2" and d["fits"] and d["train"]["flops"] > 0
  assert d["mesh"] == {"data": 4, "expert": 1, "model": 1}


def test_cli_unknown_topology():
  r = run_cli("--topology", "v9:2x2")
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --topology=v9:2x2: unknown topology 'v9:2x2'")
  assert "v5p:2x2x1" in lines[0] and "v5e:2x2" in lines[0]


def test_cli_list_topologies():
  r = run_cli("--list_topologies")
  assert r.returncode == 0
  names = [line.split()[0] for line in r.stdout.strip().splitlines()]
  assert {"v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v5p:2x2x2", "v5p:2x4x4", "v6e:2x2"} <= set(names)


def test_cli_bad_config_field():
  r = run_cli("--config.model.bogus=1")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [r.stderr.strip()]
  assert r.stderr.startswith("error: config.model.bogus: unknown field")


def test_cli_bad_mesh():
  r = run_cli("--topology", "v5e:2x2", "--config.mesh.data=3", *TINY_ARGS)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "config.mesh" in lines[0] and "--config.mesh.data/expert/model" in lines[0]


def test_cli_out_of_memory():
  r = run_cli("--topology", "v5e:2x2", "--config.data.batch_size=4096", "--config.data.seq_len=1024",
              "--config.model.vocab_size=32000", "--eval_step=false")
  assert r.returncode == 1, r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, lines
  line = lines[0]
  assert line.startswith("error: train step does not fit v5e:2x2:")
  assert "--config.data.batch_size=2048" in line and "--config.mesh." in line
  assert "larger slice" in line
  from moejax.config import default_config
  if "remat" in default_config().model:
    assert "--config.model.remat=full" in line


def test_scanned_layers_flagged_as_lower_bound():
  """XLA's cost analysis counts a while-loop body once: scanned models say so."""
  from moejax.config import default_config
  if "scan_layers" not in default_config().model:
    pytest.skip("no model.scan_layers in this moejax")
  report = compile_config(load_config("dense_small", **{"model.scan_layers": True}), "v5e:2x2",
                                      eval_step=False)
  assert report.train.while_loops >= 1
  assert ">= " in report.table() and "lower bounds" in report.table()
