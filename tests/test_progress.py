"""The progress bar: "compiling…" until the first step ends; rate and ETA from then on only."""

import io

import pytest
import tqdm.std

from moejax.training.writers import Progress


@pytest.fixture
def clock(monkeypatch):
  """tqdm's clock, moved by hand (seconds)."""
  now = [1000.0]
  monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
  return now


def _text(progress) -> str:
  return str(progress.bar)


def test_rate_and_eta_exclude_the_first_step(clock, monkeypatch):
  monkeypatch.setattr("sys.stderr", io.StringIO())
  p = Progress(total=300, initial=0, enabled=True)
  assert _text(p).startswith("compiling… (step 0/300)")
  clock[0] += 30.0          # the first step: compile, kernel build
  p.started(1)
  clock[0] += 9 * 0.4       # steps 2..10 at 0.4 s each
  p.update(9, loss=3.7)
  assert p.bar.n == 10
  text = _text(p)
  assert "2.50step/s" in text or "0.40s/step" in text, text
  # Elapsed 3.6 s, ETA 290 steps at 0.4 s = 01:56 (counting the first step: ~16 min).
  assert "[00:03<01:5" in text, text   # 01:55 or 01:56 by float rounding
  clock[0] += 290 * 0.4
  p.update(290)
  assert p.bar is None      # closed at the last step: the final save is not in its rate
  p.close()


def test_a_resumed_run_starts_at_its_step(clock, monkeypatch):
  monkeypatch.setattr("sys.stderr", io.StringIO())
  p = Progress(total=300, initial=100, enabled=True)
  assert _text(p).startswith("compiling… (step 100/300)")
  clock[0] += 20.0
  p.started(101)
  assert p.bar.n == 101 and p.bar.initial == 101
  p.started(102)            # only the first call counts
  assert p.bar.n == 101
  p.close()


def test_disabled_bar_is_a_no_op():
  p = Progress(total=10, initial=0, enabled=False)
  p.started(1)
  p.update(1)
  assert p.bar is None
  p.close()
