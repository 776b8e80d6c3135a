"""How often a training run draws its curve (at most once a minute on the way, always at its end or stop) and
saves its state between its fixed saves (first a save interval after the start)."""

from __future__ import annotations

from hybridmim import curves
from hybridmim.training import schedule


def test_the_curve_is_redrawn_a_minute_after_the_last_drawing_and_always_at_the_end(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(schedule.time, "monotonic", lambda: now[0])
    clock = schedule.Interval(curves.REDRAW_SECONDS)
    said = []
    for seconds, final in ((0, False), (30, False), (59.9, False), (60, False), (61, False), (62, True),
                           (63, True), (100, False), (122.9, False), (123, False)):
        now[0] = 1000.0 + seconds
        said.append(clock.due(final))
    # the first drawing at once; then a minute after the last one, whatever was asked between; the end always
    assert said == [True, False, False, True, False, True, True, False, False, True]


def test_a_state_is_first_saved_an_interval_after_the_start_then_an_interval_after_any_save(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(schedule.time, "monotonic", lambda: now[0])
    clock = schedule.Interval(600.0, at_once=False)
    said = []
    for seconds, epoch_end in ((1, False), (599, False), (600, False), (700, True), (1299, False), (1300, False)):
        now[0] = 1000.0 + seconds
        said.append(clock.due(epoch_end))
    assert said == [False, False, True, True, False, True]
