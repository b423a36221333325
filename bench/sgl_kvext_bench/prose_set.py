"""A RAG set of real documentation prose: Python's own help topics (``pydoc_data``), each
document carrying one inserted fact.

Documents are consecutive paragraphs of the help topics (prose and the code examples between
them, as the documentation has them), cut at paragraph boundaries to a length drawn between
``min_tokens`` and ``max_tokens`` (estimated without a tokenizer, :func:`estimate_tokens`;
measured with SmolLM2's: 168-735 tokens, mean 475, for the default 200 documents).
Paragraphs longer than a document are left out. One fact from
:func:`sgl_kvext_bench.rag_set.fact` opens a prose paragraph inside the document (never the
first; a paragraph of its own where no prose paragraph follows the first). Questions, stems
and scoring are the synthetic set's, so one harness serves both. The text ships with Python,
so the set needs no download; it is the same on every machine with the same Python minor
version (recorded in the results).
"""

from __future__ import annotations

import random
import re

from sgl_kvext_bench.rag_set import RagQuestion, RagSet, draw_questions, fact

#: Words, punctuation marks, line breaks and runs of spaces: ~0.98 SmolLM2 tokens each on
#: the help topics (median per paragraph; 5th-95th percentile 0.82-1.10).
_PIECES = re.compile(r"\w+|[^\w\s]|\n| {2,}")


def estimate_tokens(text: str) -> int:
    """About how many SmolLM2 tokens ``text`` is, without a tokenizer (10% over the median)."""
    return int(len(_PIECES.findall(text)) * 1.1) + 1


def paragraphs() -> list[str]:
    """The help topics' paragraphs in topic-name order; prose paragraphs joined onto one line,
    code blocks (indented) kept as they are."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            if not block.strip():
                continue
            lines = block.split("\n")
            if any(line.startswith(" ") for line in lines):
                out.append(block.rstrip())
            else:
                out.append(re.sub(r"\s+", " ", block).strip())
    return out


def _is_prose(paragraph: str) -> bool:
    return not paragraph.startswith(" ") and len(paragraph.split()) >= 8 \
        and not set(paragraph) <= set("*=-^~ ")


def make_prose_set(documents: int = 200, questions: int = 200, chunks: tuple[int, int] = (4, 8),
                   seed: int = 0, *, min_tokens: int = 200, max_tokens: int = 800,
                   skew: float = 0.0, shuffle: bool = True) -> RagSet:
    """``documents`` documents of ``min_tokens``..``max_tokens`` tokens, ``questions``
    questions each over ``chunks[0]..chunks[1]`` of them (see the module doc)."""
    if not 50 <= min_tokens <= max_tokens:
        raise ValueError(f"need 50 <= min tokens <= max tokens, got {min_tokens}, {max_tokens}")
    rng = random.Random(seed)
    source = paragraphs()
    docs: list[str] = []
    facts: list[list[tuple[str, str, str]]] = []
    at = 0
    cap = max_tokens - 40                 # room for the title and the fact
    for i in range(documents):
        budget = min(rng.randint(min_tokens, max_tokens), cap)
        body: list[str] = []
        size = 0
        while size < budget:
            if at >= len(source):
                raise ValueError(f"the help topics hold {i} documents of {min_tokens}-"
                                 f"{max_tokens} tokens, not {documents}")
            paragraph = source[at]
            at += 1
            cost = estimate_tokens(paragraph) + 1
            if size + cost <= cap:
                body.append(paragraph)
                size += cost
            elif size >= min_tokens:
                at -= 1                # long enough: the paragraph opens the next document
                break
        sentence, question, stem, answer = fact(rng, i)
        prose = [k for k in range(1, len(body)) if _is_prose(body[k])]
        if prose:                      # the fact opens a prose paragraph
            k = rng.choice(prose)
            body[k] = f"{sentence} {body[k]}"
        else:                          # or stands as a paragraph of its own
            body.insert(rng.randint(1, len(body)), sentence)
        docs.append(f"Document {i + 1}. " + "\n\n".join(body) + "\n\n")
        facts.append([(question, stem, answer)])
    qs: list[RagQuestion] = draw_questions(rng, documents, questions, chunks, facts, skew, shuffle)
    return RagSet(tuple(docs), tuple(qs))
