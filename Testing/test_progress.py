"""The JSON-lines progress protocol: what the engine writes, the module can parse."""

from __future__ import annotations

import io
import json
import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybridmim.progress import EVENTS, Reporter, encode_event, parse_event


def test_reporter_json_lines_round_trip():
    out = io.StringIO()
    reporter = Reporter("json", out)
    reporter.stage("inference")
    reporter.progress(3, 8)
    reporter.metric(epoch=2, loss=0.5, dice=float("nan"))
    reporter.warning("careful")
    reporter.done({"segmentation": "a.seg.nrrd"})
    events = [parse_event(line) for line in out.getvalue().splitlines()]
    assert events == [
        {"event": "stage", "name": "inference"},
        {"event": "progress", "stage": "inference", "done": 3, "total": 8},
        {"event": "metric", "epoch": 2, "loss": 0.5, "dice": None},
        {"event": "message", "level": "warning", "text": "careful"},
        {"event": "done", "outputs": {"segmentation": "a.seg.nrrd"}},
    ]


def test_non_protocol_lines_are_ignored():
    for line in ("", "plain text", "{not json", '{"event": "unknown"}', "[1, 2]", '{"no": "event"}'):
        assert parse_event(line) is None


def test_unknown_event_cannot_be_encoded():
    with pytest.raises(ValueError):
        encode_event("finished")


def test_tqdm_mode_writes_nothing_protocol_like_to_stdout(capsys):
    reporter = Reporter("tqdm")
    reporter.stage("x")
    reporter.progress(1, 2)
    reporter.info("hello")
    captured = capsys.readouterr()
    assert captured.out == "" and "hello" in captured.err


def test_a_bar_counts_its_rate_from_where_it_starts():
    """A resumed run's bar starts at its step, and one whose total a time limit changed at the step reached: the
    steps done before took none of its time (counted, they made a rate of thousands of steps a second)."""
    stream = io.StringIO()
    reporter = Reporter("tqdm", stream)
    reporter.stage("pre-train")
    reporter.progress(500, 1000)  # resumed at step 500
    time.sleep(0.3)
    reporter.progress(501, 1000)
    time.sleep(0.3)
    reporter.progress(502, 1000)
    reporter.progress(502, 502)  # a time limit fitted the run to the steps done
    lines = stream.getvalue().split("\r")
    rates = [float(rate) for rate in re.findall(r"([0-9.]+)it/s", stream.getvalue())]
    assert rates and all(rate < 10 for rate in rates), lines  # about 3 steps a second
    assert lines[-1].strip() == "pre-train: 100%|##########| 502/502 [00:00<?, ?it/s]"


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)


@given(st.sampled_from(EVENTS), st.dictionaries(st.text().filter(lambda k: k != "event"), _json_values, max_size=5))
def test_any_encoded_event_parses_back(event, fields):
    line = encode_event(event, **fields)
    assert "\n" not in line
    parsed = parse_event(line)
    assert parsed["event"] == event
    assert set(parsed) == {"event", *fields}


@given(st.text())
def test_parser_never_raises_on_arbitrary_text(text):
    result = parse_event(text)
    assert result is None or result["event"] in EVENTS
    if result is not None:
        json.dumps(result)
