"""Keep libtpu from starting on a machine with no TPU attached (set before JAX is imported).

With libtpu installed (the ``test`` and ``tpu`` extras install it), JAX loads it at its first
computation on any machine, and on one without a TPU libtpu prints its start-up log (host
bounds, InitGoogle, "unexpected worker hostname", a source location trace) before anything else.
:func:`skip_absent_tpu` (called first by ``train.py``, ``eval.py`` and ``generate.py``) sets
``JAX_PLATFORMS`` to the platforms other than TPU when no TPU is attached, so JAX never loads
libtpu there. It leaves everything as it is when:

* the user set ``JAX_PLATFORMS`` (even to ``''``): their choice stands;
* a TPU may be attached: ``/dev/accel*`` (TPU v2-v4), numbered ``/dev/vfio/`` groups (v5e and
  newer), a Google TPU on the PCI bus, or the TPU environment of a Cloud TPU VM or pod
  (``TPU_ACCELERATOR_TYPE``, ``TPU_WORKER_ID``, ...): a TPU VM is unaffected;
* libtpu is not installed: JAX would not load it anyway.

The compile tool (``python -m moejax.compile``) does not use this: it loads libtpu for TPU
topologies as a compile target, with ``JAX_PLATFORMS=cpu`` and libtpu's logs silenced.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Mapping

# Variables a Cloud TPU VM, a TPU pod worker or a user pointing JAX at a TPU set.
TPU_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES", "TPU_CHIPS_PER_HOST_BOUNDS",
           "TPU_HOST_BOUNDS", "TPU_VISIBLE_CHIPS", "TPU_PROCESS_BOUNDS", "CLOUD_TPU_TASK_ID",
           "TPU_NAME", "JAX_FORCE_TPU_INIT")
# Google's PCI vendor id and the device ids of its TPU chips (v3, v4, v5p, v5e, v6e, TPU7x
# and one unnamed), as JAX's own hardware check lists them. Google's network card (gVNIC) has
# the same vendor id, so the device id must match too.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")
_NVIDIA_DEVICES = ("nvidia0", "nvidiactl", "dxg")


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""


def tpu_attached(env: Mapping[str, str] = os.environ, dev: str = "/dev",
                 sys_root: str = "/sys") -> bool:
  """True when a TPU may be attached to this machine (device files, PCI ids or TPU env)."""
  if any(env.get(name) for name in TPU_ENV):
    return True
  if glob.glob(os.path.join(dev, "accel*")) or glob.glob(os.path.join(dev, "vfio", "[0-9]*")):
    return True
  for vendor in glob.glob(os.path.join(sys_root, "bus", "pci", "devices", "*", "vendor")):
    if (_read(vendor) == _GOOGLE_PCI_VENDOR
        and _read(os.path.join(os.path.dirname(vendor), "device")) in _TPU_PCI_DEVICES):
      return True
  return False


def _cuda_plugin_installed() -> bool:
  for name in ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"):
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except (ImportError, ValueError):
      pass
  return False


def libtpu_installed(env: Mapping[str, str] = os.environ) -> bool:
  return bool(env.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None


def platforms_without_tpu(env: Mapping[str, str] = os.environ, dev: str = "/dev",
                          sys_root: str = "/sys", *, libtpu: bool | None = None,
                          cuda_plugin: bool | None = None) -> str | None:
  """The ``JAX_PLATFORMS`` value that keeps libtpu from starting, or None to leave it unset.

  None when the user set ``JAX_PLATFORMS``, a TPU may be attached, or libtpu is not installed
  (``libtpu``: whether it is, found out when None). Otherwise ``"cpu"``, or ``"cuda,cpu"``
  where an NVIDIA GPU is visible and JAX's CUDA plugin is installed (``cuda_plugin``).
  """
  if "JAX_PLATFORMS" in env or tpu_attached(env, dev, sys_root):
    return None
  if not (libtpu_installed(env) if libtpu is None else libtpu):
    return None
  gpu = any(os.path.exists(os.path.join(dev, d)) for d in _NVIDIA_DEVICES)
  if gpu and (_cuda_plugin_installed() if cuda_plugin is None else cuda_plugin):
    return "cuda,cpu"
  return "cpu"


def skip_absent_tpu() -> str | None:
  """Sets ``JAX_PLATFORMS`` per :func:`platforms_without_tpu`; returns what it set (or None).

  Must run before JAX is imported (JAX reads ``JAX_PLATFORMS`` at import).
  """
  platforms = platforms_without_tpu()
  if platforms is not None:
    os.environ["JAX_PLATFORMS"] = platforms
  return platforms
