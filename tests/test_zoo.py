"""The bundled zoo: it loads, shares one vocabulary, decodes stably; the build pipeline runs on a toy config."""

import json

import pytest

from logitfusion.bench import world, zoo
from logitfusion.engine.fuser import Fuser


pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it


ROOT = zoo.BUNDLED
needs_zoo = pytest.mark.skipif(not (ROOT / "models" / "large" / "config.json").exists(),
                               reason="the bundled zoo is not in this checkout")


@needs_zoo
def test_bundled_zoo_is_complete():
    names = {r["name"] for r in zoo.describe(ROOT)}
    expected = {"models/large", "models/small", "experts/multitask", "experts/merged"} | \
        {f"experts/{t}" for t in world.TASKS} | {f"experts/{t}-lora" for t in world.TASKS}
    assert expected <= names
    for t in world.TASKS:
        for s in world.SPLITS:
            assert (ROOT / "data" / t / f"{s}.jsonl").stat().st_size > 0
    size = sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file())
    assert size < 60e6, f"the bundled zoo is {size / 1e6:.1f} MB; the budget is 60 MB"


@needs_zoo
def test_bundled_models_load_with_all_experts():
    """Loading runs the vocabulary and architecture checks on every member."""
    experts = {t: str(ROOT / "experts" / t) for t in world.TASKS} | {"math-lora": str(ROOT / "experts" / "math-lora")}
    fuser = Fuser.from_pretrained(str(ROOT / "models" / "large"), str(ROOT / "models" / "small"), experts)
    assert fuser.expert_names == list(experts)
    large = fuser.models.large.model.config
    small = fuser.models.small.model.config
    assert large.hidden_size > small.hidden_size and large.num_hidden_layers >= small.num_hidden_layers


GOLDEN = ROOT / "golden.json"


@needs_zoo
def test_fused_generation_on_the_zoo_is_stable():
    """Golden token ids of a short greedy dynamic fusion (written by the zoo install step)."""
    golden = json.loads(GOLDEN.read_text())
    fuser = Fuser.from_pretrained(str(ROOT / "models" / "large"), str(ROOT / "models" / "small"),
                                  {"math": str(ROOT / "experts" / "math")})
    for method, ids in golden["ids"].items():
        gens = fuser.generate(golden["prompts"], solver=method, max_new_tokens=golden["max_new_tokens"])
        assert [g.token_ids for g in gens] == ids, method


def test_build_pipeline_on_a_toy_config(tmp_path):
    """Every step of the real build (world, tokenizer, both bases pretrained on prose then
    mid-trained on registers, an expert, a LoRA expert, a ceiling) on tiny sizes and a few steps;
    a rerun skips finished steps."""
    cfg = zoo.ZooConfig(vocab_size=400, large=zoo.Size(32, 1, 2, 64), small=zoo.Size(16, 1, 2, 32),
                        pretrain_passes=1, pretrain_epochs=0.5, midtrain_passes=1, midtrain_epochs=0.1,
                        finetune_epochs=0.05)
    only = ["data", "init", "prose/large", "models/large", "prose/small", "models/small", "experts/math",
            "experts/math-lora", "ceilings/math"]
    timings = zoo.build(tmp_path, cfg, only=only, log=lambda _: None)
    for d in ("models/large", "models/small", "experts/math", "ceilings/math"):
        assert (tmp_path / d / "model.safetensors").exists(), d
    assert (tmp_path / "experts/math-lora/adapter_model.safetensors").exists()
    assert set(timings) >= {"prose/large", "models/large", "models/small", "experts/math", "ceilings/math"}
    assert json.loads((tmp_path / "models/large/config.json").read_text())["use_cache"] is True
    logs = []
    zoo.build(tmp_path, cfg, only=only, log=logs.append)
    assert json.loads((tmp_path / "timings.json").read_text()) == timings  # nothing retrained
    fuser = Fuser.from_pretrained(str(tmp_path / "models/large"), str(tmp_path / "models/small"),
                                  {"math": str(tmp_path / "experts/math"), "lora": str(tmp_path / "experts/math-lora")})
    assert len(fuser.generate("Problem: 2 plus 2?\nSolution:", max_new_tokens=3)[0].token_ids) <= 3


@needs_zoo
def test_shipped_configs_keep_the_kv_cache_on():
    """Plain transformers `generate` on a zoo model must use its KV cache."""
    configs = list(ROOT.rglob("config.json"))
    assert configs
    for f in configs:
        assert json.loads(f.read_text()).get("use_cache") is True, f


@needs_zoo
def test_shipped_task_data_is_what_the_world_generates():
    """The bundled tasks come from the current world code (a changed generator needs a rebuilt zoo)."""
    data = world.corpora_and_tasks(seed=0)[2]
    for t in world.TASKS:
        for s in world.SPLITS:
            rows = [json.loads(line) for line in (ROOT / "data" / t / f"{s}.jsonl").read_text().splitlines()]
            assert rows == data[t][s], (t, s)


@needs_zoo
def test_zoo_tasks_are_the_benchs_and_load_with_their_scorers():
    """The zoo's lm-eval tasks live in the bench (eval imports no bench): eval's task manager finds
    them through the bench's folder, their data loads from the bundled zoo and their scorers run."""
    from logitfusion.eval.lm import TASKS_DIR, task_manager
    names = [f"zoo_{t}" for t in ("math", "truthful", "qa", "summ", "mmlu")]
    assert not list(TASKS_DIR.glob("zoo_*.yaml")) and {p.stem for p in zoo.TASKS_DIR.glob("*.yaml")} == set(names)
    manager = task_manager(names, [zoo.TASKS_DIR])
    assert set(names) <= set(manager.all_tasks)
    task = manager.load(["zoo_math"])["tasks"]["zoo_math"]
    doc = next(iter(task.test_docs()))
    assert task.process_results(doc, [doc["completion"]]) == {"exact_match": 1.0, "genuine": 1.0}
    assert task.process_results(doc, ["no number here"]) == {"exact_match": 0.0, "genuine": 0.0}
