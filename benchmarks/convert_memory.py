"""Peak host memory of python -m moejax.convert, both ways, on a synthetic Llama checkpoint.

Writes a random Llama-shaped Hugging Face checkpoint (float32, two shards) and, for each
source tree given (default: this one), in a fresh process per direction: the process's peak
resident memory (``ru_maxrss``) after importing moejax and JAX, and after ``--from_hf`` /
``--to_hf``; the difference is what the conversion held at its peak, printed as a multiple
of the checkpoint's size (1.0: one copy of the model).

    python benchmarks/convert_memory.py [--trees /path/to/old/moejax,.] [--d_model 1024]
        [--scan_layers]   # import to the scanned layout (and export from it)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

_MEASURE = """
import resource, sys
from moejax.interop import hf
import jax, jax.numpy as jnp
jnp.zeros(1).block_until_ready()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "from_hf":
  hf.import_checkpoint(sys.argv[2], sys.argv[3], scan_layers=sys.argv[4] == "1")
else:
  hf.export_checkpoint(sys.argv[2], sys.argv[3])
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _checkpoint(path: str, d: int, layers: int, vocab: int, d_ff: int) -> int:
  """A random Llama checkpoint in two shards; returns its tensors' bytes."""
  from safetensors.numpy import save_file
  rng = np.random.default_rng(0)
  def w(*shape):
    return (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)
  heads, hd = d // 64, 64
  shards = [{"model.embed_tokens.weight": w(vocab, d), "model.norm.weight": np.ones(d, np.float32),
             "lm_head.weight": w(vocab, d)}, {}]
  for i in range(layers):
    p = f"model.layers.{i}."
    shards[i * 2 // layers].update({
        p + "input_layernorm.weight": np.ones(d, np.float32),
        p + "post_attention_layernorm.weight": np.ones(d, np.float32),
        **{p + f"self_attn.{n}_proj.weight": w(d, d) for n in "qkvo"},
        p + "mlp.gate_proj.weight": w(d_ff, d), p + "mlp.up_proj.weight": w(d_ff, d),
        p + "mlp.down_proj.weight": w(d, d_ff)})
  os.makedirs(path)
  weight_map = {}
  for k, shard in enumerate(shards):
    name = f"model-{k + 1:05d}-of-00002.safetensors"
    save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({t: name for t in shard})
  total = sum(x.nbytes for s in shards for x in s.values())
  json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
            open(os.path.join(path, "model.safetensors.index.json"), "w"))
  json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d,
             "intermediate_size": d_ff, "num_hidden_layers": layers, "num_attention_heads": heads,
             "num_key_value_heads": heads, "head_dim": hd, "vocab_size": vocab,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
             "tie_word_embeddings": False}, open(os.path.join(path, "config.json"), "w"))
  return total


def _peak(tree: str, *args: str) -> tuple[int, int]:
  env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", _MEASURE, *args], env=env, cwd=tree,
                        capture_output=True, text=True)
  if done.returncode:
    sys.exit(f"{tree} {args[0]} failed: {done.stderr.strip().splitlines()[-1]}")
  base, peak = map(int, done.stdout.split()[-2:])
  return base * 1024, peak * 1024     # ru_maxrss is KiB on Linux


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--trees", default=".", help="comma list of moejax source trees to compare")
  ap.add_argument("--d_model", type=int, default=1024)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--d_ff", type=int, default=2816)
  ap.add_argument("--scan_layers", action="store_true", help="import to the scanned layout")
  args = ap.parse_args()
  tmp = tempfile.mkdtemp(prefix="moejax_convert_memory_")
  size = _checkpoint(os.path.join(tmp, "hf"), args.d_model, args.layers, args.vocab, args.d_ff)
  print(f"# Llama-shaped checkpoint, float32, 2 shards: {size / 2**20:.0f} MiB of tensors "
        f"(d_model {args.d_model}, {args.layers} blocks, vocab {args.vocab}, d_ff {args.d_ff}); "
        f"{'scanned' if args.scan_layers else 'unscanned'} layout")
  print(f"{'tree':40s} {'direction':9s} {'base MiB':>9s} {'peak MiB':>9s} {'held / model':>13s}")
  for i, tree in enumerate(args.trees.split(",")):
    work = os.path.join(tmp, f"run{i}")
    for direction, src, dst in (("from_hf", os.path.join(tmp, "hf"), work),
                                ("to_hf", os.path.join(work, "export"), work + "_hf")):
      base, peak = _peak(tree, direction, src, dst, "1" if args.scan_layers else "0")
      print(f"{os.path.abspath(tree)[-40:]:40s} {direction:9s} {base / 2**20:9.0f} "
            f"{peak / 2**20:9.0f} {(peak - base) / size:13.2f}")


if __name__ == "__main__":
  main()
