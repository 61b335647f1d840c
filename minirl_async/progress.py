"""Progress bars that stay readable when the output is a log file, not a terminal.

On a terminal this is a plain tqdm bar. Piped into a file (CI, `quickstart.sh | tee`, a service log), tqdm
would write every refresh as a carriage-return update, one endless line; here each refresh becomes its own
line instead, and refreshes are spaced `log_interval_s` apart, so a log shows the bar's state every few
seconds and the final state once.

    bar = progress_bar(total=400, desc="sft")
    for step in bar: ...; bar.set_postfix(loss=...)
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable
from typing import Any, TextIO


class _LineWriter(io.TextIOBase):
    """Turns tqdm's `\\r<status><padding>` refreshes into one line each."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, s: str) -> int:
        line = s.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 enabled: bool = True, log_interval_s: float = 10.0) -> Any:
    """A tqdm bar on stderr: live on a terminal, a line every `log_interval_s` seconds otherwise."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=tty,
                mininterval=0.1 if tty else log_interval_s, file=sys.stderr if tty else _LineWriter(sys.stderr))
