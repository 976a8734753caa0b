"""platform_env: libtpu is kept from starting only where no TPU is attached (fake /dev, /sys, env)."""

import os

import pytest

from moejax import platform_env


def _machine(tmp_path, dev_files=(), pci=()):
  """A fake /dev holding ``dev_files`` and a /sys whose PCI bus holds (vendor, device) pairs."""
  dev, sys_root = tmp_path / "dev", tmp_path / "sys"
  dev.mkdir(parents=True)
  for name in dev_files:
    (dev / name).parent.mkdir(parents=True, exist_ok=True)
    (dev / name).write_text("")
  for i, (vendor, device) in enumerate(pci):
    d = sys_root / "bus" / "pci" / "devices" / f"0000:00:0{i}.0"
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")
  return str(dev), str(sys_root)


def _decide(tmp_path, env=None, libtpu=True, cuda_plugin=False, **machine):
  dev, sys_root = _machine(tmp_path, **machine)
  return platform_env.platforms_without_tpu(env or {}, dev, sys_root, libtpu=libtpu,
                                            cuda_plugin=cuda_plugin)


def test_cpu_machine_with_libtpu_skips_tpu(tmp_path):
  # /dev/vfio/vfio (the vfio control file) and Google's network card are on CPU VMs too.
  assert _decide(tmp_path, dev_files=["vfio/vfio", "null"], pci=[("0x1ae0", "0x0042"),
                                                                 ("0x8086", "0x1237")]) == "cpu"


def test_gpu_machine_keeps_cuda(tmp_path):
  assert _decide(tmp_path, dev_files=["nvidia0", "nvidiactl"], cuda_plugin=True) == "cuda,cpu"
  # A GPU without JAX's CUDA plugin: JAX would run on the CPU anyway.
  assert _decide(tmp_path / "b", dev_files=["nvidia0"], cuda_plugin=False) == "cpu"


@pytest.mark.parametrize("machine", [
    {"dev_files": ["accel0", "accel1"]},                        # TPU v4 VM
    {"dev_files": ["vfio/vfio", "vfio/0", "vfio/1"]},           # TPU v5e / v6e VM
    {"pci": [("0x1ae0", "0x0062")]},                            # a v5p chip on the PCI bus
    {"env": {"TPU_ACCELERATOR_TYPE": "v5p-8"}},
    {"env": {"TPU_WORKER_ID": "0"}},
], ids=["accel", "vfio", "pci", "accelerator_type", "worker_id"])
def test_tpu_vm_is_left_alone(tmp_path, machine):
  assert _decide(tmp_path, **machine) is None


def test_user_choice_and_no_libtpu_are_left_alone(tmp_path):
  assert _decide(tmp_path, env={"JAX_PLATFORMS": "tpu"}) is None
  assert _decide(tmp_path / "b", env={"JAX_PLATFORMS": ""}) is None   # '' = JAX chooses
  assert _decide(tmp_path / "c", libtpu=False) is None


def test_skip_absent_tpu_sets_jax_platforms(tmp_path, monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(platform_env, "platforms_without_tpu", lambda: "cpu")
  assert platform_env.skip_absent_tpu() == "cpu"
  assert os.environ["JAX_PLATFORMS"] == "cpu"
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  monkeypatch.setattr(platform_env, "platforms_without_tpu", lambda: None)
  assert platform_env.skip_absent_tpu() is None
  assert os.environ["JAX_PLATFORMS"] == "tpu"
