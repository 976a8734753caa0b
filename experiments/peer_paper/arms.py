"""The arms of the PEER-paper study: what each trains, at each scale.

An :class:`Arm` is a set of ``--config.FIELD=VALUE`` overrides on top of a scale's trunk
(:data:`TRUNKS`), trained by ``train.py`` from ``configs/default.py``'s base. Arm names say
what they hold (``peer_n128_h8k16_bn``), and an arm that two studies share (the main PEER
arm is also the usage study's N = 128² with BN and the ablation's h·k = 128) is one run.

Studies (:func:`study`):

* ``main``: dense, MoE (expert choice as in the paper, experts the size of the dense MLP,
  capacity factor 1; token-choice top-2 with half-size experts), PKM and PEER in the
  middle block of the same trunk, sized so that training FLOPs per token agree within 5%
  (:mod:`moejax.flops`), over several seeds.
* ``usage``: PEER at N = n² for several n, query BatchNorm on and off (paper Table 2), and
  with whitened queries (``query_norm=whiten``, the diagnosis of low usage at this scale).
* ``ablation``: PEER heads × top-k at fixed h·k, and at growing h·k.
"""

from __future__ import annotations

import dataclasses
import re

# The trunk every arm of a scale shares, and how long it trains.
#   seeds: of the main study; eval_batches: the periodic in-training evals (expert usage over
#   steps); final_eval_batches: eval.py on the export (0 = the whole validation split).
TRUNKS = {
    "tiny": dict(
        model=dict(d_model=32, num_layers=2, num_heads=2, head_dim=16, d_ff=64),
        data=dict(seq_len=32, batch_size=8),   # a multiple of the 8 devices tests simulate
        train=dict(steps=4, eval_every=0, eval_batches=2, checkpoint_every=4, log_every=2),
        optim=dict(warmup_steps=1),
        seeds=(0,), final_eval_batches=2),
    # About two hours of a 2-core CPU for the main study (15 runs), the default LM's trunk.
    "cpu": dict(
        model=dict(d_model=128, num_layers=4, num_heads=4, head_dim=32, d_ff=512),
        data=dict(seq_len=128, batch_size=16),
        train=dict(steps=600, eval_every=100, eval_batches=16, checkpoint_every=200, log_every=20),
        optim=dict(warmup_steps=30),
        seeds=(0, 1, 2), final_eval_batches=0),
    # One H100: every arm of the main study in <= 10 minutes of device time, bf16.
    "gpu": dict(
        model=dict(d_model=512, num_layers=8, num_heads=8, head_dim=64, d_ff=2048,
                   dtype="bfloat16"),
        data=dict(seq_len=512, batch_size=32),
        train=dict(steps=1500, eval_every=500, eval_batches=16, checkpoint_every=500,
                   log_every=50),
        optim=dict(warmup_steps=100, lr=1e-3),
        seeds=(0,), final_eval_batches=64),
}

# Sparse-layer sizes per scale: product-key table side n (N = n²), heads, top-k, d_key; MoE
# experts. The paper: PEER h = 8, k = 16; PKM h = 8, k = 32; MoE 128 experts.
SIZES = {
    "tiny": dict(n=8, peer_h=2, peer_k=2, pkm_h=2, pkm_k=4, d_key=8, experts=4,
                 usage_n=(8,), whiten_n=(), long_n=(), ablation_fixed=((1, 4),), ablation_grow=()),
    "cpu": dict(n=128, peer_h=8, peer_k=16, pkm_h=8, pkm_k=32, d_key=64, experts=16,
                usage_n=(32, 64, 128, 256), whiten_n=(32, 64), long_n=(128,),
                ablation_fixed=((1, 32), (2, 16), (4, 8), (8, 4)),
                ablation_grow=((4, 4), (8, 8), (16, 16))),
    "gpu": dict(n=512, peer_h=8, peer_k=16, pkm_h=8, pkm_k=32, d_key=128, experts=16,
                usage_n=(128, 512), whiten_n=(), long_n=(), ablation_fixed=((2, 64), (8, 16)), ablation_grow=((8, 32),)),
}


@dataclasses.dataclass(frozen=True)
class Arm:
  """One trained model: its name, FFN kind and config overrides (seed excluded)."""

  name: str
  kind: str                         # dense | moe | pkm | peer: what the middle block holds
  overrides: tuple[tuple[str, object], ...] = ()

  def flags(self, scale: str, seed: int) -> list[str]:
    """``--config.FIELD=VALUE`` flags for ``train.py``."""
    return [f"--config.{k}={_flag_value(v)}" for k, v in self.config_items(scale, seed)]

  def config_items(self, scale: str, seed: int) -> list[tuple[str, object]]:
    trunk = TRUNKS[scale]
    items = [(f"{sec}.{k}", v) for sec in ("model", "data", "train", "optim")
             for k, v in trunk[sec].items()]
    items += [("seed", seed), ("data.seed", seed), ("model.sparse_layers", "middle")]
    return items + list(self.overrides)


def _flag_value(v) -> str:
  return str(v).lower() if isinstance(v, bool) else str(v)


def dense() -> Arm:
  return Arm("dense", "dense", (("model.sparse_ffn", "dense"),))


