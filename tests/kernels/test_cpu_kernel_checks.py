"""Every FFI handler of the C++ CPU kernels (cpu_kernels.cc, cpu_attention.cc, cpu_decode.cc) rejects
operands whose rank, shape or dtype do not fit the others, and repeated rows in the Adam
kernels, with an exception: each is called here through ``jax.ffi.ffi_call`` directly,
past the Python wrappers' own checks. A handler that trusted its operands would read or
write out of bounds (a crash, or silently wrong numbers) instead.

Each case is a valid call (run first: it must succeed) and variants of it, each one
operand or result changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
import pytest

from moejax.backends.cpu import native as cpu_kernels

F32, S32, U8 = np.float32, np.int32, np.uint8


def _z(*shape, dtype=F32):
  return np.zeros(shape, dtype)


def _out(*shape, dtype=F32):
  return jax.ShapeDtypeStruct(shape, dtype)


@dataclasses.dataclass
class Case:
  target: str
  args: list[np.ndarray]
  results: list[jax.ShapeDtypeStruct] | None   # None: those of the aliased args 0-2
  attrs: dict = dataclasses.field(default_factory=dict)
  aliased: bool = False   # outputs alias args 0-2 (the Adam kernels, in place)

  def call(self, args=None, results=None, aliased=None):
    args = self.args if args is None else args
    aliased = self.aliased if aliased is None else aliased
    if results is None:
      results = self.results or [_out(*a.shape, dtype=a.dtype) for a in args[:3]]
    call = jax.ffi.ffi_call(self.target, results,
                            input_output_aliases={0: 0, 1: 1, 2: 2} if aliased else None)
    return jax.block_until_ready(call(*args, **self.attrs))

  def with_arg(self, i, value):
    return [value if j == i else a for j, a in enumerate(self.args)]

  def with_result(self, i, value):
    return [value if j == i else r for j, r in enumerate(self.results)]


def _hyper():
  return np.array([1e-3, 0.9, 0.1, 0.999, 0.001, 1e-8, 0.1, 0.001, 1.0], F32)


def _cases() -> dict[str, tuple[Case, list[tuple[str, Callable[[Case], object]]]]]:
  """name -> (valid case, [(what is wrong, call that must raise)])."""
  rows = np.array([5, 0, 2, 9, 3], S32)   # 9: padding (N = 6), skipped
  q = np.random.default_rng(0).normal(size=(2, 8, 2, 4)).astype(F32)
  rope = [_z(1, 8, 2), np.ones((1, 8, 2), F32)]
  bias = _z(1, 8, 8)
  attn_fwd = Case(cpu_kernels.ATTENTION_FWD, [q, q, q, bias, *rope],
                  [_out(2, 8, 2, 4), _out(2, 2, 8)], {"rotate": np.bool_(True)})
  attn_bwd = Case(cpu_kernels.ATTENTION_BWD, [q, q, q, bias, *rope, q, _z(2, 2, 8), q],
                  [_out(2, 8, 2, 4)] * 3, {"rotate": np.bool_(True)})
  routed = Case(cpu_kernels.ROUTED_FFN,
                [_z(3, 4), np.array([[0, 4], [2, 5], [-1, 1]], S32), _z(3, 2), _z(5, 4, 6),
                 _z(5, 4, 6), _z(5, 6, 4)], [_out(3, 4)],
                attrs={"activation": np.int64(3), "gated": np.bool_(True)})
  attend = Case(cpu_kernels.CACHED_ATTENTION,
                [_z(2, 1, 4, 8), _z(2, 5, 2, 8), _z(2, 5, 2, 8), _z(2, 1, 5, dtype=U8)],
                [_out(2, 1, 4, 8)])
  cases = {
      "top_k": (Case(cpu_kernels.TOPK, [_z(3, 10)], [_out(3, 4), _out(3, 4, dtype=S32)]), [
          ("values' leading dims", lambda c: c.call(results=c.with_result(0, _out(2, 4)))),
          ("indices' shape", lambda c: c.call(results=c.with_result(1, _out(3, 5, dtype=S32)))),
          ("values' rank", lambda c: c.call(results=[_out(4), _out(4, dtype=S32)])),
          ("k > n", lambda c: c.call(results=[_out(3, 11), _out(3, 11, dtype=S32)])),
          ("x rank 0", lambda c: c.call(args=[_z()], results=[_out(1), _out(1, dtype=S32)])),
      ]),
      "gather_dot": (Case(cpu_kernels.GATHER_DOT, [_z(6, 4), _z(5, 3, dtype=S32), _z(5, 4)],
                          [_out(5, 3)]), [
          ("x width", lambda c: c.call(args=c.with_arg(2, _z(5, 8)))),
          ("x rows", lambda c: c.call(args=c.with_arg(2, _z(4, 4)))),
          ("out shape", lambda c: c.call(results=[_out(5, 2)])),
          ("indices rank", lambda c: c.call(args=c.with_arg(1, _z(15, dtype=S32)))),
          ("table rank", lambda c: c.call(args=c.with_arg(0, _z(6, 4, 1)))),
      ]),
      "gather_weighted_sum": (Case(cpu_kernels.GATHER_WEIGHTED_SUM,
                                   [_z(6, 4), _z(5, 3, dtype=S32), _z(5, 3)], [_out(5, 4)]), [
          ("w shape", lambda c: c.call(args=c.with_arg(2, _z(5, 2)))),
          ("w rows", lambda c: c.call(args=c.with_arg(2, _z(4, 3)))),
          ("out width", lambda c: c.call(results=[_out(5, 5)])),
          ("out rows", lambda c: c.call(results=[_out(4, 4)])),
      ]),
      "scatter_outer": (Case(cpu_kernels.SCATTER_OUTER, [_z(5, 3, dtype=S32), _z(5, 3), _z(5, 4)],
                             [_out(7, 4)]), [
          ("coef shape (same size)", lambda c: c.call(args=c.with_arg(1, _z(3, 5)))),
          ("vec width", lambda c: c.call(args=c.with_arg(2, _z(5, 3)))),
          ("vec rows", lambda c: c.call(args=c.with_arg(2, _z(4, 4)))),
          ("targets rank", lambda c: c.call(args=c.with_arg(0, _z(15, dtype=S32)))),
          ("out rank", lambda c: c.call(results=[_out(28)])),
      ]),
      "scatter_outer_pair": (Case(cpu_kernels.SCATTER_OUTER_PAIR,
                                  [_z(5, 3, dtype=S32), _z(5, 3), _z(5, 4), _z(5, 3), _z(5, 2)],
                                  [_out(7, 4), _out(7, 2)]), [
          ("out2 rows", lambda c: c.call(results=c.with_result(1, _out(6, 2)))),
          ("vec2 width", lambda c: c.call(args=c.with_arg(4, _z(5, 3)))),
          ("coef2 shape", lambda c: c.call(args=c.with_arg(3, _z(5, 2)))),
          ("vec1 rows", lambda c: c.call(args=c.with_arg(2, _z(6, 4)))),
      ]),
      "adam_rows": (Case(cpu_kernels.ADAM_ROWS,
                         [_z(6, 4), _z(6, 4), _z(6, 4), rows, _z(5, 4), _hyper()], None,
                         aliased=True), [
          ("mu width", lambda c: c.call(args=c.with_arg(1, _z(6, 3)))),
          ("nu rows", lambda c: c.call(args=c.with_arg(2, _z(5, 4)))),
          ("grads width", lambda c: c.call(args=c.with_arg(4, _z(5, 8)))),
          ("grads rows", lambda c: c.call(args=c.with_arg(4, _z(4, 4)))),
          ("hyper size", lambda c: c.call(args=c.with_arg(5, _z(8)))),
          ("rows rank", lambda c: c.call(args=c.with_arg(3, rows[:, None]))),
          ("table rank", lambda c: c.call(args=[_z(24)] * 3 + c.args[3:])),
          ("repeated row", lambda c: c.call(args=c.with_arg(3, np.array([1, 2, 9, 1, 3], S32)))),
          ("outputs not aliased", lambda c: c.call(aliased=False)),
      ]),
      "sum_squares_rows": (Case(cpu_kernels.SUM_SQUARES_ROWS, [rows, _z(5, 4)], [_out()],
                                {"num_rows": np.int64(6)}), [
          ("rows size", lambda c: c.call(args=c.with_arg(0, rows[:4]))),
          ("g rank", lambda c: c.call(args=c.with_arg(1, _z(20)))),
          ("out shape", lambda c: c.call(results=[_out(1)])),
      ]),
      "routed_ffn": (routed, [
          ("x width", lambda c: c.call(args=c.with_arg(0, _z(3, 5)))),
          ("expert rows", lambda c: c.call(args=c.with_arg(1, _z(2, 2, dtype=S32)))),
          ("w shape", lambda c: c.call(args=c.with_arg(2, _z(3, 3)))),
          ("wi rank", lambda c: c.call(args=c.with_arg(3, _z(5, 24)))),
          ("wg shape", lambda c: c.call(args=c.with_arg(4, _z(5, 4, 7)))),
          ("wo shape", lambda c: c.call(args=c.with_arg(5, _z(5, 4, 6)))),
          ("y shape", lambda c: c.call(results=[_out(3, 5)])),
          ("activation code",
           lambda c: dataclasses.replace(c, attrs={**c.attrs, "activation": np.int64(9)}).call()),
      ]),
      "few_row_matmul": (Case(cpu_kernels.FEW_ROW_MATMUL, [_z(3, 4), _z(4, 6)], [_out(3, 6)]), [
          ("w rows", lambda c: c.call(args=c.with_arg(1, _z(5, 6)))),
          ("x rank", lambda c: c.call(args=c.with_arg(0, _z(12)))),
          ("y shape", lambda c: c.call(results=[_out(3, 5)])),
      ]),
      "cached_attention": (attend, [
          ("v slots", lambda c: c.call(args=c.with_arg(2, _z(2, 6, 2, 8)))),
          ("mask slots", lambda c: c.call(args=c.with_arg(3, _z(2, 1, 6, dtype=U8)))),
          ("heads not a multiple of the KV heads",
           lambda c: c.call(args=[c.args[0], _z(2, 5, 3, 8), _z(2, 5, 3, 8), c.args[3]])),
          ("q rank", lambda c: c.call(args=c.with_arg(0, _z(2, 4, 8)))),
          ("out shape", lambda c: c.call(results=[_out(2, 1, 4, 7)])),
      ]),
      "attention_fwd": (attn_fwd, [
          ("v length", lambda c: c.call(args=c.with_arg(2, q[:, :7]))),
          ("k heads", lambda c: c.call(args=c.with_arg(1, _z(2, 8, 3, 4)))),
          ("bias keys", lambda c: c.call(args=c.with_arg(3, _z(1, 8, 7)))),
          ("bias batch", lambda c: c.call(args=c.with_arg(3, _z(3, 8, 8)))),
          ("q rank", lambda c: c.call(args=c.with_arg(0, q.reshape(2, 8, 8)))),
          ("sin width", lambda c: c.call(args=c.with_arg(4, _z(1, 8, 3)))),
          ("cos vs sin", lambda c: c.call(args=c.with_arg(5, _z(2, 8, 2)))),
          ("o shape", lambda c: c.call(results=c.with_result(0, _out(2, 8, 2, 5)))),
          ("lse shape (same size)", lambda c: c.call(results=c.with_result(1, _out(2, 8, 2)))),
      ]),
      "attention_bwd": (attn_bwd, [
          ("do shape (same size)", lambda c: c.call(args=c.with_arg(8, q.reshape(2, 2, 8, 4)))),
          ("o shape (same size)", lambda c: c.call(args=c.with_arg(6, q.reshape(8, 2, 2, 4)))),
          ("lse shape (same size)", lambda c: c.call(args=c.with_arg(7, _z(2, 16)))),
          ("dk shape", lambda c: c.call(results=c.with_result(1, _out(2, 8, 2, 5)))),
          ("dq shape", lambda c: c.call(results=c.with_result(0, _out(2, 7, 2, 4)))),
          ("sin length", lambda c: c.call(args=c.with_arg(4, _z(1, 7, 2)))),
      ]),
  }
  return cases


CASES = _cases()
BAD = [(name, what) for name, (_, bad) in CASES.items() for what, _ in bad]


@pytest.fixture(scope="module", autouse=True)
def _kernels():
  assert cpu_kernels.available(), "the C++ CPU kernels did not build"


def test_every_handler_is_covered():
  assert {c.target for c, _ in CASES.values()} == set(cpu_kernels._SYMBOLS)


@pytest.mark.parametrize("name", list(CASES))
def test_the_valid_call_runs(name):
  CASES[name][0].call()


@pytest.mark.parametrize("name,what", BAD)
def test_a_wrong_shape_or_repeated_row_is_an_exception(name, what):
  case, bad = CASES[name]
  run = dict(bad)[what]
  # JAX raises the handler's INVALID_ARGUMENT as a JaxRuntimeError or a ValueError
  with pytest.raises((jax.errors.JaxRuntimeError, ValueError),
                     match=rf"INVALID_ARGUMENT: moejax {name.removesuffix('_fwd')}: "):
    run(case)


def _swapped(a: np.ndarray) -> np.ndarray:
  return a.astype(S32 if a.dtype == F32 else F32)


@pytest.mark.parametrize("name", list(CASES))
def test_a_wrong_dtype_is_an_exception(name):
  """Each operand in turn, and each result, in the other dtype (float32 <-> int32)."""
  case, _ = CASES[name]
  for i, a in enumerate(case.args):
    with pytest.raises(jax.errors.JaxRuntimeError, match="Wrong buffer dtype"):
      case.call(args=case.with_arg(i, _swapped(a)))
  for i, r in enumerate(case.results or ()):
    with pytest.raises(jax.errors.JaxRuntimeError, match="Wrong buffer dtype"):
      case.call(results=case.with_result(i, _out(*r.shape, dtype=S32 if r.dtype == F32 else F32)))


def test_attention_without_rotation_ignores_sin_and_cos():
  """rotate=False: sin, cos are placeholders the kernel never reads (the wrapper passes
  [1, 1, 1] zeros), so their shape is not checked."""
  case = CASES["attention_fwd"][0]
  args = case.with_arg(4, _z(1, 1, 1))
  args[5] = _z(1, 1, 1)
  jax.ffi.ffi_call(case.target, case.results)(*args, rotate=np.bool_(False))
