"""When a training run redraws its curve: at most once a minute on the way, always at its end or stop."""

from __future__ import annotations

from hybridmim import curves


def test_the_curve_is_redrawn_a_minute_after_the_last_drawing_and_always_at_the_end(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(curves.time, "monotonic", lambda: now[0])
    clock = curves.RedrawClock()
    said = []
    for seconds, final in ((0, False), (30, False), (59.9, False), (60, False), (61, False), (62, True),
                           (63, True), (100, False), (122.9, False), (123, False)):
        now[0] = 1000.0 + seconds
        said.append(clock.due(final))
    # the first drawing at once; then a minute after the last one, whatever was asked between; the end always
    assert said == [True, False, False, True, False, True, True, False, False, True]
