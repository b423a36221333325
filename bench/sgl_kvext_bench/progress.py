"""Progress for long benchmark runs: a tqdm bar on a terminal, plain lines in a log."""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

from tqdm import tqdm

_COUNT = re.compile(r"(\d+)/(\d+)")


class Progress:
    """Callable progress sink. On a terminal a tqdm bar follows the message's first ``k/n``
    (the message is its description); elsewhere (CI logs, pipes) each message is one line."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._bar: Any = None

    def __call__(self, message: str) -> None:
        if not self.tty:
            self.stream.write(message + "\n")
            self.stream.flush()
            return
        if self._bar is None:
            self._bar = tqdm(file=self.stream, dynamic_ncols=True, leave=True,
                             bar_format="{l_bar}{bar:20}| {n}/{total}")
        count = _COUNT.search(message)
        if count:
            self._bar.total = int(count.group(2))
            self._bar.n = int(count.group(1))
        self._bar.set_description_str(message, refresh=True)

    def close(self) -> None:
        """End the status line (call before printing the results)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
