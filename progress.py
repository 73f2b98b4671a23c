"""A progress line for long loops (benchmark items, shard building, dataset stats): count, total,
rate and ETA on stderr - redrawn in place on a terminal, a new line now and then in a log file."""

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """`with Progress(total, "mvbench", "q") as bar: ... bar.update(n)`. total None: no ETA. Draws at
    most every `every` seconds (0.5 on a terminal, 30 in a log, where each draw is a line of its own)
    and once at the end; never when quiet."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", stream=None, every: float | None = None,
                 quiet: bool = False):
        self.total, self.desc, self.unit, self.quiet = total, desc, unit, quiet
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every = every if every is not None else (0.5 if self.tty else 30.0)
        self.done, self.start, self.drawn, self.drawn_done = 0, time.perf_counter(), None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.drawn_done != self.done or self.tty:  # the last figures, unless a log line already has them
            self.draw(final=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            eta = _clock((self.total - self.done) / rate) if rate > 0 else "?"
            head = f"{self.done}/{self.total} ({100 * self.done / self.total:.0f}%)"
            return f"{self.desc}: {head} | {rate:.2f} {self.unit}/s | {_clock(elapsed)} elapsed, eta {eta}"
        return f"{self.desc}: {self.done} | {rate:.2f} {self.unit}/s | {_clock(elapsed)} elapsed"

    def update(self, n: int = 1):
        self.done += n
        now = time.perf_counter()
        if self.drawn is None or now - self.drawn >= self.every:
            self.draw()

    def draw(self, final: bool = False):
        if self.quiet:
            return
        self.drawn, self.drawn_done = time.perf_counter(), self.done
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r\033[K" if self.tty else "") + self.line() + end)
        self.stream.flush()
