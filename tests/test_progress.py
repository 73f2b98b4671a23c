"""progress.py: the progress line's figures (count, rate, ETA) and its redraw policy on a terminal and
in a log. (That the long commands show it: test_benchmark, test_data's stats CLI, test_builders.)"""

import io

import pytest

import progress
from progress import Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", c)
    return c


def test_count_rate_and_eta(clock):
    log = io.StringIO()
    with Progress(100, "mvbench", "questions", stream=log) as bar:
        clock.now += 10
        bar.update(25)  # the first update draws: 25 in 10 s, 75 to go at 2.5/s = 30 s
        clock.now += 10
        bar.update(25)  # within 30 s of the last line: not drawn in a log
    lines = log.getvalue().splitlines()
    assert lines[0] == "mvbench: 25/100 (25%) | 2.50 questions/s | 0m10s elapsed, eta 0m30s"
    assert lines[1] == "mvbench: 50/100 (50%) | 2.50 questions/s | 0m20s elapsed, eta 0m20s"  # the closing line
    assert len(lines) == 2


def test_a_log_gets_a_line_now_and_then_a_terminal_is_redrawn_in_place(clock):
    log, tty = io.StringIO(), Terminal()
    for stream in (log, tty):
        with Progress(None, "stats", "samples read", stream=stream) as bar:
            for _ in range(100):
                clock.now += 1
                bar.update()
    assert len(log.getvalue().splitlines()) == 5  # at 1 s, then every 30 s: 31, 61, 91; and the end (100)
    assert log.getvalue().splitlines()[-1] == "stats: 100 | 1.00 samples read/s | 1m40s elapsed"
    assert tty.getvalue().count("\r\033[K") == 101 and tty.getvalue().endswith("1m40s elapsed\n")


def test_quiet_draws_nothing_and_hours_read_as_hours(clock):
    out = io.StringIO()
    with Progress(10, "x", stream=out, quiet=True) as bar:
        bar.update(3)
    assert out.getvalue() == "" and bar.done == 3
    assert progress._clock(3 * 3600 + 62) == "3h01m02s" and progress._clock(59.9) == "0m59s"
