"""What long jobs tell the user: plain log lines (also appended to run log files) and progress bars.

:func:`say` prints one line to stdout and appends it, time-stamped, to every log file opened with
:func:`log_to` (``grasp train`` keeps ``RUN_DIR/train.log`` open for the whole command). Lines are written
through ``tqdm.write`` so they never tear a progress bar apart.

:func:`progress` draws a tqdm bar only when stderr is a terminal. Otherwise (output redirected to a
file, CI logs) it prints a plain status line at most every :data:`PLAIN_INTERVAL` seconds, so a log
never fills with carriage-return redraws and a slow step still shows that it is moving.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["say", "log_to", "progress", "Progress", "PLAIN_INTERVAL"]

#: Seconds between two plain progress lines when stderr is not a terminal.
PLAIN_INTERVAL = 30.0

_log_files: list[IO[str]] = []


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def say(message: str, *, echo: bool = True) -> None:
    """Print ``message`` on stdout (unless ``echo`` is False) and append it to the open log files, each
    line time-stamped."""
    if echo:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()
    stamp = _stamp()
    for file in _log_files:
        for line in message.splitlines() or [""]:
            file.write(f"{stamp} {line}\n")
        file.flush()


@contextmanager
def log_to(path: str | Path, header: str) -> Iterator[Path]:
    """Append every :func:`say` line to ``path`` while the context is open (``header`` first).

    The file is opened for appending, so a resumed run continues the log of the interrupted one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        file.write(f"{_stamp()} {header}\n")
        file.flush()
        _log_files.append(file)
        try:
            yield path
        finally:
            _log_files.remove(file)


class Progress:
    """A progress indicator: a tqdm bar on a terminal, occasional plain lines elsewhere, or nothing.

    Use as a context manager or call :meth:`close`; :meth:`update` advances it, :meth:`set_postfix`
    sets the numbers shown after it (loss, throughput, failures...).
    """

    def __init__(self, total: int | None, desc: str, unit: str, enabled: bool, initial: int = 0, leave: bool = True):
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        self._postfix: dict[str, Any] = {}
        self._bar = None
        self._plain = enabled and not sys.stderr.isatty()
        self._start = self._last = time.monotonic()
        if enabled and not self._plain:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                             unit_scale=unit == "B", unit_divisor=1024)  # fmt: skip

    def update(self, count: int = 1) -> None:
        """Advance by ``count`` units."""
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self._plain and time.monotonic() - self._last >= PLAIN_INTERVAL:
            self._last = time.monotonic()
            print(self._line(), file=sys.stderr, flush=True)

    def set_postfix(self, **values: Any) -> None:
        """Numbers shown after the bar (and in the plain lines)."""
        self._postfix = values
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def _line(self) -> str:
        done, total, unit = self.done, self.total, self.unit
        if unit == "B":  # bytes read as MiB
            done, total, unit = f"{done / 2**20:.1f}", total and f"{total / 2**20:.1f}", "MiB"
        of = f"/{total}" if total else ""
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        extra = "".join(f" {key}={value}" for key, value in self._postfix.items())
        return f"{self.desc}: {done}{of} {unit}{percent} in {time.monotonic() - self._start:.0f} s{extra}"

    def close(self) -> None:
        """Remove the bar (a no-op for plain lines and when disabled)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    total: int | None, desc: str, unit: str, *, enabled: bool = True, initial: int = 0, leave: bool = True
) -> Progress:
    """A :class:`Progress` over ``total`` units labelled ``desc``; ``enabled=False`` shows nothing.

    The unit ``"B"`` counts bytes, shown scaled (KiB, MiB, ...)."""
    return Progress(total, desc, unit, enabled, initial=initial, leave=leave)
