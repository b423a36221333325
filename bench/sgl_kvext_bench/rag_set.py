"""A seeded synthetic RAG set: documents carrying one fact each, questions answered by one.

Documents are generic filler sentences around one fact ("The access code for the Orion project
is 4821." or "Mira Kovacs was born in the city of Tallinn."). A question's prompt holds its
answer document and distractors in shuffled order. The assistant turn is pre-filled with the
answer's stem, so a correct answer is the gold value before the first period (a model this
small otherwise restates the question). Same seed, same set, on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

FILLER = (
    "The committee met on a grey morning and reviewed the quarterly figures in detail.",
    "Several members asked for clearer tables and a shorter summary at the top.",
    "The warehouse on the east side was repainted after the spring storms.",
    "Visitors are reminded that the library closes early on public holidays.",
    "A new bus route now links the station with the hospital and the market.",
    "The gardeners planted two rows of lime trees along the northern path.",
    "Minutes of the previous meeting were approved without changes.",
    "The bakery on the corner introduced a rye loaf that sold out by noon.",
    "Engineers inspected the bridge and found the bearings in good condition.",
    "The choir rehearses on Thursdays in the hall behind the old school.",
    "Heavy rain delayed the harvest by almost a week in the valley farms.",
    "The museum extended its opening hours for the summer exhibition.",
    "Volunteers cleaned the riverbank and collected forty bags of litter.",
    "The council approved a small budget for repairs to the town clock.",
)
PROJECTS = ("Orion", "Juniper", "Falcon", "Meridian", "Cobalt", "Willow", "Atlas", "Harbor",
            "Quartz", "Summit", "Lantern", "Nimbus", "Beacon", "Cedar", "Vortex", "Ember")
PEOPLE = ("Mira Kovacs", "Tomas Lind", "Asha Patel", "Jonas Weber", "Lena Novak", "Omar Haddad",
          "Sofia Rossi", "Erik Dahl", "Nadia Petrov", "Luca Moretti", "Hana Sato", "Ivan Horvat",
          "Clara Duarte", "Pavel Marek", "Ines Costa", "Felix Brandt")
CITIES = ("Tallinn", "Porto", "Krakow", "Ghent", "Bergen", "Valencia", "Turin", "Lyon", "Graz",
          "Utrecht", "Bilbao", "Aarhus", "Brno", "Split", "Cork", "Basel")
#: Second words for project names past the first 16 ("Orion Delta").
PROJECT_SUFFIXES = ("Delta", "North", "Prime", "Blue", "Echo", "Gate", "Line", "Point",
                    "Ridge", "Stone", "Vale", "Wave", "Forge", "Field", "Crest")
#: Distinct facts :func:`fact` can make: 16 projects and 16 people, then 240 of each built
#: from two names.
MAX_FACTS = 2 * (len(PROJECTS) + len(PROJECTS) * len(PROJECT_SUFFIXES))


@dataclass(frozen=True)
class RagQuestion:
    """One question: the document indices in prompt order, where the answer is, the stem."""

    documents: tuple[int, ...]
    answer_document: int
    question: str
    stem: str
    answer: str


@dataclass(frozen=True)
class RagSet:
    documents: tuple[str, ...]
    questions: tuple[RagQuestion, ...]


def _name(i: int, names: tuple[str, ...], second: list[str]) -> str:
    """The ``i``-th distinct name: ``names`` alone, then ``names`` x ``second`` (skipping
    pairs that rebuild a first-round name)."""
    if i < len(names):
        return names[i]
    j = i - len(names)
    first, k = names[j % len(names)], j // len(names)
    pool = [w for w in second if w not in first]
    return f"{first.split()[0]} {pool[k % len(pool)]}"


def fact(rng: random.Random, i: int) -> tuple[str, str, str, str]:
    """(fact sentence, question, answer stem, gold answer) number ``i`` (< MAX_FACTS):
    even ``i`` an access code, odd ``i`` a birthplace; no two share a stem."""
    if not 0 <= i < MAX_FACTS:
        raise ValueError(f"fact {i}: at most {MAX_FACTS} distinct facts")
    if i % 2 == 0:
        project = _name(i // 2, PROJECTS, list(PROJECT_SUFFIXES))
        code = str(rng.randint(1000, 9999))
        return (f"The access code for the {project} project is {code}.",
                f"What is the access code for the {project} project?",
                f"The access code for the {project} project is", code)
    person = _name(i // 2, PEOPLE, [p.split()[1] for p in PEOPLE])
    city = rng.choice(CITIES)
    return (f"{person} was born in the city of {city}.", f"In which city was {person} born?",
            f"{person} was born in the city of", city)


CORPORA = ("synthetic", "prose")


@dataclass(frozen=True)
class RagSpec:
    """The knobs of a RAG set; same spec, same set.

    ``corpus``: ``synthetic`` (filler sentences, :func:`make_rag_set`) or ``prose`` (Python's
    help topics, :func:`sgl_kvext_bench.prose_set.make_prose_set`, documents of
    ``doc_tokens`` tokens; ``sentences`` and ``facts_per_document`` do not apply).
    ``chunks``: documents per question (min, max); ``skew``: popularity skew, a Zipf exponent
    over documents (0 = uniform; 1.2 = a few documents in most prompts); ``shuffle``: documents
    in random order in each prompt (else in corpus order, so prompts share longer prefixes);
    ``facts_per_document``: distinct facts, hence distinct questions, each document holds.
    """

    documents: int = 24
    questions: int = 16
    chunks: tuple[int, int] = (4, 8)
    sentences: int = 36
    seed: int = 1
    skew: float = 0.0
    shuffle: bool = True
    facts_per_document: int = 1
    corpus: str = "synthetic"
    doc_tokens: tuple[int, int] = (200, 800)

    def build(self) -> RagSet:
        if self.corpus not in CORPORA:
            raise ValueError(f"corpus {self.corpus!r}: allowed {', '.join(CORPORA)}")
        if self.corpus == "prose":
            from sgl_kvext_bench.prose_set import make_prose_set

            return make_prose_set(self.documents, self.questions, self.chunks, self.seed,
                                  min_tokens=self.doc_tokens[0], max_tokens=self.doc_tokens[1],
                                  skew=self.skew, shuffle=self.shuffle)
        return make_rag_set(self.documents, self.questions, self.chunks, self.sentences,
                            self.seed, skew=self.skew, shuffle=self.shuffle,
                            facts_per_document=self.facts_per_document)


#: Measured with SmolLM2's tokenizer: a document is ~17 tokens plus ~13.3 per sentence.
DOC_BASE_TOKENS, SENTENCE_TOKENS = 17, 13.3


def sentences_for(chunk_tokens: int) -> int:
    """Filler sentences that make a document of about ``chunk_tokens`` tokens."""
    return max(2, round((chunk_tokens - DOC_BASE_TOKENS) / SENTENCE_TOKENS))


def _weighted_sample(rng: random.Random, population: list[int], weights: list[float],
                     k: int) -> list[int]:
    """``k`` distinct items, each draw proportional to the remaining items' weights."""
    pool, w, out = list(population), list(weights), []
    for _ in range(k):
        i = rng.choices(range(len(pool)), weights=w)[0]
        out.append(pool.pop(i))
        w.pop(i)
    return out


