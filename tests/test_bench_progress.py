"""Benchmark progress: one line per message in a log, a tqdm bar on a terminal."""

from __future__ import annotations

import io

from sgl_kvext_bench.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    p = Progress(out)
    p("radix: question 1/4")
    p("radix: question 2/4")
    p.close()
    assert out.getvalue() == "radix: question 1/4\nradix: question 2/4\n"


def test_a_tqdm_bar_on_a_terminal() -> None:
    out = _Terminal()
    p = Progress(out)
    p("radix: question 1/4 ttft 1.00s")
    p("radix: question 4/4")
    p.close()
    text = out.getvalue()
    last = text.rstrip("\n").rsplit("\r", 1)[1]
    assert last.startswith("radix: question 4/4") and last.endswith("| 4/4")
    assert text.endswith("\n")                            # the bar line is ended once
