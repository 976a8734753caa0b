"""The CPU backend sits behind the registry's seams.

* Without it (the package deleted, or ``MOEJAX_CPU_BACKEND=0``: nothing registered, every
  layer runs its portable XLA program, what TPU and GPU run) tiny dense, MoE (dropless and capacity), PEER and PKM
  language models compute the same loss and gradients as with it, and (slow test) the
  same training losses, row-sparse lazy Adam included.
* No module under ``moejax/layers``, ``moejax/training`` or ``moejax/model.py`` imports a
  backend or asks which platform it runs on: the registry does.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# name -> (model overrides, section overrides): each FFN kind at a tiny size.
VARIANTS = {
    "dense": ({}, {}),
    "moe_dropless": ({"ffn": "moe"}, {"moe": {"num_experts": 4, "top_k": 2, "dispatch": "dropless"}}),
    "moe_capacity": ({"ffn": "moe"}, {"moe": {"num_experts": 4, "top_k": 2, "dispatch": "einsum",
                                              "allow_noncausal": True}}),
    "peer": ({"sparse_ffn": "peer", "sparse_layers": "all"},
             {"peer": {"num_experts_sqrt": 8, "heads": 2, "top_k": 4, "d_key": 8}}),
    "peer_row_sparse": ({"sparse_ffn": "peer", "sparse_layers": "all"},
                        {"peer": {"num_experts_sqrt": 8, "heads": 2, "top_k": 4, "d_key": 8},
                         "optim": {"table_update": "row_sparse"}}),
    "pkm": ({"sparse_ffn": "pkm", "sparse_layers": "all"},
            {"pkm": {"num_keys_sqrt": 8, "heads": 2, "top_k": 4, "d_key": 8}}),
}

# Variants trained for 3 steps by the slow test (the optimizer's backend path: row-sparse
# lazy Adam), and those the default test takes one forward and gradient of.
TRAIN = ["peer_row_sparse", "moe_dropless"]
GRADS = ["dense", "moe_dropless", "moe_capacity", "peer", "pkm"]

# Runs in a fresh process: the registry loads the backends once per process.
_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, "tests")
import jax, jax.numpy as jnp
from flax import nnx
import lm_utils
from moejax import config as config_lib, model as model_lib
from moejax.kernels import registry

variants, train = json.loads(sys.argv[1]), json.loads(sys.argv[2])
import moejax
out = {"registered": registry.registered("cpu"), "package": moejax.__file__}
for name, (model_over, sections) in variants.items():
  c = lm_utils.tiny_config(**model_over)
  for section, fields in sections.items():
    c[section].update(fields)
  config_lib.validate(c)
  if train:
    out[name] = {"train": lm_utils.train_losses(c, steps=3)}
    continue
  batch = next(lm_utils.synthetic_batches(c))
  model = model_lib.Transformer(c, rngs=nnx.Rngs(0))
  model.eval()   # batch statistics off: one forward, comparable across programs

  def loss_fn(model):
    logits, _ = model(jnp.asarray(batch["inputs"]))
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(batch["targets"])[..., None], -1))

  loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)   # as training runs it
  leaves = {jax.tree_util.keystr(p): np.asarray(v).tolist()
            for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))}
  out[name] = {"loss": float(loss), "grads": leaves}
print("RESULT " + json.dumps(out))
"""


def _without_backend_package(tmp: Path) -> Path:
  """A copy of the package with ``moejax/backends/cpu`` deleted (and the tests' helper the
  script imports): the library as an install without the CPU backend has it."""
  shutil.copytree(ROOT / "moejax", tmp / "moejax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.so"))
  shutil.rmtree(tmp / "moejax" / "backends" / "cpu")
  (tmp / "tests").mkdir()
  shutil.copy(ROOT / "tests" / "lm_utils.py", tmp / "tests")
  return tmp


def _run(backend: bool | Path, names: list[str], train: bool) -> dict:
  """Runs the variants in a fresh process: with the backend (True), with it switched off
  (False: ``MOEJAX_CPU_BACKEND=0``) or in a copy of the package without it (a path)."""
  env = dict(os.environ, MOEJAX_CPU_BACKEND="0" if backend is False else "1",
             JAX_PLATFORMS="cpu")
  root = backend if isinstance(backend, Path) else ROOT
  variants = {name: VARIANTS[name] for name in names}
  done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(variants), json.dumps(train)],
                        cwd=root, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
  result = json.loads(line[len("RESULT "):])
  assert Path(result["package"]).resolve().is_relative_to(root.resolve()), result["package"]
  return result


