"""Progress for long benchmark runs: a bar on a terminal, plain lines in a log."""

from __future__ import annotations

import re
import sys
from typing import TextIO

_COUNT = re.compile(r"(\d+)/(\d+)")
_BAR = 20


class Progress:
    """Callable progress sink. On a terminal each message rewrites one status line, led by a
    bar drawn from the message's first ``k/n``; elsewhere (CI logs, pipes) each message is
    one line."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._width = 0

    def __call__(self, message: str) -> None:
        if not self.tty:
            self.stream.write(message + "\n")
            self.stream.flush()
            return
        count = _COUNT.search(message)
        if count and int(count.group(2)) > 0:
            done = min(_BAR, _BAR * int(count.group(1)) // int(count.group(2)))
            message = f"[{'#' * done}{'.' * (_BAR - done)}] {message}"
        self.stream.write("\r" + message.ljust(self._width))
        self.stream.flush()
        self._width = len(message)

    def close(self) -> None:
        """End the status line (call before printing the results)."""
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
