"""Every bad or missing flag of generate.py, eval.py, train.py and the compile tool: exit 2 and
one ``error:`` line on stderr naming the flag (subprocesses, run a few at a time). generate.py
and eval.py fail before JAX is imported; train.py and the compile tool after loading the
default config (which imports the layers). Config fields and files of train.py are covered in
tests/test_faults.py, the compile tool's topology and config errors in tests/test_compile.py.

The runs leave ``JAX_PLATFORMS`` unset, as a user's shell does: with libtpu installed and no
TPU attached, a run whose bad input is found after JAX starts (``--config.mesh.data=7``) must
still print that one line only (``moejax.platform_env`` keeps libtpu from starting).
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cases(tmp):
  """(entry point, args, extra env, text the one line must contain)."""
  empty = tmp / "empty"
  empty.mkdir()
  missing = str(tmp / "missing")
  ckpt = f"--checkpoint={empty}"
  return [
      ("generate.py", [], {}, "--checkpoint: required"),
      ("generate.py", [f"--checkpoint={missing}"], {}, f"--checkpoint={missing}: does not exist"),
      ("generate.py", [ckpt], {}, "--checkpoint=" + str(empty) + ": neither an export"),
      ("generate.py", [ckpt, "--max_new_tokens=0"], {}, "--max_new_tokens=0: must be >= 1"),
      ("generate.py", [ckpt, "--top_k=-1"], {}, "--top_k=-1: must be >= 0"),
      ("generate.py", [ckpt, "--top_k=many"], {}, "--top_k='many': must be int"),
      ("generate.py", [ckpt, "--top_p=0"], {}, "--top_p=0.0: must be in (0, 1]"),
      ("generate.py", [ckpt, "--top_p=1.5"], {}, "--top_p=1.5: must be in (0, 1]"),
      ("generate.py", [ckpt, "--temperature=-1"], {}, "--temperature=-1.0: must be >= 0"),
      ("generate.py", [ckpt, f"--prompts_file={missing}"], {},
       f"--prompts_file={missing}: does not exist"),
      ("generate.py", [ckpt, f"--prompts={missing}"], {}, f"--prompts_file={missing}: does not exist"),
      ("generate.py", [ckpt, "--batch_size=0"], {}, "--batch_size=0: must be >= 1"),
      ("generate.py", [ckpt, "--batch_size=two"], {}, "--batch_size='two': must be int"),
      ("generate.py", [ckpt, "--promt=x"], {}, "--promt: unknown flag (did you mean --prompt?)"),
      ("eval.py", [], {}, "--checkpoint: required"),
      ("eval.py", [f"--checkpoint={missing}"], {}, f"--checkpoint={missing}: does not exist"),
      ("eval.py", [ckpt], {}, "neither an export"),
      ("eval.py", [ckpt, "--max_batches=-2"], {}, "--max_batches=-2: must be -1"),
      ("eval.py", [ckpt, "--dataset=a,,b"], {}, "--dataset='a,,b': an empty name"),
      ("eval.py", [ckpt, "--json=maybe"], {}, "--json='maybe': must be bool"),
      ("train.py", ["--num_processes=2"], {}, "--num_processes=2: needs --coordinator"),
      ("train.py", ["--coordinator=localhost:1", "--num_processes=2", "--process_id=2"], {},
       "--process_id=2: must be in [0, 2)"),
      # After JAX has started: the CPU kernels required but no compiler, a mesh too large.
      ("train.py", ["--config.train.steps=1"],
       {"CXX": "/nonexistent", "MOEJAX_CPU_KERNELS": "1", "MOEJAX_CACHE_DIR": str(tmp / "cache")},
       "error: MOEJAX_CPU_KERNELS=1: "),
      ("train.py", ["--config.train.steps=1"], {"MOEJAX_CPU_KERNELS_OFF": "topk,atention"},
       "error: MOEJAX_CPU_KERNELS_OFF='topk,atention': unknown kernel group 'atention' (valid: "),
      ("train.py", ["--config.mesh.data=7"], {}, "config.mesh.data=7"),
      ("-m moejax.compile", ["--topolgy=v5e:2x2"], {}, "--topolgy: unknown flag (did you mean "
                                                      "--topology?)"),
      ("-m moejax.compile", [f"--json={missing}/r.json"], {}, f"--json={missing}/r.json: its "
                                                             "directory does not exist"),
  ]


def test_bad_flags_are_one_error_line_naming_the_flag_exit_2(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  cases, procs, outputs = _cases(tmp_path), [], {}
  for i, (entry, args, extra, _) in enumerate(cases):
    workdir = tmp_path / f"wd{i}"
    cmd = [sys.executable, *entry.split()] if entry.startswith("-m") else [
        sys.executable, os.path.join(ROOT, entry)]
    if entry == "train.py":
      args = [*args, f"--workdir={workdir}"]
    procs.append((workdir, subprocess.Popen([*cmd, *args], cwd=ROOT, env={**env, **extra},
                                            text=True, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE)))
    if sum(p.poll() is None for _, p in procs) >= 4:
      outputs[len(procs) - 4] = procs[-4][1].communicate(timeout=300)   # reads its pipes: no deadlock
  failures = []
  for i, ((workdir, proc), (entry, args, _, want)) in enumerate(zip(procs, cases)):
    _, err = outputs[i] if i in outputs else proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    if not (proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
            and want in lines[0]):
      failures.append(f"{entry} {args}: rc={proc.returncode} stderr={err[-1500:]!r}")
    elif workdir.exists():
      failures.append(f"{entry} {args}: wrote {os.listdir(workdir)}")
  assert not failures, "\n".join(failures)
