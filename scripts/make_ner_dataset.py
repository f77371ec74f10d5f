"""Write src/loralab/resources/ner_demo.jsonl: short English sentences tagged with PER / LOC / ORG entities (IOB2).

Written for loralab's TOKEN_CLS demo (names, places and organisations made up or common; no external data): one row
per sentence, ``{"tokens": [...], "tags": [...]}``, the same file every time (a fixed seed).

    python scripts/make_ner_dataset.py [--rows 180] [--output src/loralab/resources/ner_demo.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PEOPLE = ["Anna Schmidt", "Tom", "Maria Lopez", "David Chen", "Sara", "Omar Haddad", "Lena", "James Wright", "Yuki Tanaka",
          "Priya Patel", "Marco", "Elena Petrova", "Noah", "Grace Kim", "Ahmed", "Olivia Brown", "Lucas Silva", "Mia"]
PLACES = ["Paris", "Berlin", "New York", "Tokyo", "Cairo", "Lisbon", "Buenos Aires", "Oslo", "Nairobi", "Toronto",
          "Madrid", "Hong Kong", "Sydney", "Rome", "Cape Town", "Dublin", "San Francisco", "Vienna"]
ORGS = ["Acme Corp", "the United Nations", "Greenfield Bank", "Nordic Rail", "Blue River Labs", "the Red Cross",
        "Sunrise Foods", "Atlas Motors", "the City Council", "Orbit Software", "Harbor Hospital", "Pine Valley School"]

# {P}: a person, {L}: a place, {O}: an organisation; every other word is O
TEMPLATES = [
    "{P} lives in {L} .", "{P} works for {O} in {L} .", "{O} opened a new office in {L} .", "{P} visited {L} last week .",
    "{P} met {P} at the station .", "{O} hired {P} as a manager .", "The weather in {L} was cold today .",
    "{P} flew from {L} to {L} .", "{O} and {O} signed an agreement .", "Yesterday {P} called {O} .",
    "{P} moved to {L} with her family .", "A report by {O} praised {L} .", "{P} said the team in {L} is growing .",
    "Workers at {O} met {P} on Monday .", "{P} studied in {L} before joining {O} .", "Tickets to {L} are cheap in May .",
    "{O} is based in {L} .", "{P} and {P} run a small shop .", "The mayor of {L} thanked {O} .",
    "{P} wrote a book about {L} .", "Nobody at {O} knew {P} .", "We drove past {L} at night .",
]


def sentence(template: str, rng: random.Random) -> tuple[list[str], list[str]]:
    words: list[str] = []
    tags: list[str] = []
    for piece in template.split():
        kind = {"{P}": ("PER", PEOPLE), "{L}": ("LOC", PLACES), "{O}": ("ORG", ORGS)}.get(piece)
        if kind is None:
            words.append(piece)
            tags.append("O")
            continue
        label, names = kind
        name = rng.choice(names).split()
        if name[0] == "the":  # "the United Nations": the article stays outside the entity, as in CoNLL
            words.append("the")
            tags.append("O")
            name = name[1:]
        words += name
        tags += [f"B-{label}"] + [f"I-{label}"] * (len(name) - 1)
    if words[0] == "the":
        words[0] = "The"
    return words, tags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=180)
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "src/loralab/resources/ner_demo.jsonl")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows, seen = [], set()
    while len(rows) < args.rows:
        words, tags = sentence(TEMPLATES[len(rows) % len(TEMPLATES)], rng)
        if tuple(words) in seen:
            continue
        seen.add(tuple(words))
        rows.append({"tokens": words, "tags": tags})
    args.output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} sentences to {args.output}")


if __name__ == "__main__":
    main()
