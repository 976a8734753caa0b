"""Every shipped TPU config (configs/*_tpu.py) names its target slice and fits it with headroom.

Each TPU config module has ``TOPOLOGY = "vX:AxB..."`` (its target slice), named in its
docstring too. The fast tests check that declaration without compiling. The slow test compiles
the config's train and eval steps there with libtpu (``moejax.aot.compile.compile_config``, vocab
32,000 as the configs' SentencePiece model) and asserts at least 25 % HBM headroom per device
for both steps; each config takes minutes on 2 CPU cores:

    python -m pytest -m slow tests/test_tpu_configs.py
"""

import glob
import importlib.util
import os

import pytest

from moejax.aot.targets import libtpu_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Several test processes on one machine may load libtpu at once (compile-only use).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

TPU_CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*_tpu.py")))
MIN_HEADROOM = 0.25
VOCAB = 32000


def load(name):
  spec = importlib.util.spec_from_file_location(f"tpu_config_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_the_tpu_configs_are_found():
  assert {*TABLE1, "switch_base_c4_tpu"} <= set(TPU_CONFIGS)


@pytest.mark.parametrize("name", TPU_CONFIGS)
def test_tpu_config_names_its_slice(name):
  """TOPOLOGY is an accepted topology, the docstring names it, and the mesh and batch fit it."""
  from moejax import config as config_lib
  from moejax.aot import chips
  from moejax.sharding import resolve_mesh_shape
  mod = load(name)
  topology = getattr(mod, "TOPOLOGY", None)
  assert topology, f"configs/{name}.py: no TOPOLOGY constant"
  assert chips.resolve_topology(topology) == topology
  assert topology in mod.__doc__, f"configs/{name}.py: the docstring does not name {topology}"
  c = mod.get_config()
  config_lib.validate(c)
  chip = chips.chip_of(topology)
  devices = chips.num_chips(topology) * chip.devices_per_chip
  data, expert, model = resolve_mesh_shape((c.mesh.data, c.mesh.expert, c.mesh.model), devices)
  assert data * expert * model == devices, "the mesh leaves devices of the slice unused"
  assert c.data.batch_size % (data * expert) == 0
  # A SentencePiece placeholder (vocab from --vocab_size when compiling), never "byte".
  assert c.data.tokenizer != "byte" and c.model.vocab_size in (0, VOCAB)


TABLE1 = ("dense_c4_tpu", "moe_ec_c4_tpu", "pkm_c4_tpu", "peer_c4_tpu")   # the PEER paper's Table 1


@pytest.mark.parametrize("budget", ["6e18", "2e19"])
def test_table1_arms_spend_one_flop_budget_on_one_trunk(budget):
  """Each arm's steps x model FLOPs per step is the budget (to one step), on the same trunk."""
  from moejax import flops
  trunks = set()
  for name in TABLE1:
    c = load(name).get_config(budget)
    c.model.vocab_size = VOCAB
    per_step = flops.count(c).train * c.data.batch_size * c.data.seq_len
    assert abs(c.train.steps * per_step - float(budget)) <= per_step, name
    m = c.model
    trunks.add((m.d_model, m.num_layers, m.num_heads, m.d_ff, c.data.batch_size, c.data.seq_len))
  assert len(trunks) == 1
  assert load("dense_c4_tpu").get_config("2e19").train.steps > 3 * load("dense_c4_tpu").get_config().train.steps


@pytest.mark.slow
@pytest.mark.skipif(not libtpu_available(), reason="needs libtpu (pip install -e '.[tpu]')")
@pytest.mark.parametrize("name", TPU_CONFIGS)
def test_tpu_config_fits_its_slice(name):
  from moejax.aot.compile import compile_config
  mod = load(name)
  report = compile_config(mod.get_config(), mod.TOPOLOGY, vocab_size=VOCAB,
                          config_name=f"configs/{name}.py")
  print("\n" + report.table())
  assert report.topology == mod.TOPOLOGY and report.mesh_devices == report.num_devices
  assert report.vocab_size == VOCAB        # the SentencePiece placeholder, not the byte tokenizer
  assert report.eval is not None
  for step in report.steps:
    assert report.headroom(step) >= MIN_HEADROOM, (
        f"{name} {step.name} step: {step.total_bytes / 2**30:.1f} GiB of "
        f"{report.hbm_bytes / 2**30:.1f} GiB per device on {mod.TOPOLOGY} "
        f"({100 * report.headroom(step):.1f} % headroom, want >= {100 * MIN_HEADROOM:.0f} %)")