def moe_expert_choice(experts: int) -> Arm:
  # Expert choice ranks a whole sequence's tokens per expert: not causal in a decoder (its
  # training loss may use later tokens of the group); the paper's MoE baseline all the same.
  return Arm(f"moe_ec{experts}", "moe", (
      ("model.sparse_ffn", "moe"), ("moe.router", "expert_choice"),
      ("moe.num_experts", experts), ("moe.capacity_factor_train", 1.0),
      ("moe.capacity_factor_eval", 1.0), ("moe.dispatch", "einsum"),
      ("moe.allow_noncausal", True), ("moe.balance_loss_weight", 0.0),
      # Evaluated as trained (capacity 1, routing over the sequence), as in the paper; the
      # default would give every token to every expert in evaluation, another function.
      ("moe.eval_no_drop", False)))


def moe_top2(experts: int) -> Arm:
  # Half-size experts: two per token cost one dense MLP.
  return Arm(f"moe_top2of{experts}", "moe", (
      ("model.sparse_ffn", "moe"), ("moe.router", "top_k"), ("moe.top_k", 2),
      ("moe.num_experts", experts), ("moe.d_ff", -2), ("moe.dispatch", "dropless")))


def pkm(n: int, h: int, k: int, d_key: int) -> Arm:
  return Arm(f"pkm_n{n}_h{h}k{k}_bn", "pkm", (
      ("model.sparse_ffn", "pkm"), ("pkm.num_keys_sqrt", n), ("pkm.heads", h),
      ("pkm.top_k", k), ("pkm.d_key", d_key), ("pkm.query_norm", "batch")))


def peer(n: int, h: int, k: int, d_key: int, norm: str = "batch", steps_factor: int = 1) -> Arm:
  """``steps_factor``: train this many times the scale's steps (the schedule stretched)."""
  tag = {"batch": "bn", "none": "nonorm", "layer": "ln", "whiten": "white"}[norm]
  longer = () if steps_factor == 1 else (("train.steps", -steps_factor),)
  return Arm(f"peer_n{n}_h{h}k{k}_{tag}" + ("" if steps_factor == 1 else f"_x{steps_factor}"),
             "peer", (("model.sparse_ffn", "peer"), ("peer.num_experts_sqrt", n),
                      ("peer.heads", h), ("peer.top_k", k), ("peer.d_key", d_key),
                      ("peer.query_norm", norm)) + longer)


def resolve(arm: Arm, scale: str) -> Arm:
  """Fills size placeholders that depend on the trunk (``moe.d_ff = -2``: half the dense MLP;
  ``train.steps = -f``: f times the scale's steps)."""
  trunk = TRUNKS[scale]

  def value(k, v):
    if (k, v) == ("moe.d_ff", -2):
      return trunk["model"]["d_ff"] // 2
    if k == "train.steps" and v < 0:
      return -v * trunk["train"]["steps"]
    return v

  items = tuple((k, value(k, v)) for k, v in arm.overrides)
  return dataclasses.replace(arm, overrides=items)


def study(name: str, scale: str) -> list[Arm]:
  """The arms of study ``name`` at ``scale``, sizes resolved."""
  s = SIZES[scale]
  if name == "main":
    arms = [dense(), moe_expert_choice(s["experts"]), moe_top2(s["experts"]),
            pkm(s["n"], s["pkm_h"], s["pkm_k"], s["d_key"]),
            peer(s["n"], s["peer_h"], s["peer_k"], s["d_key"])]
  elif name == "usage":
    # Whitened queries only where they were tried: at the two smallest N they lowered usage
    # and raised the loss (README), so the larger sizes spend no more hours on them.
    arms = [peer(n, s["peer_h"], s["peer_k"], s["d_key"], norm) for n in s["usage_n"]
            for norm in ("batch", "none") + (("whiten",) if n in s["whiten_n"] else ())]
    # Does usage keep rising with training? The main PEER arm trained 4x as long.
    arms += [peer(n, s["peer_h"], s["peer_k"], s["d_key"], steps_factor=4) for n in s["long_n"]]
  elif name == "ablation":
    hk = s["ablation_fixed"] + s["ablation_grow"] + ((s["peer_h"], s["peer_k"]),)
    arms = [peer(s["n"], h, k, s["d_key"]) for h, k in hk]
  else:
    raise ValueError(f"unknown study {name!r} (one of {list(STUDIES)})")
  return list({a.name: resolve(a, scale) for a in arms}.values())   # an arm listed twice runs once


STUDIES = ("main", "usage", "ablation")


def parse_arm_name(name: str) -> dict:
  """``peer_n128_h8k16_bn_x4`` -> {'n': 128, 'h': 8, 'k': 16, 'norm': 'bn', 'steps_factor': 4}."""
  m = re.fullmatch(r"(peer|pkm)_n(\d+)_h(\d+)k(\d+)_([a-z]+)(?:_x(\d+))?", name)
  if not m:
    return {}
  return {"n": int(m.group(2)), "h": int(m.group(3)), "k": int(m.group(4)), "norm": m.group(5),
          "steps_factor": int(m.group(6) or 1)}
