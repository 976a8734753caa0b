"""Hugging Face checkpoints in and out of moejax (``moejax.interop.hf``).

    python -m moejax.convert --from_hf HF_DIR --workdir OUT [--scan_layers]
        HF_DIR (config.json + *.safetensors) -> OUT/export (a moejax export that eval.py and
        generate.py read) and OUT/config.py (train.py --config OUT/config.py fine-tunes it).
    python -m moejax.convert --to_hf EXPORT_DIR OUT_DIR [--max_shard_size 2GiB]
        a moejax export -> OUT_DIR/config.json + generation_config.json + model.safetensors
        (shards of at most --max_shard_size and model.safetensors.index.json when larger),
        for transformers.AutoModelForCausalLM.from_pretrained.

The special token ids (bos / eos / pad) of HF_DIR's config.json and generation_config.json
go into the export's config (``special_tokens``) and back out with --to_hf. A bad input (not
a checkpoint, an unsupported architecture or option, a tensor of the wrong shape or with no
place, a missing shard, an output that exists) is one ``error:`` line on stderr and exit 2;
nothing is written and no existing file is touched (outputs are never overwritten: pass a
new OUT / OUT_DIR).
"""

from __future__ import annotations

import argparse
import sys

from moejax.errors import EXIT_BAD_INPUT, CheckpointError, ConfigError


def _fail(message: str) -> None:
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  raise SystemExit(EXIT_BAD_INPUT)


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    _fail(f"{message} (see python -m moejax.convert --help)")


def main(argv: list[str] | None = None) -> int:
  p = _Parser(prog="python -m moejax.convert", description=__doc__.split("\n\n")[0])
  p.add_argument("--from_hf", metavar="HF_DIR", help="import this Hugging Face checkpoint")
  p.add_argument("--workdir", metavar="OUT", help="with --from_hf: write OUT/export, OUT/config.py")
  p.add_argument("--scan_layers", action="store_true",
                 help="with --from_hf: the scanned layout (model.scan_layers=true)")
  p.add_argument("--to_hf", nargs=2, metavar=("EXPORT_DIR", "OUT_DIR"),
                 help="export a moejax export as a Hugging Face checkpoint")
  p.add_argument("--max_shard_size", metavar="SIZE", default=None,
                 help="with --to_hf: the largest safetensors file, e.g. 5GB, 500MiB or bytes "
                      "(default 2GiB); past it the tensors go to shards and an index")
  args = p.parse_args(argv)
  if bool(args.from_hf) == bool(args.to_hf):
    _fail("give exactly one of --from_hf HF_DIR --workdir OUT and --to_hf EXPORT_DIR OUT_DIR")
  if args.from_hf and not args.workdir:
    _fail("--from_hf needs --workdir OUT (where the export goes)")
  if args.to_hf and (args.workdir or args.scan_layers):
    _fail("--workdir and --scan_layers go with --from_hf, not --to_hf")
  if args.from_hf and args.max_shard_size is not None:
    _fail("--max_shard_size goes with --to_hf, not --from_hf")
  from moejax import platform_env
  platform_env.skip_absent_tpu()   # before JAX is imported: no libtpu start-up lines without a TPU
  from moejax.interop import hf
  max_shard_bytes = hf.MAX_SHARD_BYTES
  if args.max_shard_size is not None:
    try:
      max_shard_bytes = hf.parse_size(args.max_shard_size)
    except ValueError as e:
      _fail(f"--max_shard_size={args.max_shard_size}: {e}")
  try:
    if args.from_hf:
      config = hf.import_checkpoint(args.from_hf, args.workdir, scan_layers=args.scan_layers)
      m = config.model
      print(f"imported {args.from_hf} -> {args.workdir}/export ({m.num_layers} blocks, "
            f"d_model {m.d_model}); fine-tune with: python train.py --config "
            f"{args.workdir}/config.py --workdir RUN_DIR")
    else:
      files = hf.export_checkpoint(*args.to_hf, max_shard_bytes=max_shard_bytes)
      print(f"exported {args.to_hf[0]} -> {args.to_hf[1]}: {', '.join(files)}")
  except (ConfigError, CheckpointError) as e:
    _fail(str(e))
  return 0


if __name__ == "__main__":
  sys.exit(main())
