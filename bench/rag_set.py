"""A seeded synthetic RAG set: documents carrying one fact each, questions answered by one.

Documents are generic filler sentences around one fact ("The access code for the Orion project
is 4821." or "Mira Kovacs was born in the city of Tallinn."). A question's prompt holds its
answer document and distractors in shuffled order. The assistant turn is pre-filled with the
answer's stem, so a correct answer is the gold value before the first period (a model this
small otherwise restates the question). Same seed, same set, on every machine.
"""

from __future__ import annotations

import random
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


def _fact(rng: random.Random, i: int) -> tuple[str, str, str, str]:
    """(fact sentence, question, answer stem, gold answer) for document ``i``."""
    if i % 2 == 0:
        project, code = PROJECTS[(i // 2) % len(PROJECTS)], str(rng.randint(1000, 9999))
        return (f"The access code for the {project} project is {code}.",
                f"What is the access code for the {project} project?",
                f"The access code for the {project} project is", code)
    person, city = PEOPLE[(i // 2) % len(PEOPLE)], rng.choice(CITIES)
    return (f"{person} was born in the city of {city}.", f"In which city was {person} born?",
            f"{person} was born in the city of", city)


def make_rag_set(documents: int = 32, questions: int = 16, chunks: tuple[int, int] = (4, 8),
                 sentences: int = 24, seed: int = 0) -> RagSet:
    """``documents`` documents of ``sentences`` filler sentences plus one fact, ``questions``
    questions each over ``chunks[0]..chunks[1]`` shuffled documents (one holds the answer)."""
    if documents < chunks[1] or not 1 <= chunks[0] <= chunks[1] or questions < 1:
        raise ValueError(f"need documents >= max chunks and 1 <= min chunks <= max chunks, got "
                         f"documents={documents}, chunks={chunks}, questions={questions}")
    if documents > 2 * len(PROJECTS):
        raise ValueError(f"documents must be <= {2 * len(PROJECTS)} (distinct facts)")
    rng = random.Random(seed)
    docs, facts = [], []
    for i in range(documents):
        fact, question, stem, answer = _fact(rng, i)
        body = [rng.choice(FILLER) for _ in range(sentences)]
        body.insert(rng.randint(1, sentences - 1), fact)
        docs.append(f"Document {i + 1}. " + " ".join(body) + "\n\n")
        facts.append((question, stem, answer))
    qs = []
    for _ in range(questions):
        answer_doc = rng.randrange(documents)
        others = rng.sample([d for d in range(documents) if d != answer_doc],
                            rng.randint(*chunks) - 1)
        order = [answer_doc, *others]
        rng.shuffle(order)
        question, stem, answer = facts[answer_doc]
        qs.append(RagQuestion(tuple(order), answer_doc, question, stem, answer))
    return RagSet(tuple(docs), tuple(qs))


def is_correct(answer_text: str, gold: str) -> bool:
    """The gold value appears in the answer before its first period."""
    return gold in answer_text.split(".")[0]