def test_layers_without_the_cpu_backend_equal_with_it(tmp_path):
  """Loss and every parameter's gradient of each model, with the backend and in a copy of
  the package where ``moejax/backends/cpu`` is deleted."""
  with_backend = _run(True, GRADS, False)
  without = _run(_without_backend_package(tmp_path), GRADS, False)
  assert {"attention.rotary", "projection", "row_ops", "moe.capacity_moves"} <= set(
      with_backend["registered"])
  assert without["registered"] == []
  for name in GRADS:
    on, off = with_backend[name], without[name]
    chex.assert_trees_all_close(off["loss"], on["loss"], rtol=1e-5, atol=1e-6)
    assert set(off["grads"]) == set(on["grads"]), name
    assert any(np.abs(np.asarray(g)).max() > 0 for g in on["grads"].values()), name
    for path in on["grads"]:
      chex.assert_trees_all_close(np.asarray(off["grads"][path]), np.asarray(on["grads"][path]),
                                  rtol=1e-4, atol=1e-6, custom_message=f"{name} {path}")


@pytest.mark.slow
def test_training_without_the_cpu_backend_equals_with_it():
  """Three training steps (row-sparse lazy Adam for PEER, whose update the backend takes
  over), backend on and off."""
  with_backend, without = _run(True, TRAIN, True), _run(False, TRAIN, True)
  for name in TRAIN:
    on, off = np.asarray(with_backend[name]["train"]), np.asarray(without[name]["train"])
    assert on.shape == (3,) and on[-1] < on[0], name
    chex.assert_trees_all_close(off, on, rtol=1e-4, atol=1e-5, custom_message=name)


def _imports(path: Path) -> list[str]:
  """Every module ``path`` imports (absolute names; ``from moejax import x`` gives
  ``moejax.x``), and every string passed to ``importlib.import_module``."""
  names = []
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
          and node.args and isinstance(node.args[0], ast.Constant)):
      names.append(str(node.args[0].value))
  return names


def _platform_free_sources() -> list[Path]:
  pkg = ROOT / "moejax"
  files = [*sorted((pkg / "layers").rglob("*.py")), *sorted((pkg / "training").rglob("*.py")),
           pkg / "model.py"]
  assert len(files) > 10
  return files


def test_layers_training_and_model_import_no_backend():
  offenders = [f"{path.relative_to(ROOT)}: {name}" for path in _platform_free_sources()
               for name in _imports(path) if name.startswith("moejax.backends")]
  assert not offenders, offenders


def test_layers_training_and_model_ask_no_platform():
  """They never branch on the platform: no ``current_platform`` / ``target_platform`` /
  ``jax.default_backend`` (the registry picks the platform's implementation)."""
  banned = {"current_platform", "target_platform", "default_backend"}
  offenders = []
  for path in _platform_free_sources():
    for node in ast.walk(ast.parse(path.read_text())):
      name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
      if name in banned:
        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
  assert not offenders, offenders


def test_registry_finds_the_platform_then_any_and_declines_to_none(monkeypatch):
  from moejax import kernels
  from moejax.kernels import registry
  registry.registered("cpu")   # load the backends first: the copy below is restored after
  monkeypatch.setattr(registry, "_IMPLEMENTATIONS", dict(registry._IMPLEMENTATIONS))
  with pytest.raises(KeyError, match="no registry operation 'no.such.op'"):
    registry.find("no.such.op")
  registry.register("cache_chunk", lambda *a: 7, platform="tpu")
  registry.register("cache_chunk", lambda *a: None, platform=registry.ANY)
  with kernels.target_platform("tpu"):
    assert registry.call("cache_chunk", 100, 1, 1) == 7
  with kernels.target_platform("gpu"):   # no gpu entry: the ANY one, which declines
    assert registry.call("cache_chunk", 100, 1, 1) is None
    assert kernels.cache_chunk(100, 1, 1) == 100   # declined: one chunk
