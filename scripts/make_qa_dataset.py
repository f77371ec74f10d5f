"""Write src/loralab/resources/qa_demo.jsonl: a small extractive-QA set (SQuAD-style rows) for the QA demo.

Deterministic (a fixed seed): 60 short English contexts about made-up people, 3 questions each (180 rows), every
answer a span of its context with its character start (``answers: {"text": [...], "answer_start": [...]}``).

    python3 scripts/make_qa_dataset.py [OUTPUT]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

FIRST = ["Mara", "Tomas", "Ines", "Olek", "Hana", "Ravi", "Lena", "Joao", "Ada", "Kofi", "Yuki", "Elsa", "Nils", "Priya",
         "Sami", "Greta", "Luca", "Noor", "Ivan", "Zara"]
LAST = ["Lind", "Okafor", "Novak", "Berg", "Sato", "Mehta", "Costa", "Weiss", "Moreau", "Haas", "Kowal", "Reyes"]
CITIES = ["Oslo", "Lisbon", "Kyoto", "Nairobi", "Lima", "Prague", "Dublin", "Hanoi", "Quito", "Tallinn", "Perth",
          "Bergen", "Porto", "Accra", "Seville"]
JOBS = ["baker", "nurse", "pilot", "carpenter", "teacher", "chemist", "tailor", "librarian", "farmer", "architect"]
ANIMALS = ["cat", "dog", "parrot", "rabbit", "tortoise", "goat"]
PETS = ["Pip", "Biscuit", "Nemo", "Juno", "Pepper", "Mango", "Otis", "Luna", "Ziggy", "Tofu"]
COLOURS = ["grey", "black", "white", "ginger", "brown", "spotted"]
HOBBIES = ["chess", "rowing", "painting", "the violin", "gardening", "climbing", "pottery", "football"]

TEMPLATES = [
    "{name} was born in {city} in {year}. {pron} works as a {job} and keeps a {colour} {animal} named {pet}. "
    "On weekends {name_first} enjoys {hobby}.",
    "Born in {year} in the city of {city}, {name} became a {job}. {pron} spends free evenings on {hobby} and "
    "shares a small flat with a {colour} {animal} called {pet}.",
    "{name} has lived in {city} since {year}. Friends know {obj} as a patient {job} who loves {hobby}; "
    "{poss} {colour} {animal}, {pet}, follows {obj} everywhere.",
]


def _row(context: str, question: str, answer: str) -> dict:
    start = context.index(answer)
    return {"question": question, "context": context, "answers": {"text": [answer], "answer_start": [start]}}


def make_rows(seed: int = 22, n_contexts: int = 60) -> list[dict]:
    rng = random.Random(seed)
    rows: list[dict] = []
    names = rng.sample([f"{f} {l}" for f in FIRST for l in LAST], n_contexts)
    for i, name in enumerate(names):
        she = rng.random() < 0.5
        facts = {"name": name, "name_first": name.split()[0], "city": rng.choice(CITIES), "year": str(rng.randint(1950, 2004)),
                 "job": rng.choice(JOBS), "animal": rng.choice(ANIMALS), "pet": rng.choice(PETS),
                 "colour": rng.choice(COLOURS), "hobby": rng.choice(HOBBIES),
                 "pron": "She" if she else "He", "obj": "her" if she else "him", "poss": "her" if she else "his"}
        context = TEMPLATES[i % len(TEMPLATES)].format(**facts)
        asked = [
            (f"Where was {name} born?" if i % 3 != 2 else f"Which city does {name} live in?", facts["city"]),
            (f"In which year was {name} born?" if i % 3 != 2 else f"Since which year has {name} lived there?", facts["year"]),
            (f"What does {name} work as?", facts["job"]),
            (f"What is the name of {name}'s {facts['animal']}?", facts["pet"]),
            (f"What colour is {name}'s {facts['animal']}?", facts["colour"]),
            (f"What does {name} enjoy in free time?", facts["hobby"]),
        ]
        for question, answer in rng.sample(asked, 3):
            rows.append(_row(context, question, answer))
    return rows


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else \
        Path(__file__).resolve().parents[1] / "src" / "loralab" / "resources" / "qa_demo.jsonl"
    rows = make_rows()
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
