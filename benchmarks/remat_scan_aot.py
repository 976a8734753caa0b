"""Per-device memory and compile time of the train step for a TPU slice, compiled here.

    python benchmarks/remat_scan_aot.py [--topology v5e:2x2] [--layers 8] [--variants a,b]

Compiles (with libtpu, nothing runs) the train step of a small LM -- L x 256, vocab 32000,
batch B x 512 (--batch), bf16 -- with each of model.remat / model.loss_chunk / model.scan_layers and
prints the compiled per-device memory (arguments, temporaries) and the compile time.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from moejax import config as config_lib  # noqa: E402
from moejax import sharding  # noqa: E402
from moejax.aot import targets as aot  # noqa: E402
from moejax.training import state as state_lib  # noqa: E402

VARIANTS = {
    "baseline": {},
    "remat=full": dict(remat="full"),
    "remat=save_dots": dict(remat="save_dots"),
    "remat=save_named": dict(remat="save_named"),
    "chunk": dict(loss_chunk=-1),                  # -1: --loss_chunk
    "full+chunk": dict(remat="full", loss_chunk=-1),
    "scan": dict(scan_layers=True),
    "scan+full": dict(scan_layers=True, remat="full"),
    "scan+full+chunk": dict(scan_layers=True, remat="full", loss_chunk=-1),
}


def small_config(layers: int, batch: int = 8, **model):
  c = config_lib.default_config()
  c.model.update(dict(vocab_size=32000, d_model=256, num_layers=layers, num_heads=4, head_dim=64,
                      d_ff=1024, dtype="bfloat16"))
  c.model.update(model)
  c.data.update(seq_len=512, batch_size=batch)
  c.mesh.update(data=-1, expert=1, model=1)
  return config_lib.validate(c)


def abstract_train_state(config, devices) -> state_lib.TrainState:
  """A TrainState whose arrays are ShapeDtypeStructs sharded on ``devices`` (no allocation)."""
  m = config.mesh
  mesh = sharding.make_mesh(m.data, m.expert, m.model, devices=devices)
  rules = state_lib.axis_rules(config)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(lambda: state_lib._create(config))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = nnx.get_named_sharding(abstract_state, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract_state, shardings)
    model = abstract[0]
    model.eval()
    eval_graphdef = nnx.split(model)[0]
  return state_lib.TrainState(config, mesh, rules, graphdef, eval_graphdef, state, shardings)


def compile_train_step(config, topology: str):
  ts = abstract_train_state(config, aot.topology_devices(topology))
  b, l = config.data.batch_size, config.data.seq_len
  sh = sharding.batch_sharding(ts.mesh)
  batch = {k: jax.ShapeDtypeStruct((b, l), np.int32 if k in ("inputs", "targets") else np.float32,
                                   sharding=sh)
           for k in ("inputs", "targets", "weights", "num_bytes")}
  from moejax import kernels
  t0 = time.perf_counter()
  with kernels.target_platform("tpu"):
    compiled = state_lib.make_train_step(ts).lower(ts.state, batch).compile()
  return compiled, time.perf_counter() - t0


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--topology", default="v5e:2x2")
  p.add_argument("--layers", default="8")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--batch", type=int, default=8, help="sequences of 512 tokens")
  p.add_argument("--loss_chunk", type=int, default=1024, help="model.loss_chunk of *chunk variants")
  args = p.parse_args()
  print(f"{args.topology}, batch {args.batch} x 512, loss_chunk {args.loss_chunk}")
  print(f"{'layers':>6} {'variant':<18} {'args MiB':>9} {'temp MiB':>9} {'compile s':>9}")
  for layers in (int(x) for x in args.layers.split(",")):
    for name in args.variants.split(","):
      model = {k: (args.loss_chunk if k == "loss_chunk" else v) for k, v in VARIANTS[name].items()}
      compiled, secs = compile_train_step(small_config(layers, args.batch, **model), args.topology)
      mem = aot.memory(compiled)
      print(f"{layers:>6} {name:<18} {mem['argument'] / 2**20:>9.1f} {mem['temp'] / 2**20:>9.1f} "
            f"{secs:>9.1f}", flush=True)


if __name__ == "__main__":
  main()
