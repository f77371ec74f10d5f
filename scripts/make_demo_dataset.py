#!/usr/bin/env python3
"""Generate the bundled loralab demo dataset.

Writes ``src/loralab/resources/demo_dataset.json``: a JSON array of
``{"instruction": str, "response": str}`` objects used by ``loralab train``
when no dataset is given.

All content below was written for loralab (Apache-2.0). The script uses only
the standard library and a fixed seed, so re-running it reproduces the file
byte for byte.

Usage::

    python scripts/make_demo_dataset.py            # writes the bundled file
    python scripts/make_demo_dataset.py --out x.json --stats
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from fractions import Fraction
from pathlib import Path

SEED = 1234
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "src" / "loralab" / "resources" / "demo_dataset.json"

# ---------------------------------------------------------------------------
# Short deterministic tasks
# ---------------------------------------------------------------------------

ANTONYMS = [
    ("ancient", "modern"), ("happy", "sad"), ("early", "late"),
    ("empty", "full"), ("inside", "outside"), ("accept", "reject"),
    ("victory", "defeat"), ("increase", "decrease"), ("maximum", "minimum"),
    ("shallow", "deep"), ("wide", "narrow"), ("rough", "smooth"),
    ("cheap", "expensive"), ("asleep", "awake"), ("forget", "remember"),
    ("push", "pull"), ("noisy", "quiet"), ("strong", "weak"),
    ("entrance", "exit"), ("visible", "invisible"), ("include", "exclude"),
    ("dangerous", "safe"), ("polite", "rude"), ("absent", "present"),
]

PLURALS = [
    ("child", "children"), ("mouse", "mice"), ("tooth", "teeth"),
    ("goose", "geese"), ("person", "people"), ("leaf", "leaves"),
    ("knife", "knives"), ("wolf", "wolves"), ("city", "cities"),
    ("box", "boxes"), ("church", "churches"), ("potato", "potatoes"),
    ("ox", "oxen"), ("sheep", "sheep"), ("deer", "deer"),
    ("story", "stories"), ("shelf", "shelves"), ("hero", "heroes"),
    ("crisis", "crises"), ("phenomenon", "phenomena"), ("criterion", "criteria"),
    ("woman", "women"),
]

PAST_TENSE = [
    ("go", "went"), ("eat", "ate"), ("swim", "swam"), ("write", "wrote"),
    ("buy", "bought"), ("think", "thought"), ("teach", "taught"),
    ("bring", "brought"), ("catch", "caught"), ("sing", "sang"),
    ("drink", "drank"), ("begin", "began"), ("choose", "chose"),
    ("fly", "flew"), ("speak", "spoke"), ("freeze", "froze"),
    ("take", "took"), ("sleep", "slept"), ("build", "built"),
    ("play", "played"), ("study", "studied"), ("stop", "stopped"),
]

# Only countries whose capital is uncontroversial (no split seat of
# government, no capital move in progress).
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"),
    ("Spain", "Madrid"), ("Portugal", "Lisbon"), ("Kenya", "Nairobi"),
    ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("Argentina", "Buenos Aires"), ("Egypt", "Cairo"), ("India", "New Delhi"),
    ("China", "Beijing"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Ireland", "Dublin"), ("Peru", "Lima"), ("Ghana", "Accra"),
    ("Nigeria", "Abuja"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
]

# (singular from, plural from, singular to, plural to, factor)
UNITS = [
    ("kilometre", "kilometres", "metre", "metres", 1000),
    ("metre", "metres", "centimetre", "centimetres", 100),
    ("centimetre", "centimetres", "millimetre", "millimetres", 10),
    ("kilogram", "kilograms", "gram", "grams", 1000),
    ("litre", "litres", "millilitre", "millilitres", 1000),
    ("hour", "hours", "minute", "minutes", 60),
    ("minute", "minutes", "second", "seconds", 60),
    ("day", "days", "hour", "hours", 24),
    ("week", "weeks", "day", "days", 7),
    ("year", "years", "month", "months", 12),
]
N_CONVERSIONS = 22

N_ARITHMETIC = 22
N_SORT = 12
N_UPPER = 8
N_REVERSE = 8

LIST_WORDS = [
    "apple", "river", "lamp", "garden", "pencil", "cloud", "tiger", "bread",
    "window", "orange", "violin", "marble", "candle", "forest", "honey",
    "jacket", "kettle", "lemon", "mirror", "needle", "ocean", "pepper",
    "rabbit", "saddle", "ticket", "umbrella", "wagon", "yellow", "zebra",
    "bottle", "copper", "dragon", "engine", "feather", "guitar", "island",
]

# (instruction, response) -- checked by hand; kept to single common words.
TRANSLATIONS = [
    ("Translate 'water' into Chinese.", "水"),
    ("Translate 'fire' into Chinese.", "火"),
    ("Translate 'dog' into Chinese.", "狗"),
    ("Translate 'tea' into Chinese.", "茶"),
    ("Translate 'book' into Chinese.", "书"),
    ("Translate 'cat' into Japanese.", "猫"),
    ("Translate 'fish' into Japanese.", "魚"),
    ("Translate 'mountain' into Japanese.", "山"),
    ("What does the Chinese word '谢谢' mean in English?", "thank you"),
]

# ---------------------------------------------------------------------------
# Wellbeing coach: one empathic sentence + one practical tip (+ an optional
# gentle pointer to a professional) + one short closing question.
# ---------------------------------------------------------------------------

PRO_LINE = "If this continues, a counsellor or doctor could help."

# (prompts, feeling, tip, question, suggest_professional)
COACH = [
    (["I can't fall asleep because my mind keeps racing at night. Any advice?",
      "Every night I lie awake thinking about everything. How do I switch off?"],
     "exhausting", "write your worries on paper an hour before bed, then close the notebook",
     "What usually goes through your mind when you lie down?", False),
    (["I have exams next week and I feel totally overwhelmed.",
      "My finals are coming and I panic whenever I open my notes."],
     "stressful", "split each subject into small topics and study one topic per 30-minute block",
     "Which exam worries you the most right now?", False),
    (["I moved to a new city and I don't know anyone here.",
      "Since relocating for work, my evenings feel really lonely."],
     "lonely", "join one weekly activity, like a class or club, so you see the same faces",
     "What hobbies did you enjoy back home?", False),
    (["I keep putting off important tasks until the last minute.",
      "How do I stop procrastinating on my assignments?"],
     "frustrating", "set a timer for ten minutes and start only the very first piece",
     "Which task have you been avoiding most this week?", False),
    (["I have three deadlines at work this week and I don't know where to start.",
      "My boss keeps adding tasks and everything is due on Friday."],
     "overwhelming", "list every task, mark the two most urgent, and do those first",
     "Could you ask your manager which task matters most?", False),
    (["My roommate never cleans up and it's driving me crazy.",
      "I keep arguing with my flatmate about chores."],
     "tense", "suggest a calm talk and agree on a simple written chore rota",
     "When would be a relaxed time to bring it up?", False),
    (["I've felt down almost every day for a few weeks now.",
      "Nothing seems enjoyable anymore and it's been like this for a month."],
     "heavy", "keep one small daily routine, like a short walk outside",
     "Is there someone you trust you could tell about this?", True),
    (["I have to give a presentation on Monday and I'm terrified.",
      "My hands shake whenever I speak in front of a group."],
     "nerve-racking", "rehearse out loud three times, once in front of a friend",
     "Which part of the talk feels hardest?", False),
    (["My partner and I broke up and I can't stop thinking about it.",
      "How do I cope after a breakup I didn't want?"],
     "painful", "plan something kind for yourself each evening this week",
     "Who could you spend some time with in the next few days?", False),
    (["I have a job interview tomorrow and I feel sick with nerves.",
      "Interviews make me freeze up. How can I feel calmer?"],
     "nerve-racking", "prepare three short stories about times you solved a problem",
     "What question are you most worried they will ask?", False),
    (["Scrolling social media makes me feel like everyone is doing better than me.",
      "I compare my life to people online and it makes me feel bad."],
     "discouraging", "mute accounts that leave you feeling worse and scroll only at set times",
     "How do you usually feel after scrolling?", False),
    (["I feel completely drained after work every single day.",
      "I think I'm burning out at my job."],
     "draining", "protect one evening a week with no work messages at all",
     "What part of work takes the most out of you?", True),
    (["I start a new job on Monday and I'm anxious about fitting in.",
      "Starting a new job makes me nervous. Any tips?"],
     "nerve-racking", "learn a few names on day one and ask one colleague to lunch",
     "What are you most looking forward to there?", False),
    (["I had a big argument with my best friend and we're not talking.",
      "My friend is upset with me after a fight. What should I do?"],
     "upsetting", "send a short message saying you value the friendship and want to talk",
     "What do you think upset them most?", False),
    (["My parents expect me to study something I don't enjoy.",
      "I feel pressured by my family about my career choice."],
     "difficult", "write down what matters to you, then share it with them calmly",
     "Which part of their expectations weighs on you most?", False),
    (["I'm stressed about money and paying my bills this month.",
      "Money worries keep me up at night."],
     "stressful", "write a simple list of income and bills so you can see the full picture",
     "Which bill feels most urgent right now?", False),
    (["My dog died last week and the house feels empty.",
      "How do I cope with losing my cat?"],
     "sad", "make a small photo album or write down your favourite memories",
     "What do you miss most about them?", False),
    (["My grandmother passed away recently and I can't stop crying.",
      "I lost someone close to me and I don't know how to cope."],
     "painful", "share memories with people who knew them and let yourself grieve",
     "Who has been a comfort to you so far?", True),
    (["I'm studying abroad and I feel really homesick.",
      "I miss my family a lot since I moved away for university."],
     "hard", "schedule a regular video call home and explore one new place each week",
     "What do you miss most about home?", False),
    (["I want to exercise but I can never get started.",
      "How can I build an exercise habit when I have no motivation?"],
     "frustrating", "start with a ten-minute walk at the same time each day",
     "What kind of movement do you actually enjoy?", False),
    (["I redo my work again and again because it never feels good enough.",
      "My perfectionism stops me from finishing things."],
     "exhausting", "decide in advance what good enough looks like, then stop there",
     "What would happen if a task was eighty percent perfect?", False),
    (["I've been invited to a party but I get anxious around new people.",
      "Parties make me nervous. How can I cope?"],
     "nerve-racking", "go with a friend and plan to stay for just one hour",
     "Who might you already know there?", False),
    (["I stay up late on my phone and feel tired every morning.",
      "How do I stop scrolling in bed at night?"],
     "tiring", "charge your phone outside the bedroom and use a simple alarm clock",
     "What could you do instead in the last half hour before sleep?", False),
    (["I'm juggling a part-time job and my studies and I'm exhausted.",
      "Balancing work and university feels impossible."],
     "exhausting", "map your week on one page and block fixed study times",
     "Which hours of the week are free right now?", False),
    (["My neighbours are loud every night and I can't rest.",
      "Noise from next door keeps waking me up."],
     "frustrating", "try earplugs or white noise tonight, then speak to them politely",
     "Have you had a chance to talk with them yet?", False),
    (["I feel stuck in my career and don't know what to do next.",
      "My job feels like a dead end."],
     "discouraging", "talk to two people working in roles you find interesting",
     "What kind of work makes you lose track of time?", False),
    (["A coworker keeps taking credit for my work.",
      "How should I handle a colleague who undermines me in meetings?"],
     "unfair", "keep short written notes of your contributions and share updates by email",
     "Is there a manager you trust to talk to?", False),
    (["I'm a new parent and I'm so tired I can barely think.",
      "Looking after a newborn is wearing me out."],
     "exhausting", "accept offers of help and rest when the baby sleeps",
     "Who could take one shift for you this week?", False),
    (["I don't like how I look and it affects my confidence.",
      "I feel self-conscious about my body."],
     "painful", "write down three things your body lets you do each day",
     "When do you feel most comfortable in yourself?", False),
    (["I can't decide between two job offers.",
      "I'm stuck choosing between two options and keep going back and forth."],
     "stressful", "list the three things you value most and score each option",
     "Which option feels like a relief when you imagine it?", False),
    (["My weekends feel empty and lonely.",
      "I spend most weekends alone and it gets me down."],
     "lonely", "plan one small social thing each weekend, even just a coffee",
     "Who have you been meaning to catch up with?", False),
    (["I sometimes get sudden panic attacks out of nowhere.",
      "My heart races and I feel panicky when I'm in busy shops."],
     "frightening", "breathe in for four counts and out for six until it eases",
     "Have you noticed what tends to set it off?", True),
    (["My closest friend moved abroad and I really miss her.",
      "My best friend moved to another country. How do I cope?"],
     "sad", "set a regular call time and start a shared photo chat",
     "What did you two enjoy doing together?", False),
    (["I feel like a fraud at work and that everyone will find out.",
      "I got promoted but I feel I don't deserve it."],
     "unsettling", "keep a list of positive feedback to read on hard days",
     "What have you achieved that led to this role?", False),
    (["I always say yes to everyone and end up overloaded.",
      "How can I learn to say no without feeling guilty?"],
     "draining", "practise a simple line like 'I can't this week, but thank you'",
     "Which request is hardest for you to turn down?", False),
    (["I get angry quickly and snap at people I love.",
      "Little things make me lose my temper. What can I do?"],
     "frustrating", "pause and take three slow breaths before you reply",
     "Which situations tend to trigger it?", False),
    (["My driving test is next week and I'm really nervous.",
      "I failed my driving test once and I'm scared to try again."],
     "nerve-racking", "book a mock test with your instructor to practise real conditions",
     "Which part of the drive worries you most?", False),
    (["Moving house is stressing me out so much.",
      "I have to pack up my whole flat this month and I feel overwhelmed."],
     "overwhelming", "pack one box a day, starting with things you rarely use",
     "What needs to be done first?", False),
    (["I recently retired and I feel a bit lost.",
      "Since retiring I don't know what to do with my days."],
     "unsettling", "try volunteering or a class a couple of mornings a week",
     "What did you always wish you had time for?", False),
    (["I keep worrying about my health even after normal check-ups.",
      "I can't stop searching my symptoms online."],
     "worrying", "set a short worry time each day instead of searching online",
     "When does the worry feel strongest?", True),
    (["Someone in my group project isn't doing their share.",
      "My project partner keeps missing our meetings."],
     "frustrating", "agree on clear tasks and dates in writing with the whole group",
     "Have you talked to them directly yet?", False),
    (["I'm starting university soon and worried I won't make friends.",
      "How can I make friends at university?"],
     "nerve-racking", "say yes to a few events in the first weeks and join one society",
     "Which clubs or interests might you look for?", False),
    (["I'm looking after my ill father and I have no time for myself.",
      "Caring for a family member is wearing me down."],
     "draining", "ask a relative or local service for a few hours of respite each week",
     "Who else could share some of the caring?", False),
    (["I overthink every message I send to people.",
      "I worry for hours after sending a text."],
     "tiring", "send it, then put your phone away for twenty minutes",
     "What do you fear they might think?", False),
    (["I feel low and sluggish every winter.",
      "Dark winter evenings make me feel flat."],
     "heavy", "get outside in daylight each morning, even for fifteen minutes",
     "What brightens your day during winter?", True),
    (["I feel jealous of my sister's success.",
      "My brother seems to do everything better than me."],
     "hard", "notice the feeling without judging it, then write down one goal of your own",
     "What would success look like for you?", False),
    (["I've been job hunting for months with no luck.",
      "Every job application gets rejected and I'm losing hope."],
     "discouraging", "ask for feedback on your CV and set a small daily target",
     "Which kind of role do you want most?", False),
    (["My partner and I live in different countries and it's hard.",
      "Long-distance relationships are tough. How do we stay close?"],
     "hard", "plan regular calls and always have the next visit on the calendar",
     "When are you next able to see each other?", False),
    (["I got a bad grade on a test I studied hard for.",
      "I failed an exam and I feel like giving up."],
     "disappointing", "look over the marked paper and pick two things to change next time",
     "Who could go through the results with you?", False),
    (["I do most of the housework and nobody notices.",
      "I feel taken for granted at home."],
     "frustrating", "calmly say what you need and suggest sharing specific jobs",
     "Which task would you most like help with?", False),
    (["I'm always rushing and late in the mornings.",
      "How can I make my mornings less chaotic?"],
     "stressful", "lay out your clothes and pack your bag the night before",
     "What usually slows you down in the morning?", False),
    (["I feel guilty whenever I take a break.",
      "Resting makes me feel lazy. Is that normal?"],
     "hard", "schedule breaks like meetings, so rest becomes part of the plan",
     "What kind of rest actually recharges you?", False),
    (["Someone keeps leaving nasty comments on my posts.",
      "I'm being picked on in a group chat."],
     "hurtful", "block or report them and tell someone you trust",
     "Who could you talk to about this today?", False),
    (["My friends seem to be drifting away from me.",
      "I'm not invited to things as much as I used to be."],
     "lonely", "reach out first with a specific plan, like a walk on Saturday",
     "Which friend would you most like to reconnect with?", False),
    (["I want to start a small business but I'm scared of failing.",
      "Fear of failure is stopping me from chasing my idea."],
     "scary", "test the idea on a small scale, such as selling to five people first",
     "What would a tiny first version look like?", False),
    (["I snack a lot whenever I'm stressed.",
      "Stress makes me eat even when I'm not hungry."],
     "frustrating", "pause before snacking and ask yourself what you really need",
     "What else helps you unwind?", False),
    (["I'm anxious about an upcoming doctor's appointment.",
      "Medical appointments make me really nervous."],
     "nerve-racking", "write your questions down beforehand and bring a friend if you can",
     "What are you most nervous about?", False),
    (["I'm meeting my partner's parents this weekend and I'm nervous.",
      "How can I feel calmer about meeting my partner's family?"],
     "nerve-racking", "ask your partner for a few topics they enjoy talking about",
     "What do you already know about them?", False),
    (["Working from home makes me feel isolated.",
      "I barely talk to anyone since my job went fully remote."],
     "isolating", "work from a café or library once a week and schedule video chats",
     "Which colleague could you have a virtual coffee with?", False),
    (["Constant work messages make it hard to focus.",
      "I get distracted by notifications all day long."],
     "draining", "turn off notifications and check messages at set times",
     "Which hours are best for your focused work?", False),
    (["I don't feel confident about myself.",
      "How can I build more self-confidence?"],
     "hard", "write down one thing you did well each evening",
     "When have you felt proud of yourself recently?", False),
    (["I've been learning Spanish for a year and I feel I'm not improving.",
      "My language learning has stalled and I'm losing interest."],
     "discouraging", "spend ten minutes a day speaking, even just to yourself",
     "What would you love to be able to say?", False),
    (["Planning my wedding is making me so stressed.",
      "Wedding preparations are overwhelming me."],
     "overwhelming", "pick your top three priorities and keep the rest simple",
     "Which part of the day matters most to you both?", False),
    (["I made a mistake at work and can't stop thinking about it.",
      "I messed up in front of my team and I feel awful."],
     "upsetting", "own it briefly, fix what you can, and note one lesson",
     "What would you tell a friend in the same spot?", False),
    (["My child is starting school and I'm more anxious than they are.",
      "I'm worried about my kid's first day at school."],
     "emotional", "do a practice run of the morning route together",
     "What part of the day worries you most?", False),
    (["My parents are getting divorced and I feel stuck in the middle.",
      "My parents are separating and I don't know how to feel."],
     "hard", "tell each of them gently that you don't want to take sides",
     "Who can you talk to openly about it?", True),
    (["I worry about everything all the time.",
      "My anxiety feels constant and it's wearing me out."],
     "exhausting", "set a daily fifteen-minute worry time and save worries for then",
     "Which worry is loudest today?", True),
    (["I graduated and now my days have no structure.",
      "Since finishing my degree I feel aimless."],
     "unsettling", "set a fixed wake-up time and one small goal for each day",
     "What would you like the next six months to hold?", False),
    (["I feel awkward going to the gym alone.",
      "I'm nervous about going to a fitness class for the first time."],
     "nerve-racking", "go at a quiet time and follow a short written plan",
     "Which exercise would you like to try first?", False),
    (["I take criticism really personally.",
      "Feedback at work makes me feel terrible about myself."],
     "hard", "wait an hour, then reread the feedback looking for one useful point",
     "What feedback stung the most recently?", False),
    (["My landlord ignores my repair requests.",
      "My landlord still hasn't fixed the broken heating."],
     "frustrating", "put each request in writing with dates and photos",
     "How long has the problem been going on?", False),
    (["Family gatherings during the holidays stress me out.",
      "I dread spending the holidays with my relatives."],
     "stressful", "plan short breaks, like a walk, during long gatherings",
     "Which moments are hardest for you?", False),
]


def coach_response(feeling: str, tip: str, question: str, pro: bool) -> str:
    parts = [
        f"That sounds really {feeling}, and it makes sense to feel this way.",
        f"One small step: {tip}.",
    ]
    if pro:
        parts.append(PRO_LINE)
    parts.append(question)
    return " ".join(parts)


# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------


def build_antonyms(rng):
    templates = ["Give the opposite of the word '{w}'.", "What is the opposite of '{w}'?"]
    return [(rng.choice(templates).format(w=w), a) for w, a in ANTONYMS]


def build_plurals(rng):
    templates = ["What is the plural of '{w}'?", "Give the plural form of '{w}'."]
    return [(rng.choice(templates).format(w=w), p) for w, p in PLURALS]


def build_past(rng):
    templates = ["What is the past tense of '{w}'?", "Give the past tense of the verb '{w}'."]
    return [(rng.choice(templates).format(w=w), p) for w, p in PAST_TENSE]


def build_capitals(rng):
    templates = ["What is the capital of {c}?", "Name the capital city of {c}."]
    return [(rng.choice(templates).format(c=c), f"The capital of {c} is {cap}.")
            for c, cap in CAPITALS]


def _unit(n, sing, plur):
    return sing if n == 1 else plur


def build_conversions(rng):
    items, seen = [], set()
    while len(items) < N_CONVERSIONS:
        fs, fp, ts, tp, factor = rng.choice(UNITS)
        if rng.random() < 0.7:  # big unit -> small unit
            n = rng.randint(2, 12)
            m = Fraction(n) * factor
            src, dst = (n, fs, fp), (m, ts, tp)
        else:  # small unit -> big unit, only whole results
            k = rng.randint(2, 9)
            n = k * factor
            m = Fraction(n, factor)
            src, dst = (n, ts, tp), (m, fs, fp)
        assert dst[0].denominator == 1
        a, b = src[0], int(dst[0])
        key = (a, src[1], dst[1])
        if key in seen:
            continue
        seen.add(key)
        instr = f"Convert {a} {_unit(a, src[1], src[2])} to {dst[2]}."
        resp = f"{a} {_unit(a, src[1], src[2])} is {b} {_unit(b, dst[1], dst[2])}."
        items.append((instr, resp))
    return items


def build_arithmetic(rng):
    templates = ["What is {a} {op} {b}?", "Calculate {a} {op} {b}."]
    items, seen = [], set()
    while len(items) < N_ARITHMETIC:
        op = rng.choice(["plus", "minus", "times", "divided by"])
        if op == "plus":
            a, b = rng.randint(2, 50), rng.randint(2, 50)
            r = a + b
        elif op == "minus":
            a, b = rng.randint(10, 60), rng.randint(2, 9)
            r = a - b
        elif op == "times":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            r = a * b
        else:
            b, r = rng.randint(2, 12), rng.randint(2, 12)
            a = b * r
        # independent check with Python's own operators
        check = {"plus": a + b, "minus": a - b, "times": a * b,
                 "divided by": Fraction(a, b)}[op]
        assert check == r and r >= 0
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        items.append((rng.choice(templates).format(a=a, op=op, b=b),
                      f"{a} {op} {b} equals {r}."))
    return items


def _sample_words(rng, lo, hi):
    return rng.sample(LIST_WORDS, rng.randint(lo, hi))


def build_sort(rng):
    items = []
    while len(items) < N_SORT:
        words = _sample_words(rng, 3, 4)
        if words == sorted(words):
            continue
        items.append((f"Sort these words alphabetically: {', '.join(words)}.",
                      ", ".join(sorted(words))))
    return items


def build_upper(rng):
    items = []
    for _ in range(N_UPPER):
        words = _sample_words(rng, 3, 4)
        items.append((f"Write these words in uppercase: {', '.join(words)}.",
                      ", ".join(w.upper() for w in words)))
    return items


def build_reverse(rng):
    items = []
    for _ in range(N_REVERSE):
        words = _sample_words(rng, 3, 4)
        items.append((f"Reverse the order of this list: {', '.join(words)}.",
                      ", ".join(reversed(words))))
    return items


def build_coach(rng):
    items = []
    for prompts, feeling, tip, question, pro in COACH:
        resp = coach_response(feeling, tip, question, pro)
        for p in prompts:
            items.append((p, resp))
    return items


BUILDERS = [
    ("antonym", build_antonyms),
    ("plural", build_plurals),
    ("past_tense", build_past),
    ("capital", build_capitals),
    ("unit_conversion", build_conversions),
    ("arithmetic", build_arithmetic),
    ("sort_words", build_sort),
    ("uppercase", build_upper),
    ("reverse_list", build_reverse),
    ("translation", lambda rng: list(TRANSLATIONS)),
    ("coach", build_coach),
]


def build(seed: int = SEED):
    """Return (rows, categories) where categories[i] names rows[i]'s kind."""
    rng = random.Random(seed)
    tagged = []
    for name, fn in BUILDERS:
        for instr, resp in fn(rng):
            tagged.append((name, instr, resp))

    instructions = [t[1] for t in tagged]
    dupes = [i for i, c in Counter(instructions).items() if c > 1]
    assert not dupes, f"duplicate instructions: {dupes}"
    assert len(COACH) >= 60, "need at least 60 distinct coach situations"
    assert len({c[1] + c[2] for c in COACH}) == len(COACH)
    for _, instr, resp in tagged:
        assert instr.strip() and resp.strip()

    rng.shuffle(tagged)
    rows = [{"instruction": i, "response": r} for _, i, r in tagged]
    cats = [c for c, _, _ in tagged]
    assert 300 <= len(rows) <= 360, len(rows)
    return rows, cats


def print_stats(rows, cats):
    by_cat = {}
    for row, cat in zip(rows, cats):
        by_cat.setdefault(cat, []).append(row)
    print(f"{'category':<16}{'rows':>5}{'instr words':>13}{'resp words':>12}")
    for cat, _ in BUILDERS:
        rs = by_cat[cat]
        iw = sum(len(r["instruction"].split()) for r in rs) / len(rs)
        ow = sum(len(r["response"].split()) for r in rs) / len(rs)
        print(f"{cat:<16}{len(rs):>5}{iw:>13.1f}{ow:>12.1f}")
    iw = sum(len(r["instruction"].split()) for r in rows) / len(rows)
    ow = sum(len(r["response"].split()) for r in rows) / len(rows)
    print(f"{'TOTAL':<16}{len(rows):>5}{iw:>13.1f}{ow:>12.1f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--stats", action="store_true", help="print per-category counts")
    args = ap.parse_args(argv)

    rows, cats = build(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        json.dump(rows, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(rows)} rows to {args.out}")
    if args.stats:
        print_stats(rows, cats)


if __name__ == "__main__":
    main()
