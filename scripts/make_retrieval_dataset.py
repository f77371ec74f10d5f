"""Write src/loralab/resources/retrieval_demo.jsonl: 200 (question, answer-passage) pairs for FEATURE_EXTRACTION.

The domain is the fault codes of a made-up espresso machine (the "Brava 9"), written for loralab. Each passage is a
service-manual entry naming a component and a failure in technical words ("the thermoblock exceeds its thermal
cutoff"); each question describes the same fault as an owner would ("the part that heats the water gets far too hot
and switches off"). Ten components x twenty failures give 200 passages that differ in a few words: an off-the-shelf
embedding model confuses them, while the owner-to-manual vocabulary can be learnt from the train pairs and carries to
the held-out ones (every component and failure also appears in train, in other combinations).

Deterministic: run ``python3 scripts/make_retrieval_dataset.py`` to rewrite the same file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COMPONENTS = [  # (manual name, what an owner calls it)
    ("thermoblock", "the part that heats the water"),
    ("rotary pump", "the thing that pushes the water through"),
    ("burr grinder", "the coffee mill"),
    ("steam wand", "the milk frothing nozzle"),
    ("drip tray", "the tray under the spout"),
    ("reservoir", "the water container at the back"),
    ("brew unit", "the removable coffee-making module"),
    ("control board", "the electronics"),
    ("bean hopper", "the container on top for the beans"),
    ("descaling circuit", "the limescale cleaning program"),
]
FAILURES = [  # (manual wording, owner's wording, fix)
    ("exceeds its thermal cutoff", "gets far too hot and switches itself off",
     "Let it cool for 30 minutes and clean the vents; replace the thermal fuse if it recurs."),
    ("loses prime", "sucks in air instead of water",
     "Refill, open the hot-water outlet and run the priming cycle twice."),
    ("has a worn seal that weeps", "leaves a puddle on the counter",
     "Replace the O-ring kit (part 9-114) and tighten the clamp."),
    ("has a failing bearing", "makes a grinding, rattling noise",
     "Replace the bearing assembly; do not run it dry."),
    ("is blocked by scale", "barely lets anything through",
     "Run two descaling cycles with citric acid and rinse three times."),
    ("reports an open circuit on its sensor", "does not seem to be detected at all",
     "Reseat the sensor plug and measure it: 10 kOhm at 25 degrees is normal."),
    ("stalls under load", "stops halfway through",
     "Check the drive gear for broken teeth and the motor brushes for wear."),
    ("has a stuck float switch", "thinks it is full when it is actually empty",
     "Free the float, clean the magnet and check that it moves without friction."),
    ("fails its firmware checksum", "started acting up right after the last update",
     "Reflash the firmware from the service menu (hold the two outer buttons at power-on)."),
    ("draws excessive current", "trips the breaker in the kitchen",
     "Disconnect it and test the insulation; a short to ground needs a technician."),
    ("is misaligned on its rails", "will not slide back in properly",
     "Remove it, clean the rails and push it in until both latches click."),
    ("has a hardened gasket", "feels stiff and drips when it is used",
     "Replace the gasket and grease it lightly with food-safe silicone."),
    ("has a chattering relay", "clicks on and off very quickly",
     "Replace relay K2 on the power stage; check the supply voltage first."),
    ("has a drifting thermistor", "is lukewarm some days and scalding on others",
     "Recalibrate the temperature offset in the service menu or replace the thermistor."),
    ("vibrates beyond tolerance", "shakes the whole kitchen counter",
     "Tighten the mounts and replace the rubber dampers."),
    ("has an outlet clogged with residue", "sputters and spits",
     "Soak the outlet in hot water and clear it with the cleaning needle."),
    ("has a corroded connector", "only works if you wiggle the cable",
     "Clean the contacts with isopropyl alcohol or replace the harness."),
    ("has a flow meter that undercounts", "pours much more than the cup size I chose",
     "Clean the flow meter turbine and reprogram the cup volumes."),
    ("exceeds 15 bar of pressure", "hisses loudly while it runs",
     "Check the over-pressure valve and replace it if it does not open."),
    ("times out during its cycle", "never finishes what it started",
     "Restart the cycle; if it times out again, check the sensor of that component."),
]
QUESTIONS = [
    "Why does {c} {f}?",
    "My Brava: {c} {f}. What should I do?",
    "{C} {f}, how do I fix it?",
    "Help, {c} {f} since this morning.",
    "What is wrong when {c} {f}?",
]


def make_rows(seed: int = 9) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for ci, (part, lay_part) in enumerate(COMPONENTS):
        for fi, (fault, lay_fault, fix) in enumerate(FAILURES):
            code = f"E{ci + 1}{fi:02d}"
            template = rng.choice(QUESTIONS)
            question = template.format(c=lay_part, C=lay_part[0].upper() + lay_part[1:], f=lay_fault)
            passage = f"Fault {code}: the {part} {fault}. {fix}"
            rows.append({"anchor": question, "positive": passage})
    rng.shuffle(rows)
    return rows


def main() -> None:
    target = Path(__file__).resolve().parent.parent / "src" / "loralab" / "resources" / "retrieval_demo.jsonl"
    rows = make_rows()
    target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} pairs to {target}")


if __name__ == "__main__":
    main()
