"""`logitfusion bench cmc` (cmc_bench.py): the unlearning split of the world, the cell runner end to
end on the toy models (zoo tasks and fact completion through the engine), resuming and the report."""

import json

import pytest

from logitfusion.bench import cmc as cmc_bench, world
from logitfusion.eval.records import RecordWriter, read_keyed


def people(rows):
    return {r["key"] for r in rows}


def test_unlearn_split_is_deterministic_and_people_are_disjoint():
    a, b = cmc_bench.unlearn_split(0), cmc_bench.unlearn_split(0)
    assert a == b
    forget, retain, heldout = (people(a[s]) for s in ("forget", "retain", "heldout"))
    assert len(forget) == cmc_bench.N_FORGET and len(retain) == cmc_bench.N_RETAIN
    assert not forget & retain and not forget & heldout and not retain & heldout
    assert forget | retain | heldout == {p.name for p in world.make_world(0).people}
    assert sorted(forget) == a["people"]
    assert all(len([r for r in a["forget"] if r["key"] == p]) == 3 for p in forget)  # town, year, job
    # the facts are the world's: a forget row's answer is that person's town, year or job
    w = {p.name: p for p in world.make_world(0).people}
    for r in a["forget"]:
        p = w[r["key"]]
        assert r["answer"] in (p.city, str(p.year), p.job) and r["completion"] == " " + r["answer"]
    assert cmc_bench.unlearn_split(1)["people"] != a["people"]  # another world, other people


def test_write_unlearn_split_files_and_resume(tmp_path):
    folder = cmc_bench.write_unlearn_split(tmp_path)
    rows = {s: [json.loads(x) for x in (folder / f"{s}.jsonl").read_text().splitlines()]
            for s in ("forget", "retain", "heldout", "forget_train")}
    assert rows["forget"] == cmc_bench.unlearn_split(0)["forget"]
    # every retain row is paired with a forget row once per epoch of gradient difference
    assert len(rows["forget_train"]) >= len(rows["retain"])
    assert people(rows["forget_train"]) == people(rows["forget"])
    stamp = (folder / "forget.jsonl").stat().st_mtime_ns
    cmc_bench.write_unlearn_split(tmp_path)
    assert (folder / "forget.jsonl").stat().st_mtime_ns == stamp  # a finished split is left alone


def test_first_word_scoring():
    assert cmc_bench.first_word(" Drouklu in Drearous.") == "Drouklu"
    assert cmc_bench.first_word(" 1848.") == "1848"
    assert cmc_bench.first_word("  ") == ""


@pytest.fixture(scope="module")
def toy_zoo(tmp_path_factory, family):
    """A zoo-shaped ROOT on the toy models: models/large, models/small, the zoo's task data and
    the unlearning split (the toy small model stands in as a delta: same vocabulary as large)."""
    root = tmp_path_factory.mktemp("cmc_zoo")
    (root / "models").mkdir()
    for name in ("large", "small"):
        (root / "models" / name).symlink_to(family[name])
    for task, splits in world.task_data(world.make_world(0), seed=2).items():
        for split, rows in splits.items():
            world._write(root / "data" / task / f"{split}.jsonl", rows)
    cmc_bench.write_unlearn_split(root)
    return root


def test_cells_need_the_other_vocabulary_model(toy_zoo):
    with pytest.raises(cmc_bench.CmcBenchError, match="zoo build .*--only models/large-alt"):
        cmc_bench.cells(toy_zoo, targets=["large", "large-alt"])
    with pytest.raises(cmc_bench.CmcBenchError, match="zoo build .*--only models/large-b"):
        cmc_bench.cells(toy_zoo)
    same = cmc_bench.cells(toy_zoo, tasks=["qa"], targets=["large", "small"])
    assert {c.target for c in same} == {"large", "small"}
    assert all("mapping" not in json.loads(c.recipe).get("delta", {}) for c in same)  # same vocabulary


@pytest.mark.slow
def test_cell_runner_end_to_end_on_toy_models(toy_zoo, family, tmp_path):
    instruct = cmc_bench.recipe(toy_zoo / "models" / "large", family["small"])
    todo = [cmc_bench.Cell("task", "large", "alone", "qa", instruct, "large"),
            cmc_bench.Cell("task", "large", "instruct", "qa", instruct, "delta"),
            cmc_bench.Cell("task", "large", "instruct", "mmlu", instruct, "delta"),
            cmc_bench.Cell("unlearn", "large", "alone", "forget", instruct, "large"),
            cmc_bench.Cell("unlearn", "large", "unlearn", "forget", instruct, "delta")]
    path = tmp_path / "cmc.jsonl"
    records = cmc_bench.run_cells(todo, RecordWriter(path, key="key"), toy_zoo, limit=2, batch_size=2)
    assert [r["key"] for r in records] == [c.key for c in todo]
    assert all(0.0 <= r["value"] <= 1.0 and r["n"] == 2 for r in records)
    on_disk = read_keyed(path)  # written as they finished
    assert set(on_disk) == {c.key for c in todo}
    # the unlearn cells really decoded (through Fuser.generate) the forget prompts
    forget = [json.loads(x) for x in (toy_zoo / "data" / "unlearn" / "forget.jsonl").read_text().splitlines()]
    assert on_disk["unlearn|large|alone|forget"]["examples"][0][0] == forget[0]["prompt"]
    text = cmc_bench.report(list(on_disk.values()), toy_zoo, command="logitfusion bench cmc --limit 2")
    assert "## Instruction / task gain" in text and "## Unlearning" in text
    assert "logitfusion bench cmc --limit 2" in text


def test_report_says_where_the_delta_hurts(tmp_path):
    recs = [{"key": f"task|small|{v}|math", "kind": "task", "target": "small", "variant": v, "data": "math",
             "metric": "exact_match,none", "value": x, "limit": 100, "seconds": 1.0}
            for v, x in (("alone", 0.30), ("instruct", 0.10))]
    text = cmc_bench.report(recs, tmp_path)
    assert "| small | gain | -20.0 | -20.0 |" in text
    assert "The delta lowers the score on: small/math (-20.0)." in text
