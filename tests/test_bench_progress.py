"""Benchmark progress: one line per message in a log, one rewritten bar line on a terminal."""

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


def test_a_bar_on_one_line_on_a_terminal() -> None:
    out = _Terminal()
    p = Progress(out)
    p("radix: question 1/4 ttft 1.00s")
    p("radix: question 4/4")
    p.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")      # one status line, ended once
    last = text.rsplit("\r", 1)[1]
    assert last.startswith("[" + "#" * 20 + "] radix: question 4/4")
    assert len(last.rstrip("\n")) == len("[" + "#" * 20 + "] radix: question 1/4 ttft 1.00s")
