"""The synthetic world: deterministic, splits without leakage, scorers that can fail."""

import json
import re

import pytest

from logitfusion.bench import scoring, world


@pytest.fixture(scope="module")
def data():
    return world.task_data(world.make_world(0), seed=2)


def test_same_seed_same_world_and_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert world.build(a, seed=0, passes=2) == world.build(b, seed=0, passes=2)
    for f in sorted(a.rglob("*.jsonl")):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes(), f
    assert world.make_world(1).people != world.make_world(0).people


def test_people_names_unique_and_facts_in_the_prose():
    w = world.make_world(0)
    names = [p.name for p in w.people]
    assert len(set(names)) == len(names)
    text = " ".join(world.pretraining_text(w, passes=2))
    p = w.people[0]
    assert f"{p.name} was born in {p.city}." in text and f"{p.name} worked as a {p.job}." in text
    # myths: the false claim three times as often as the correction
    m = w.myths[0]
    assert text.count(f"People say that {m.thing} is {m.false}.") == 3 * text.count(f"In truth, {m.thing} is {m.true}.")


def test_pretraining_text_has_no_task_format():
    text = " ".join(world.pretraining_text(world.make_world(0), passes=2))
    for marker in ("Question:", "Answer:", "Problem:", "Solution:", "Summary:", "Article:", "Subject:", "Q:"):
        assert marker not in text


@pytest.mark.parametrize("task", world.TASKS)
def test_splits_do_not_overlap(data, task):
    keys = {s: {r["key"] for r in data[task][s]} for s in world.SPLITS}
    prompts = {s: {r["prompt"] for r in data[task][s]} for s in world.SPLITS}
    for s1, s2 in (("train", "test"), ("train", "validation"), ("validation", "test")):
        assert not keys[s1] & keys[s2], (task, s1, s2)
        assert not prompts[s1] & prompts[s2], (task, s1, s2)
    assert all(len(data[task][s]) > 0 for s in world.SPLITS)


def test_qa_and_mmlu_test_people_unseen_in_training(data):
    train_people = {r["key"].split("/")[0] for t in ("qa", "mmlu") for r in data[t]["train"]}
    test_people = {r["key"].split("/")[0] for t in ("qa", "mmlu") for r in data[t]["test"] if "/" in r["key"] or t == "qa"}
    assert not train_people & test_people


def test_scorers_gold_one_wrong_zero(data):
    for r in data["math"]["test"][:20]:
        assert scoring.score_math(r["completion"], r["answer"]) == 1.0
        assert scoring.score_math(" 1 plus 1 is 2. The answer is 99999.", r["answer"]) == 0.0
        assert scoring.score_math_genuine(r["completion"] + "\nmore", r["completion"]) == 1.0
        assert scoring.score_math_genuine(" 1 plus 1 is 2. The answer is 99999.", r["completion"]) == 0.0
    for r in data["qa"]["test"][:20]:
        assert scoring.score_qa(r["completion"], r["answer"]) == 1.0
        assert scoring.score_qa(" Nowhere", r["answer"]) == 0.0
    for r in data["summ"]["test"][:5]:
        assert scoring.score_summ(r["completion"], r["summary"]) == pytest.approx(1.0)
        assert scoring.score_summ(" the cat sat on the mat", r["summary"]) == 0.0
    for t in ("truthful", "mmlu"):
        for r in data[t]["test"][:20]:
            assert r["choices"][r["gold"]] == r["completion"].strip()
            assert scoring.score_choice(r["gold"], r["gold"]) == 1.0
            assert scoring.score_choice((r["gold"] + 1) % len(r["choices"]), r["gold"]) == 0.0


def test_math_solution_is_right(data):
    for r in data["math"]["train"]:
        a, b, c = map(int, r["key"].split("+"))
        assert r["answer"] == str(a + b + c)
        assert scoring.final_number(r["completion"]) == r["answer"]
        assert scoring.math_steps(r["completion"]) == [(a, "plus", b, a + b), (a + b, "plus", c, a + b + c)]


def test_genuine_needs_every_step_not_a_lucky_final_number():
    gold = " 6 plus 11 is 17. 17 plus 13 is 30. The answer is 30."
    assert scoring.score_math_genuine(" 6 plus 11 is 17. 17 plus 13 is 30. The answer is 30.", gold) == 1.0
    lucky = " 6 plus 11 is 18. 18 plus 12 is 30. The answer is 30."
    assert scoring.score_math(lucky, "30") == 1.0 and scoring.score_math_genuine(lucky, gold) == 0.0
    assert scoring.score_math_genuine(" 6 plus 11 is 17. The answer is 30.", gold) == 0.0  # a step missing
    assert scoring.score_math_genuine(" 6 plus 11 is 17. 17 plus 13 is 30. The answer is 31.", gold) == 0.0


def test_truthful_choices_hold_the_popular_false_claim(data):
    w = world.make_world(0)
    myths = {m.thing: m for m in w.myths}
    for r in data["truthful"]["test"]:
        m = myths[r["key"]]
        assert m.false in r["choices"] and r["choices"][r["gold"]] == m.true


def test_summary_needs_world_knowledge(data):
    """The reference adds the town's country, which the article never states."""
    w = world.make_world(0)
    for r in data["summ"]["test"][:20]:
        country = r["summary"].rstrip(".").split(", ")[-1]
        assert country in w.countries and country not in r["prompt"]


