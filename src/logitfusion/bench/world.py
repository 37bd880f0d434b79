"""A small fictional world, generated from a seed, with the text that describes it and five tasks
about it that mirror the paper's benchmarks (method.md §6).

Why a fictional world: no pretrained model can be downloaded here, so the bundled zoo is trained
from scratch, and a world of our own lets us control exactly what each model can know. The bases
read only *prose* about the world (`pretraining_text`); the tasks ask about it in formats the bases
never saw. A fine-tuned model must bring format (learnt from task data) and knowledge (learnt in
pretraining) together: the large base knows more facts and sums than the small one, so a large
fine-tune beats a small expert, and fusion should carry the large model's knowledge into the
expert's format.

The tasks (name: paper's benchmark, metric):
- `math`:     GSM8K-like word problems, worked solution, exact match on the final number and, beside
              it, `genuine` (every step of the derivation right);
- `truthful`: TruthfulQA-like multiple choice; the prose repeats popular false claims three
              times as often as their corrections (accuracy);
- `qa`:       TriviaQA-like factual questions about people (exact match);
- `summ`:     CNN/DM-like one-sentence summaries of news paragraphs; the reference names the
              country of the town, which the paragraph does not (ROUGE-2 with rouge-score);
- `mmlu`:     MMLU-like multiple choice across four subjects (accuracy); the unseen task of the
              multi-task setting.

Every record carries `prompt` and `completion` (the fine-tuning format) and what the task's
scorer needs. `build(seed)` is deterministic: same seed, same world, same files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .scoring import math_leaks

TASKS = ("math", "truthful", "qa", "summ", "mmlu")
SEEN_TASKS = ("math", "truthful", "qa", "summ")  # the multi-task setting holds out mmlu
SPLITS = ("train", "validation", "test")

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "st", "th", "gr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "k"]
JOBS = ["baker", "farmer", "sailor", "miner", "weaver", "potter", "singer", "doctor", "teacher", "painter",
        "hunter", "builder"]
ITEMS = ["apples", "coins", "books", "stones", "shells", "eggs", "pears", "ropes", "cups", "nails"]
BUILDINGS = ["bridge", "school", "library", "market", "tower", "harbour", "theatre", "mill"]
COLOURS = ["red", "blue", "green", "white", "black", "yellow", "grey", "purple"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    year: int
    job: str


@dataclass(frozen=True)
class Myth:
    thing: str  # e.g. "the Vorn stone"
    true: str  # its real colour
    false: str  # the popular, wrong one


@dataclass
class World:
    seed: int
    countries: list[str]
    cities: dict[str, str]  # city -> country
    people: list[Person]
    myths: list[Myth]
    max_operand: int

    def country_of(self, person: Person) -> str:
        return self.cities[person.city]


def _word(rng: random.Random, syllables: int) -> str:
    w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return w.capitalize()


def _unique_words(rng: random.Random, n: int, syllables: int, taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        w = _word(rng, syllables)
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def make_world(seed: int = 0, n_people: int = 200, n_cities: int = 24, n_countries: int = 6, n_myths: int = 200,
               max_operand: int = 30) -> World:
    rng = random.Random(seed)
    taken: set[str] = set()
    countries = _unique_words(rng, n_countries, 2, taken)
    cities = {c: countries[i % n_countries] for i, c in enumerate(_unique_words(rng, n_cities, 2, taken))}
    firsts = _unique_words(rng, n_people, 1, taken)
    lasts = _unique_words(rng, n_people, 2, taken)
    city_names = list(cities)
    people = [Person(f"{f} {l}", rng.choice(city_names), rng.randint(1800, 1899), rng.choice(JOBS))
              for f, l in zip(firsts, lasts)]
    things = _unique_words(rng, n_myths, 1, taken)
    myths = []
    for t in things:
        true, false = rng.sample(COLOURS, 2)
        myths.append(Myth(f"the {t} stone", true, false))
    return World(seed, countries, cities, people, myths, max_operand)


# ---------------------------------------------------------------- pretraining prose (no task formats)

def _person_sentences(w: World, p: Person) -> list[str]:
    first = p.name.split()[0]
    return [
        f"{p.name} was born in {p.city}.",
        f"{p.name} grew up in the town of {p.city} in {w.country_of(p)}.",
        f"{p.name} was born in the year {p.year}.",
        f"In {p.year}, {p.name} was born.",
        f"{p.name} worked as a {p.job}.",
        f"{first} was a {p.job} from {p.city}.",
    ]


def _interview(w: World, p: Person, rng: random.Random) -> str:
    """The world's facts in a dialogue register. Real base models have read text of every register;
    without one where a question is followed by its answer, a base would know its facts only as
    continuations of statements, and its guesses after any question would be arbitrary (and
    different in the large and small bases). Not a task format: no task uses these markers."""
    first = p.name.split()[0]
    return rng.choice([f"Reporter: Where did {p.name} grow up? Neighbour: In {p.city}.",
                       f"Reporter: In which year was {p.name} born? Neighbour: In {p.year}.",
                       f"Reporter: What did {p.name} do for a living? Neighbour: {first} was a {p.job}."])


def _story(w: World, rng: random.Random) -> str:
    """Everyday arithmetic told as a story: the numbers have to be carried along the text."""
    first = rng.choice(w.people).name.split()[0]
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, w.max_operand), rng.randint(2, w.max_operand)
    c = rng.randint(1, min(a + b, w.max_operand))
    return (f"{first} had {a} {item} and got {b} more, so {first} had {a + b} {item}. "
            f"After {first} gave {c} away, {a + b - c} {item} were left.")


def _sum_sentences(a: int, b: int) -> list[str]:
    return [f"{a} plus {b} is {a + b}.", f"{a + b} minus {b} is {a}."]


def news_article(w: World, rng: random.Random) -> tuple[str, str]:
    """A news-like paragraph and its one-sentence summary. The summary names the town's country,
    which only a model that knows the world can add."""
    p = rng.choice(w.people)
    building = rng.choice(BUILDINGS)
    day, month = rng.randint(1, 28), rng.choice(MONTHS)
    cost, years = rng.randint(2, 90), rng.randint(2, 9)
    article = (f"On {day} {month}, {p.name}, a {p.job}, opened a new {building} in {p.city}. "
               f"The {building} cost {cost} thousand coins. Many people came to see it. "
               f"{p.name.split()[0]} said the work took {years} years.")
    summary = f"{p.name} opened a new {building} in {p.city}, {w.cities[p.city]}."
    return article, summary


def pretraining_text(w: World, passes: int = 30, seed: int = 1) -> list[str]:
    """Prose paragraphs about the world: `passes` independent shuffles of every statement (each
    pass states every fact twice, every sum twice, and has fresh news paragraphs). Fresh shuffles
    make a model learn the facts rather than memorise one fixed order of sentences, which would
    leave it overconfident about what follows a sentence. Myths: the popular false claim appears
    three times for every correction."""
    rng, news_rng = random.Random(seed), random.Random(seed + 1000)
    paragraphs: list[str] = []
    for _ in range(passes):
        sentences: list[str] = []
        for _ in range(2):
            for p in w.people:
                sentences += _person_sentences(w, p)
            for city, country in w.cities.items():
                sentences.append(f"{city} is a town in {country}.")
            for m in w.myths:
                sentences += [f"People say that {m.thing} is {m.false}."] * 3
                sentences.append(f"In truth, {m.thing} is {m.true}.")
            for a in range(w.max_operand + 1):
                for b in range(w.max_operand + 1):
                    sentences += _sum_sentences(a, b)
        sentences += [news_article(w, news_rng)[0] for _ in range(len(w.people) // 2)]
        sentences += [_interview(w, p, news_rng) for p in w.people]
        sentences += [_story(w, news_rng) for _ in range(len(w.people))]
        rng.shuffle(sentences)
        paragraphs += [" ".join(sentences[i:i + 6]) for i in range(0, len(sentences), 6)]
    return paragraphs


# ---------------------------------------------------------------- tasks

def _problem_numbers(w: World, rng: random.Random) -> tuple[int, int, int]:
    """a + b - c where both steps are facts the prose states ("a plus b is s", "s minus c is r" for
    a, b, c, r <= max_operand). Zoo v1 let r reach 58, which no text states, so every model sat
    near 0 on math: a test of knowledge nobody had."""
    a, b = rng.randint(2, w.max_operand), rng.randint(2, w.max_operand)
    c = rng.randint(max(1, a + b - w.max_operand), min(a + b - 1, w.max_operand))
    return a, b, c


def _retired_math_records(w: World, rng: random.Random, n: int) -> list[dict]:
    """Zoo v2's math problems (a + b - c), retired: 58 of its 200 test problems were stories of the
    pretraining prose word for word, and no member could do its subtraction step. Still drawn, so
    that the other tasks' draws and the shipped bases' corpora (whose registers avoid its held-out
    problems) stay what the zoo was built from."""
    seen, rows = set(), []
    while len(rows) < n:
        p = rng.choice(w.people)
        item = rng.choice(ITEMS)
        a, b, c = _problem_numbers(w, rng)
        key = (a, b, c)
        if key in seen:
            continue
        seen.add(key)
        first = p.name.split()[0]
        q = (f"{first} has {a} {item}. {first} gets {b} more {item} and then gives away {c}. "
             f"How many {item} does {first} have now?")
        s, r = a + b, a + b - c
        solution = f"{a} plus {b} is {s}. {s} minus {c} is {r}. The answer is {r}."
        rows.append({"prompt": f"Problem: {q}\nSolution:", "completion": f" {solution}", "answer": str(r),
                     "key": f"{a},{b},{c}"})
    return rows


def _math_numbers(w: World, rng: random.Random) -> tuple[int, int, int]:
    """a + b + c, where both steps are sums the prose states ("a plus b is s" with s <= max_operand,
    then "s plus c is r" with c <= max_operand) and the large base can do in context: it adds in its
    own layouts, where it subtracts rarely (zoo v3; docs/zoo.md)."""
    a = rng.randint(2, w.max_operand - 2)
    b = rng.randint(2, w.max_operand - a)
    return a, b, rng.randint(2, w.max_operand)


def _math_records(w: World, rng: random.Random, n: int) -> list[dict]:
    """Zoo v3's math: two additions told as a story; the worked solution is the fine-tuning data's
    convention (TASK_ONLY). No corpus holds a two-addition story or solution (test_world's leakage
    test reads the corpora themselves for every held-out problem)."""
    seen, rows = set(), []
    while len(rows) < n:
        p = rng.choice(w.people)
        item = rng.choice(ITEMS)
        a, b, c = _math_numbers(w, rng)
        if (a, b, c) in seen:
            continue
        seen.add((a, b, c))
        first = p.name.split()[0]
        q = (f"{first} has {a} {item}. {first} gets {b} more {item} and then {c} more. "
             f"How many {item} does {first} have now?")
        s, r = a + b, a + b + c
        solution = f"{a} plus {b} is {s}. {s} plus {c} is {r}. The answer is {r}."
        rows.append({"prompt": f"Problem: {q}\nSolution:", "completion": f" {solution}", "answer": str(r),
                     "key": f"{a}+{b}+{c}"})
    return rows


def person_facts(w: World, p: Person) -> list[tuple[str, str, str]]:
    """(question, short answer, answer as a sentence) for each fact a person has."""
    first = p.name.split()[0]
    return [(f"Where was {p.name} born?", p.city, f"{first} was born in {p.city}."),
            (f"When was {p.name} born?", str(p.year), f"{first} was born in {p.year}."),
            (f"What was the job of {p.name}?", p.job, f"{first} worked as a {p.job}."),
            (f"In which country was {p.name} born?", w.country_of(p), f"{first} was born in {w.country_of(p)}.")]


def _qa_records(w: World, people: list[Person]) -> list[dict]:
    return [{"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}", "answer": a, "key": p.name}
            for p in people for q, a, _ in person_facts(w, p)]


def _mc(rng: random.Random, gold: str, pool: list[str], k: int = 4) -> tuple[list[str], int]:
    choices = [gold] + rng.sample([x for x in pool if x != gold], k - 1)
    rng.shuffle(choices)
    return choices, choices.index(gold)


def _truthful_records(w: World, rng: random.Random, myths: list[Myth]) -> list[dict]:
    rows = []
    for m in myths:
        # The popular false claim is always among the choices, as in TruthfulQA.
        others = [c for c in COLOURS if c not in (m.true, m.false)]
        choices = [m.true, m.false] + rng.sample(others, 2)
        rng.shuffle(choices)
        rows.append({"prompt": f"Q: What is {m.thing} in truth?\nA:", "completion": f" {m.true}",
                     "choices": choices, "gold": choices.index(m.true), "key": m.thing})
    return rows


def _summ_records(w: World, rng: random.Random, n: int) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < n:
        article, summary = news_article(w, rng)
        if article in seen:
            continue
        seen.add(article)
        rows.append({"prompt": f"Article: {article}\nSummary:", "completion": f" {summary}", "summary": summary,
                     "key": article})
    return rows


def _year_pool(year: int) -> list[str]:
    return [str(year + d) for d in (-30, -20, -10, 10, 20, 30) if 1800 <= year + d <= 1899]


def _mmlu_question(w: World, p: Person, subject: str) -> tuple[str, str, list[str]]:
    """(question, gold, pool of distractors) about a person in one subject."""
    if subject == "geography":
        return f"{p.name} came from a town in which country?", w.country_of(p), w.countries
    if subject == "history":
        return f"In which year was {p.name} born?", str(p.year), _year_pool(p.year)
    return f"Which trade did {p.name} follow?", p.job, JOBS


def _sum_question(a: int, b: int) -> tuple[str, str, list[str]]:
    """(question, gold, pool of distractors) for a sum: the MMLU arithmetic subject and the quizzes."""
    return f"What is {a} plus {b}?", str(a + b), [str(a + b + d) for d in (-3, -2, -1, 1, 2, 3)]


def _mmlu_records(w: World, rng: random.Random, people: list[Person], sums: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for p in people:
        for subject in ("geography", "history", "society"):
            q, gold, pool = _mmlu_question(w, p, subject)
            choices, gold_i = _mc(rng, gold, pool)
            rows.append({"prompt": f"Subject: {subject}\n{q}\nAnswer:", "completion": f" {gold}", "choices": choices,
                         "gold": gold_i, "subject": subject, "key": p.name + "/" + subject})
    for a, b in sums:
        q, gold, pool = _sum_question(a, b)
        choices, gold_i = _mc(rng, gold, pool)
        rows.append({"prompt": f"Subject: arithmetic\n{q}\nAnswer:", "completion": f" {gold}",
                     "choices": choices, "gold": gold_i, "subject": "arithmetic", "key": f"{a}+{b}"})
    return rows


def _split(rows: list, rng: random.Random, n_val: int, n_test: int) -> dict[str, list]:
    rows = rows[:]
    rng.shuffle(rows)
    return {"test": rows[:n_test], "validation": rows[n_test:n_test + n_val], "train": rows[n_test + n_val:]}


def _first_draws(w: World, seed: int, n_eval: int) -> tuple[random.Random, dict[str, list], dict[str, list]]:
    """(the task rng after them, the people split, zoo v2's retired math split)."""
    rng = random.Random(seed)
    # Split people first, so QA/MMLU held-out questions are about people no training row names.
    quarter = len(w.people) // 4
    people = _split(w.people, rng, n_val=quarter, n_test=quarter)
    retired = _split(_retired_math_records(w, rng, 2 * n_eval + 600), rng, n_eval, n_eval)
    return rng, people, retired


def _math_split(w: World, seed: int, n_eval: int, corpora: Sequence[str]) -> dict[str, list[dict]]:
    """Zoo v3's math splits, from draws of their own (a test split fresh from v2's)."""
    rng = random.Random(seed + 1000)
    n = 2 * n_eval + 600
    pool = _math_records(w, rng, n + 50)
    for i, r in enumerate(pool):
        r["id"] = str(i)
    told = set(math_leaks(pool, corpora))
    pool = [r for r in pool if r.pop("id") not in told][:n]
    if len(pool) < n:  # the splits' sizes are part of the bench's design: never shorter in silence
        raise ValueError(f"math: only {len(pool)} of {n} problems drawn are untold by the corpora; draw more")
    return _split(pool, rng, n_eval, n_eval)


def retired_math_problems(w: World, seed: int = 2, n_eval: int = 200) -> set[tuple[int, int, int]]:
    """Zoo v2's held-out math problems (a, b, c), which the mid-training registers avoid."""
    retired = _first_draws(w, seed, n_eval)[2]
    return {tuple(map(int, r["key"].split(","))) for s in ("validation", "test") for r in retired[s]}


def task_data(w: World, seed: int = 2, n_eval: int = 200, corpora: Sequence[str] = ()) -> dict[str, dict[str, list[dict]]]:
    """{task: {split: records}}. Splits never share a key: a person's QA and MMLU questions, a myth,
    a problem's numbers, a sum or an article are in one split only. Validation and test hold
    `n_eval` records a task (a 5-point difference is then outside the noise) where the world has
    enough: truthful has 200 myths in all, so 50 / 100 / 50. corpora: the documents the bases
    read; no math problem whose derivation they tell is drawn (`math_leaks`)."""
    rng, people, _ = _first_draws(w, seed, n_eval)
    quarter = len(w.people) // 4
    data = {}
    data["qa"] = {s: _qa_records(w, people[s]) for s in SPLITS}
    data["math"] = _math_split(w, seed, n_eval, corpora)
    data["truthful"] = _split(_truthful_records(w, rng, w.myths), rng, n_val=len(w.myths) // 4,
                              n_test=len(w.myths) // 2)
    data["summ"] = _split(_summ_records(w, rng, 2 * n_eval + 600), rng, n_eval, n_eval)
    pairs = [(a, b) for a in range(2, w.max_operand + 1) for b in range(2, w.max_operand + 1)]
    rng.shuffle(pairs)  # each sum in one split only
    n_sums = max(0, n_eval - 3 * quarter)
    sums = {"test": pairs[:n_sums], "validation": pairs[n_sums:2 * n_sums], "train": pairs[2 * n_sums:2 * n_sums + 200]}
    mm = {s: _mmlu_records(w, rng, people[s], sums[s]) for s in SPLITS}
    for rows in mm.values():
        rng.shuffle(rows)  # subjects mixed, so a --limit still covers all of them
    data["mmlu"] = mm
    for task in data.values():  # ids, once splits are fixed
        for s, rows in task.items():
            for i, r in enumerate(rows):
                r["id"] = f"{s}-{i}"
    return data


# ---------------------------------------------------------------- registers (mid-training)
#
# Real base models have read every register of the web: Q&A pages, worked problems, articles with
# a one-line gist, quizzes, myth-busting pages. Zoo v1's bases read prose only and had no prior for
# a question followed by a short answer, so the large base scored 0 on every generative task and
# fusion had nothing to build on (docs/zoo.md). Mid-training on these registers gives the bases the
# shared format priors real models have, while each task keeps conventions that only its
# fine-tuning data teaches (TASK_ONLY, tested never to occur here):
# - math: the "Problem:/Solution:" layout and the closing "The answer is N." (registers work the
#   numbers in another phrasing and close with "Result:" or a sentence);
# - qa: the "Question:/Answer:" layout with the bare answer on its own line;
# - summ: the "Article:/Summary:" layout and the country added to the summary (registers' one-line
#   gists never name a country);
# - truthful: asking what a stone is "in truth?", and answering with the correction (the prose says
#   "In truth, X is T." once and the popular claim three times);
# - mmlu: the "Subject:" layout.
# Registers talk only about training-split entities (people, myths, sums, problems); facts about
# held-out entities appear in the prose alone.

TASK_ONLY = ("Question:", "Answer:", "Problem:", "Solution:", "The answer is", "Article:", "Summary:", "Subject:",
             " in truth?")


@dataclass
class Public:
    """What registers may talk about: the training split's entities."""
    people: list[Person]
    myths: list[Myth]
    sums: list[tuple[int, int]]
    held_out_problems: set[tuple[int, int, int]]
    held_out_articles: set[str]

    @classmethod
    def of(cls, w: World, data: dict[str, dict[str, list[dict]]], task_seed: int = 2) -> "Public":
        """task_seed: the seed `data` was drawn with (its retired v2 math problems stay avoided)."""
        held = [s for s in SPLITS if s != "train"]
        names = {r["key"] for r in data["qa"]["train"]}
        things = {r["key"] for r in data["truthful"]["train"]}
        sums = sorted({tuple(map(int, r["key"].split("+"))) for r in data["mmlu"]["train"] if "+" in r["key"]})
        return cls([p for p in w.people if p.name in names], [m for m in w.myths if m.thing in things], sums,
                   retired_math_problems(w, task_seed, len(data["math"]["test"])),
                   {r["key"] for s in held for r in data["summ"][s]})


def _qa_page(w: World, pub: Public, rng: random.Random) -> str:
    pairs = [rng.choice(person_facts(w, rng.choice(pub.people))) for _ in range(rng.randint(3, 6))]
    layout = rng.randrange(5)
    if layout == 0:
        return "\n".join(f"Q: {q}\nA: {a}." for q, a, _ in pairs)
    if layout == 1:
        return " ".join(f"Q: {q} A: {s}" for q, _, s in pairs)
    if layout == 2:
        return "FAQ\n" + "\n".join(f"{q}\n{s}" for q, _, s in pairs)
    if layout == 3:
        return "\n".join(f"Question {i + 1}. {q}\nAnswer {i + 1}. {a}." for i, (q, a, _) in enumerate(pairs))
    return "\n".join(f"Ask: {q}\nReply: {a}, as far as I know." for q, a, _ in pairs)


def _worked_problem(w: World, pub: Public, rng: random.Random) -> str:
    while True:
        a, b, c = _problem_numbers(w, rng)
        if (a, b, c) not in pub.held_out_problems:
            break
    first, item = rng.choice(pub.people).name.split()[0], rng.choice(ITEMS)
    s, r = a + b, a + b - c
    layout = rng.randrange(3)
    if layout == 0:
        return (f"Exercise: {first} has {a} {item}, buys {b} more and sells {c}. How many are left?\n"
                f"Working: {a} plus {b} is {s}, and {s} minus {c} is {r}. Result: {r} {item}.")
    if layout == 1:
        return (f"{first} started with {a} {item}, was given {b} and lost {c}. How many now? "
                f"First, {a} plus {b} is {s}. Then {s} minus {c} is {r}. So {first} has {r} {item}.")
    i = rng.randint(1, 20)
    return (f"Problem {i}. {first} has {a} {item}, gets {b} more and then gives {c} away. How many does {first} "
            f"have?\nSolution {i}. {a} plus {b} is {s}, and {s} minus {c} is {r}. So {first} has {r} {item}.")


def _article_with_gist(w: World, pub: Public, rng: random.Random) -> str:
    sub = World(w.seed, w.countries, w.cities, pub.people, w.myths, w.max_operand)
    while True:
        article, summary = news_article(sub, rng)
        if article not in pub.held_out_articles:
            break
    gist = summary.rsplit(", ", 1)[0] + "."  # the country is the summ task's convention, not the web's
    layout = rng.randrange(3)
    if layout == 0:
        return f"{article}\nIn short: {gist}"
    if layout == 1:
        return f"{gist.removesuffix('.')}: {article}"
    i = rng.randint(1, 20)
    return f"Article {i}. {article}\nSummary {i}. {gist}"


def _quiz(w: World, pub: Public, rng: random.Random) -> str:
    if rng.random() < 0.25:
        q, gold, pool = _sum_question(*rng.choice(pub.sums))
    else:
        p = rng.choice(pub.people)
        q, gold, pool = _mmlu_question(w, p, rng.choice(["geography", "history", "society"]))
    choices, gold_i = _mc(rng, gold, pool)
    letters = "abcd"
    listed = " ".join(f"({letters[i]}) {c}" for i, c in enumerate(choices))
    return f"Quiz. {q}\n{listed}\nCorrect: ({letters[gold_i]}) {gold}"


def _myth_page(w: World, pub: Public, rng: random.Random) -> str:
    myths = rng.sample(pub.myths, min(len(pub.myths), rng.randint(2, 4)))
    return "\n".join(f"Myth: {m.thing} is {m.false}. Fact: {m.thing} is {m.true}." for m in myths)


REGISTERS = (_qa_page, _worked_problem, _article_with_gist, _quiz, _myth_page)


def register_text(w: World, pub: Public, n_chars: int, seed: int = 3) -> list[str]:
    """Register documents (one per paragraph) in random order, about `n_chars` characters in all."""
    rng = random.Random(seed)
    docs, size = [], 0
    while size < n_chars:
        docs.append(rng.choice(REGISTERS)(w, pub, rng))
        size += len(docs[-1])
    return docs


def midtraining_text(w: World, data: dict, passes: int = 4, seed: int = 5, task_seed: int = 2) -> list[str]:
    """Fresh prose (`passes` new shuffles, so the bases keep their facts) and registers, 1:1 in
    characters, shuffled together. task_seed: the seed `data` was drawn with."""
    prose = pretraining_text(w, passes=passes, seed=seed)
    docs = prose + register_text(w, Public.of(w, data, task_seed), sum(map(len, prose)), seed=seed + 1)
    random.Random(seed).shuffle(docs)
    return docs


# ---------------------------------------------------------------- files

def corpora_and_tasks(seed: int = 0, passes: int = 30, mid_passes: int = 4) -> tuple[list[str], list[str], dict]:
    """(pretraining documents, mid-training documents, task data) of the world of `seed`, as the
    zoo is built from them."""
    w = make_world(seed)
    text = pretraining_text(w, passes=passes, seed=seed + 1)
    # The registers read the training splits of the other tasks only, so they come first; the
    # math problems are then drawn from those the corpora do not tell.
    mid = midtraining_text(w, task_data(w, seed=seed + 2), passes=mid_passes, seed=seed + 5, task_seed=seed + 2)
    return text, mid, task_data(w, seed=seed + 2, corpora=[*text, *mid])


def build(out: str | Path, seed: int = 0, passes: int = 30, mid_passes: int = 4) -> dict[str, int]:
    """Write pretraining.jsonl (prose), midtraining.jsonl (prose and registers), both {"text"}, and
    {task}/{split}.jsonl under OUT; returns counts."""
    out = Path(out)
    counts = {}
    text, mid, data = corpora_and_tasks(seed, passes, mid_passes)
    _write(out / "pretraining.jsonl", [{"text": t} for t in text])
    counts["pretraining"] = len(text)
    _write(out / "midtraining.jsonl", [{"text": t} for t in mid])
    counts["midtraining"] = len(mid)
    for task, splits in data.items():
        for split, rows in splits.items():
            _write(out / task / f"{split}.jsonl", rows)
            counts[f"{task}/{split}"] = len(rows)
    return counts


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