def make_rag_set(documents: int = 32, questions: int = 16, chunks: tuple[int, int] = (4, 8),
                 sentences: int = 24, seed: int = 0, *, skew: float = 0.0,
                 shuffle: bool = True, facts_per_document: int = 1) -> RagSet:
    """``documents`` documents of ``sentences`` filler sentences plus ``facts_per_document``
    facts, ``questions`` questions each over ``chunks[0]..chunks[1]`` documents (one holds the
    answer), shuffled unless ``shuffle`` is false, drawn with Zipf popularity ``skew``."""
    if documents < chunks[1] or not 1 <= chunks[0] <= chunks[1] or questions < 1:
        raise ValueError(f"need documents >= max chunks and 1 <= min chunks <= max chunks, got "
                         f"documents={documents}, chunks={chunks}, questions={questions}")
    if not 1 <= facts_per_document <= sentences or skew < 0:
        raise ValueError(f"need 1 <= facts per document <= sentences and skew >= 0, got "
                         f"{facts_per_document} facts, {sentences} sentences, skew {skew}")
    if documents * facts_per_document > MAX_FACTS:
        raise ValueError(f"documents x facts per document must be <= {MAX_FACTS} "
                         "(distinct facts)")
    rng = random.Random(seed)
    docs, facts = [], []
    for i in range(documents):
        own = [fact(rng, i * facts_per_document + k) for k in range(facts_per_document)]
        body = [rng.choice(FILLER) for _ in range(sentences)]
        for sentence, *_ in own:
            body.insert(rng.randint(1, len(body) - 1), sentence)
        docs.append(f"Document {i + 1}. " + " ".join(body) + "\n\n")
        facts.append([(q, stem, answer) for _, q, stem, answer in own])
    return RagSet(tuple(docs), tuple(draw_questions(rng, documents, questions, chunks, facts,
                                                    skew, shuffle)))


def draw_questions(rng: random.Random, documents: int, questions: int, chunks: tuple[int, int],
                   facts: Sequence[Sequence[tuple[str, str, str]]], skew: float = 0.0,
                   shuffle: bool = True) -> list[RagQuestion]:
    """``questions`` questions over ``documents`` documents whose ``facts[d]`` are
    (question, stem, answer) triples: an answer document drawn with Zipf ``skew`` and
    distractors to make ``chunks[0]..chunks[1]`` documents, shuffled unless not ``shuffle``."""
    weights = [1.0 / (d + 1) ** skew for d in range(documents)]   # document 1 most popular
    qs = []
    for _ in range(questions):
        if skew == 0:
            answer_doc = rng.randrange(documents)
            others = rng.sample([d for d in range(documents) if d != answer_doc],
                                rng.randint(*chunks) - 1)
        else:
            answer_doc = rng.choices(range(documents), weights=weights)[0]
            rest = [d for d in range(documents) if d != answer_doc]
            others = _weighted_sample(rng, rest, [weights[d] for d in rest],
                                      rng.randint(*chunks) - 1)
        order = [answer_doc, *others]
        if shuffle:
            rng.shuffle(order)
        else:
            order.sort()
        own = facts[answer_doc]
        question, stem, answer = own[rng.randrange(len(own))] if len(own) > 1 else own[0]
        qs.append(RagQuestion(tuple(order), answer_doc, question, stem, answer))
    return qs


def is_correct(answer_text: str, gold: str) -> bool:
    """The gold value appears in the answer before its first period."""
    return gold in answer_text.split(".")[0]


#: The system head every RAG prompt starts with (the benchmarks' shared prefix).
HEAD = "<|im_start|>system\nAnswer the question from the documents.<|im_end|>\n<|im_start|>user\n"


def question_tail(q: RagQuestion) -> str:
    """What follows a prompt's documents: the question and the answer's stem."""
    return f"Question: {q.question}<|im_end|>\n<|im_start|>assistant\n{q.stem}"


def prompt_text(rag: RagSet, q: RagQuestion) -> str:
    """The whole prompt of ``q``: head, its documents in order, the question."""
    return HEAD + "".join(rag.documents[d] for d in q.documents) + question_tail(q)