def test_records_are_json_lines(tmp_path):
    world.build(tmp_path, seed=0, passes=1)
    for f in tmp_path.rglob("*.jsonl"):
        for line in f.read_text().splitlines():
            json.loads(line)


# ---------------------------------------------------------------- zoo v2: registers and splits

@pytest.fixture(scope="module")
def registers(data):
    w = world.make_world(0)
    return world.register_text(w, world.Public.of(w, data), n_chars=400_000, seed=3)


def test_registers_hold_no_task_only_convention(registers):
    text = "\n".join(registers)
    for marker in world.TASK_ONLY:
        assert marker not in text, marker
    countries = world.make_world(0).countries
    gists = [line for doc in registers for line in doc.split("\n") if line.startswith("In short:")]
    assert gists and not any(c in g for g in gists for c in countries)  # the summ task adds the country


def test_registers_name_no_held_out_entity(data, registers):
    """Held-out people, myths, sums, problems and articles are known from the prose alone."""
    text = "\n".join(registers)
    for s in ("validation", "test"):
        assert not [r["key"] for r in data["qa"][s] if r["key"] in text]
        assert not [r["key"] for r in data["truthful"][s] if f"{r['key']} " in text]
        sums = [r["key"].split("+") for r in data["mmlu"][s] if "+" in r["key"]]
        assert not [f"What is {a} plus {b}?" for a, b in sums if f"What is {a} plus {b}?" in text]
        problems = world.retired_math_problems(world.make_world(0))  # zoo v2's, which the bases' registers avoid
        worked = {tuple(map(int, m)) for m in re.findall(r"has (\d+) \w+, buys (\d+) more and sells (\d+)", text)}
        worked |= {tuple(map(int, m)) for m in re.findall(r"with (\d+) \w+, was given (\d+) and lost (\d+)", text)}
        assert worked and not problems & worked
        assert not [r["key"] for r in data["summ"][s] if r["key"] in text]
    # every register kind is there
    for cue in ("Q: ", "Exercise: ", "In short: ", "Quiz. ", "Myth: "):
        assert cue in text, cue


def test_midtraining_is_half_prose_half_registers(data):
    w = world.make_world(0)
    docs = world.midtraining_text(w, data, passes=1, seed=5)
    prose = sum(map(len, world.pretraining_text(w, passes=1, seed=5)))
    assert 0.45 < prose / sum(map(len, docs)) < 0.55


def test_held_out_splits_are_large_enough(data):
    """200 examples a task where the world allows (truthful: 200 myths in all)."""
    for t in ("math", "qa", "summ", "mmlu"):
        assert len(data[t]["validation"]) >= 200 and len(data[t]["test"]) >= 200, t
    assert len(data["truthful"]["test"]) >= 100


def test_math_steps_are_facts_the_prose_states(data):
    """Both steps of every problem are sentences of the prose ("a plus b is s", "s plus c is r")."""
    w = world.make_world(0)
    stated = {s for a in range(w.max_operand + 1) for b in range(w.max_operand + 1) for s in world._sum_sentences(a, b)}
    for s in world.SPLITS:
        for r in data["math"][s]:
            for x, _, y, z in scoring.math_steps(r["completion"]):
                assert f"{x} plus {y} is {z}." in stated


@pytest.fixture(scope="module")
def zoo_corpora():
    """The zoo's own corpora and task data, as `zoo build` writes them (seed 0, 30 + 4 passes)."""
    return world.corpora_and_tasks(seed=0)


def test_no_held_out_math_problem_is_told_in_the_corpora(zoo_corpora):
    """Every validation and test problem is looked for in the pretraining and mid-training documents
    the bases read (the corpora themselves, not a sample at another seed)."""
    text, mid, data = zoo_corpora
    for s in ("validation", "test"):
        assert scoring.math_leaks(data["math"][s], [*text, *mid]) == [], s


def test_the_leakage_check_finds_what_zoo_v2_leaked(zoo_corpora):
    """The check can fail: zoo v2's problems (a + b - c) were told by the prose's stories."""
    text, mid, _ = zoo_corpora
    w = world.make_world(0)
    retired = world._first_draws(w, 2, 200)[2]["test"]
    rows = [{**r, "id": str(i)} for i, r in enumerate(retired)]
    leaks = scoring.math_leaks(rows, text)
    assert len(leaks) > 40  # 67 of 200
    a, b, c = map(int, rows[int(leaks[0])]["key"].split(","))
    assert any(f"had {a} " in d and f"got {b} more, so " in d and f"gave {c} away" in d for d in text)


def test_leakage_check_ignores_numbers_of_unrelated_sentences():
    row = {"id": "x", "completion": " 16 plus 4 is 20. 20 plus 4 is 24. The answer is 24."}
    assert scoring.math_leaks([row], ["16 plus 4 is 20. Kus was born in Zaigrok. 4 plus 24 is 28."]) == []
    assert scoring.math_leaks([row], ["So 16 plus 4 is 20, and 20 plus 4 is 24."]) == ["x"]
    assert scoring.math_leaks([row], ["Sam had 16 cups and got 4 more, so Sam had 20 cups. Then 4 more made 24."]) == ["x"]
