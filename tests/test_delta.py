"""Cross-model control: delta-model training (sft, unlearning), the delta recipe kind, cross-
vocabulary decoding (re-tokenisation) and cross-vocabulary dynamic fusion, on tiny real models."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitfusion.testing import toy
from logitfusion.train.delta import DeltaConfig, mean_loss, train_delta
from logitfusion.train.finetune import TrainingError


pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("delta_data")
    lines = toy.task_lines()
    return {"train": write_jsonl(root / "train.jsonl", [{"text": t.strip()} for t in lines[:48]]),
            "forget": write_jsonl(root / "forget.jsonl", [{"text": t.strip()} for t in lines[:8]]),
            "retain": write_jsonl(root / "retain.jsonl", [{"text": t.strip()} for t in lines[8:40]]),
            "root": root}


@pytest.fixture(scope="module")
def trained_delta(family, task_data):
    """A fresh delta (zero lm_head) trained 16 steps on the toy task with the large model as template."""
    out = task_data["root"] / "delta_sft"
    res = train_delta(DeltaConfig(template=family["large"], delta="hidden=32,layers=1,heads=2",
                                  data=str(task_data["train"]), out=str(out), max_steps=16, lr=5e-3,
                                  batch_size=4, save_steps=1000))
    return out, res


def test_training_lowers_loss_and_starts_from_zero(family, task_data, trained_delta):
    out, res = trained_delta
    assert res.global_step == 16 and not res.skipped
    template, tok = load(family["large"])
    delta, _ = load(str(out))
    before = mean_loss(template, delta, tok, str(task_data["train"]), strength=0.0)  # the template alone
    after = mean_loss(template, delta, tok, str(task_data["train"]))
    print(f"delta sft loss: template alone {before:.3f} -> with delta {after:.3f}")
    assert after < before - 0.5
    # Rerunning the finished run is skipped; the saved delta is an ordinary model directory.
    again = train_delta(DeltaConfig(template=family["large"], delta="hidden=32,layers=1,heads=2",
                                    data=str(task_data["train"]), out=str(out), max_steps=16, lr=5e-3,
                                    batch_size=4, save_steps=1000))
    assert again.skipped and again.global_step == 16


def test_fresh_delta_outputs_zero(family):
    from logitfusion.train.delta import new_delta
    tok = AutoTokenizer.from_pretrained(family["large"])
    template = AutoModelForCausalLM.from_pretrained(family["large"])
    delta = new_delta("hidden=32,layers=1,heads=2", tok, template.config)
    z = delta(input_ids=torch.tensor([tok("the cat")["input_ids"]])).logits
    assert z.shape[-1] == len(tok) and torch.count_nonzero(z) == 0


def test_unlearning_lowers_forget_likelihood(family, task_data, trained_delta):
    """Gradient difference from the trained delta: the forget set's loss goes up, the retain set's
    rises less."""
    start, _ = trained_delta
    out = task_data["root"] / "delta_unlearn"
    train_delta(DeltaConfig(template=family["large"], delta=str(start), objective="unlearn",
                            forget=str(task_data["forget"]), retain=str(task_data["retain"]), out=str(out),
                            max_steps=6, lr=5e-3, batch_size=4, save_steps=1000))
    template, tok = load(family["large"])
    before, after = load(str(start))[0], load(str(out))[0]
    f0, f1 = (mean_loss(template, d, tok, str(task_data["forget"])) for d in (before, after))
    r0, r1 = (mean_loss(template, d, tok, str(task_data["retain"])) for d in (before, after))
    print(f"unlearning: forget loss {f0:.3f} -> {f1:.3f}, retain loss {r0:.3f} -> {r1:.3f}")
    assert f1 > f0 + 0.5
    assert f1 - f0 > r1 - r0  # toy forget and retain lines share one format, so retain moves too


def test_training_bad_input(family, task_data, other_vocab_small, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    base = dict(template=family["large"], delta="hidden=32,layers=1", out=str(tmp_path / "o"))
    with pytest.raises(TrainingError, match="--forget .* is empty: unlearning needs at least one example"):
        train_delta(DeltaConfig(**base, objective="unlearn", forget=str(empty), retain=str(task_data["retain"])))
    with pytest.raises(TrainingError, match="needs --forget"):
        train_delta(DeltaConfig(**base, objective="unlearn"))
    with pytest.raises(TrainingError, match="needs --data"):
        train_delta(DeltaConfig(**base))
    with pytest.raises(TrainingError, match="'depth=2' is not KEY=VALUE"):
        train_delta(DeltaConfig(**(base | {"delta": "hidden=32,depth=2"}), data=str(task_data["train"])))
    with pytest.raises(TrainingError, match="another tokenizer than the template"):
        train_delta(DeltaConfig(**(base | {"delta": other_vocab_small}), data=str(task_data["train"])))


def test_cli_delta_train_errors(family, tmp_path):
    from typer.testing import CliRunner

    from logitfusion.cli import app
    empty = tmp_path / "forget.jsonl"
    empty.write_text("")
    res = CliRunner().invoke(app, ["delta", "train", "--template", family["large"], "--delta", "hidden=32",
                                   "--objective", "unlearn", "--forget", str(empty), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "unlearning needs at least one example" in " ".join(res.output.split())


# ---------------------------------------------------------------- using a delta; cross-vocabulary

from logitfusion.engine.decoding import Batch  # noqa: E402
from logitfusion.engine.sampling import SamplingParams  # noqa: E402
from logitfusion.engine.fuser import Fuser  # noqa: E402
from logitfusion.engine.registry import SearchConfig  # noqa: E402
from logitfusion.engine.models import LoadError, VocabularyMismatchError  # noqa: E402

PROMPTS = ["the cat sells", "Question: 3 plus 4? Answer:", "a river"]
LONG_PROMPTS = PROMPTS + ["the king has seven books and", "how many pears does the farmer", "Question:"]


@pytest.fixture(scope="module")
def zero_delta(family, tmp_path_factory):
    """An untrained delta on the large model's tokenizer: lm_head is zero, so it outputs 0."""
    from logitfusion.train.delta import new_delta
    out = tmp_path_factory.mktemp("zero_delta") / "delta"
    tok = AutoTokenizer.from_pretrained(family["large"])
    new_delta("hidden=32,layers=1,heads=2", tok, AutoModelForCausalLM.from_pretrained(family["large"]).config) \
        .save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A second tokenizer (byte-level BPE of 280 tokens on the same corpus, vs the family's 300)
    with a small base, an expert of it and a delta model (random, so its logits matter)."""
    root = tmp_path_factory.mktemp("other_tok")
    tok = toy.build_tokenizer(root / "tokenizer", vocab_size=280)
    toy.build_model(root / "small", tok, hidden=48, layers=2, heads=4, seed=21)
    toy.perturbed_copy(root / "small", root / "expert", scale=0.5, seed=22)
    toy.build_model(root / "delta", tok, hidden=32, layers=1, heads=2, seed=23, init_std=0.05)
    return {k: str(root / k) for k in ("tokenizer", "small", "expert", "delta")}


@pytest.fixture(scope="module")
def cross_delta(family, other):
    return Fuser.from_pretrained(family["large"], delta={"path": other["delta"], "mapping": "auto"})


def test_zero_delta_leaves_greedy_output_unchanged(family, zero_delta, fuser1):
    f = Fuser.from_pretrained(family["large"], delta=zero_delta)
    assert f.solver.name == "delta"
    alone = f.generate(PROMPTS, solver="large", max_new_tokens=12, ignore_eos=True)
    with_delta = f.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
    assert [g.token_ids for g in with_delta] == [g.token_ids for g in alone]
    assert [g.token_ids for g in alone] == [g.token_ids for g in fuser1.generate(PROMPTS, solver="large",
                                                                               max_new_tokens=12, ignore_eos=True)]


def test_mapping_counts(cross_delta):
    counts = cross_delta.models.delta.vocab_map.counts
    print("large (300 tokens) -> delta (280) mapping:", counts)
    assert counts["byte"] == 256 and counts["special"] == 4 and counts["exact"] > 0 and counts["approx"] > 0


def _follows(batch):
    """Count the re-tokenisations of every cross-vocabulary row."""
    calls = {"extend": 0, "retokenise": 0}
    for retok in batch.retoks:
        if retok is not None:
            inner = retok.follow

            def follow(row, token, inner=inner):
                grew = inner(row, token)
                calls["extend" if grew else "retokenise"] += 1
                return grew
            retok.follow = follow
    return calls


@torch.no_grad()
def test_retokenisation_equals_recompute_from_scratch(cross_delta, other):
    """Every step, the delta's logits in the batch (extended cache, or rebuilt after a
    re-tokenisation) equal the delta run from scratch on the text so far, re-tokenised."""
    models = cross_delta.models
    dmodel, dtok, vmap = models.delta.model, models.delta.tokenizer, models.delta.vocab_map
    batch = Batch(models, cross_delta.solver)
    calls = _follows(batch)
    seqs = batch.add(LONG_PROMPTS, [SamplingParams(max_new_tokens=16, ignore_eos=True) for _ in LONG_PROMPTS])
    naive_differs = 0
    while len(batch):
        batch.step()
        if not len(batch):
            break
        ctx = next(c for c in batch.contexts if c.members == [models.delta])
        for i, seq in enumerate(batch.seqs):
            text = models.tokenizer.decode(seq.tokens)
            scratch_ids = dtok(LONG_PROMPTS[seqs.index(seq)])["input_ids"]
            row = ctx.rows[i]
            assert row.user == seq.tokens
            if row.ids != scratch_ids + dtok(text, add_special_tokens=False)["input_ids"]:
                naive_differs += 1  # extended through exact tokens: ids differ, text is the same
            assert dtok.decode(row.ids[len(row.prompt):]) == text
            z = vmap.apply(dmodel(input_ids=torch.tensor([row.ids])).logits[0, -1, : len(dtok)])
            torch.testing.assert_close(batch.logits["delta"][i], z, atol=1e-4, rtol=1e-4)
    print("cross-vocabulary delta rows:", calls)
    assert calls["retokenise"] > 0 and calls["extend"] > 0 and naive_differs > 0


def test_cross_vocab_delta_batched_equals_unbatched(cross_delta):
    batched = cross_delta.generate(PROMPTS, max_new_tokens=10, ignore_eos=True, batch_size=3)
    one = [cross_delta.generate([p], max_new_tokens=10, ignore_eos=True)[0] for p in PROMPTS]
    assert [g.token_ids for g in batched] == [g.token_ids for g in one]
    alone = cross_delta.generate(PROMPTS, solver="large", max_new_tokens=10, ignore_eos=True)
    assert [g.token_ids for g in batched] != [g.token_ids for g in alone]  # the delta matters
    half = cross_delta.generate(PROMPTS, solver="delta:0.0", max_new_tokens=10, ignore_eos=True)
    assert [g.token_ids for g in half] == [g.token_ids for g in alone]


def test_delta_logprobs_teacher_forced_equal_decoding(cross_delta):
    """lm-eval's loglikelihood path (teacher forcing, re-tokenising where decoding did) scores a
    generation exactly as decoding did."""
    from logitfusion.eval.lm import fused_logprobs
    batch = Batch(cross_delta.models, cross_delta.solver)
    calls = _follows(batch)
    seqs = batch.add(LONG_PROMPTS, [SamplingParams(max_new_tokens=16, ignore_eos=True, logprobs=True)
                                    for _ in LONG_PROMPTS])
    while len(batch):
        batch.step()
    assert calls["retokenise"] > 0
    scored = fused_logprobs(cross_delta.models, cross_delta.solver, LONG_PROMPTS, [s.tokens for s in seqs])
    for s, sc in zip(seqs, scored):
        torch.testing.assert_close(sc.logprobs, torch.tensor(s.logprobs), atol=2e-4, rtol=1e-4)
        assert bool(sc.greedy.all())


def test_cross_vocab_fusion_zero_weights_equal_large(family, other):
    f = Fuser.from_pretrained(family["large"], other["small"], {"e": other["expert"]}, mapping="auto")
    assert f.models.small.foreign and f.models.experts[0].foreign
    large = f.generate(PROMPTS, solver="large", max_new_tokens=10, ignore_eos=True)
    for spec in ("static:0", "static:0.0"):
        assert [g.token_ids for g in f.generate(PROMPTS, solver=spec, max_new_tokens=10, ignore_eos=True)] \
            == [g.token_ids for g in large]
    zero_grid = f.method("dynamic", SearchConfig(grid=[0.0]))
    assert [g.token_ids for g in f.generate(PROMPTS, solver=zero_grid, max_new_tokens=10, ignore_eos=True)] \
        == [g.token_ids for g in large]
    # Real dynamic fusion across vocabularies: batched == unbatched, and the weights move.
    dyn = f.generate(PROMPTS, solver="dynamic", max_new_tokens=10, ignore_eos=True, trace=True, batch_size=3)
    one = [f.generate([p], solver="dynamic", max_new_tokens=10, ignore_eos=True)[0] for p in PROMPTS]
    assert [g.token_ids for g in dyn] == [g.token_ids for g in one]
    assert any(w[0] > 0 for g in dyn for w in g.weights)
    # Speculation is off for cross-vocabulary small sides, and the output is the plain one.
    assert [g.token_ids for g in f.generate(PROMPTS, solver="dynamic", max_new_tokens=10, ignore_eos=True,
                                            speculate=4)] == [g.token_ids for g in dyn]


def test_cross_vocab_needs_a_mapping(family, other, tmp_path):
    with pytest.raises(VocabularyMismatchError, match="mapping: auto"):
        Fuser.from_pretrained(family["large"], other["small"], {"e": other["expert"]})
    # A delta whose vocabulary matches neither the user model's nor comes with a mapping.
    with pytest.raises(VocabularyMismatchError, match=r"delta: its vocabulary \(280 tokens\) is not the large"):
        Fuser.from_pretrained(family["large"], delta=other["delta"])
    # The small side's experts must share the small base's tokenizer even with a mapping.
    with pytest.raises(VocabularyMismatchError, match="expert:e"):
        Fuser.from_pretrained(family["large"], other["small"], {"e": family["experts"]["expert1"]}, mapping="auto")


def test_delta_bad_input(family, other, tmp_path):
    import shutil
    broken = tmp_path / "broken_delta"
    shutil.copytree(other["delta"], broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(LoadError, match="delta: could not load a tokenizer"):
        Fuser.from_pretrained(family["large"], delta={"path": str(broken), "mapping": "auto"})
    with pytest.raises(LoadError, match="delta.mapping: .*does not exist|delta.mapping: .*not a vocabulary map"):
        Fuser.from_pretrained(family["large"], delta={"path": other["delta"], "mapping": str(tmp_path / "no.safetensors")})
    from logitfusion.engine.vocab import build_map
    wrong = build_map(other["tokenizer"], family["tokenizer"]).save(tmp_path / "wrong.safetensors")
    with pytest.raises(LoadError, match="built for other tokenizers"):
        Fuser.from_pretrained(family["large"], delta={"path": other["delta"], "mapping": str(wrong)})
    f = Fuser.from_pretrained(family["large"])
    with pytest.raises(Exception, match="needs a delta model"):
        f.generate(["the cat"], solver="delta", max_new_tokens=2)


# ---------------------------------------------------------------- every front end takes a delta recipe

@pytest.fixture(scope="module")
def delta_recipe(family, other, tmp_path_factory):
    import yaml
    path = tmp_path_factory.mktemp("delta_recipe") / "cmc.yaml"
    path.write_text(yaml.safe_dump({"large": {"path": family["large"]},
                                    "delta": {"path": other["delta"], "mapping": "auto", "strength": 1.0},
                                    "generation": {"max_new_tokens": 8}}))
    return path


def test_cli_generate_and_eval_take_a_delta_recipe(delta_recipe, tmp_path):
    from typer.testing import CliRunner

    from logitfusion.cli import app
    ref = Fuser.from_recipe(delta_recipe).generate(["the cat sells"])[0]
    r = CliRunner().invoke(app, ["generate", "-r", str(delta_recipe), "-p", "the cat sells"])
    assert r.exit_code == 0, r.output
    assert ref.text in r.output
    r = CliRunner().invoke(app, ["recipe", "check", str(delta_recipe), "--load"])
    assert r.exit_code == 0, r.output
    assert "delta mapped onto the large model's vocabulary" in r.output and "vocabularies match" not in r.output
    out = tmp_path / "eval.jsonl"
    r = CliRunner().invoke(app, ["eval", "-r", str(delta_recipe), "--tasks", "toy_sums_mc", "--methods", "large,delta",
                                 "--limit", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(json.loads(line)["key"] for line in out.read_text().splitlines()) == \
        ["delta|toy_sums_mc", "large|toy_sums_mc"]


def test_lm_eval_backend_scores_a_delta_like_decoding(cross_delta):
    from lm_eval.api.instance import Instance

    from logitfusion.eval.lm import FusedLM
    lm = FusedLM(fuser=cross_delta, solver="delta")
    gens = cross_delta.generate(LONG_PROMPTS, max_new_tokens=8, ignore_eos=True)
    texts = lm.generate_until([Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 8}), i)
                               for i, p in enumerate(LONG_PROMPTS)])
    assert texts == [g.text for g in gens]
    # The token-level path that loglikelihood runs after tokenising: every generated token is the
    # fused argmax. (Random toy models emit token sequences whose text re-tokenises differently,
    # so the text requests are only checked to score.)
    assert all(greedy for _, greedy in lm._loglikelihood(LONG_PROMPTS, [g.token_ids for g in gens]))
    scored = lm.loglikelihood([Instance("loglikelihood", {}, (p, " 7"), i) for i, p in enumerate(LONG_PROMPTS)])
    assert all(math.isfinite(lp) and lp < 0 for lp, _ in scored)


def test_server_serves_a_delta_recipe(delta_recipe):
    from test_server import KEY, Server

    from logitfusion.serve import create_app
    fuser = Fuser.from_recipe(delta_recipe)
    want = fuser.generate(["the cat sells"], max_new_tokens=6)[0].text
    with Server(create_app({"cmc": fuser}, api_key=KEY)) as s:
        got = s.client().completions.create(model="cmc", prompt="the cat sells", max_tokens=6)
        alone = s.client().completions.create(model="cmc", prompt="the cat sells", max_tokens=6,
                                              extra_body={"fusion": {"solver": "large"}})
    assert got.choices[0].text == want
    assert alone.choices[0].text == fuser.generate(["the cat sells"], solver="large", max_new_tokens=6)[0].text


def test_delta_training_resumes_from_its_last_checkpoint(family, task_data, tmp_path):
    """A run cut short after its checkpoint at step 2 (here: what it wrote later removed) resumes
    there and ends with the weights of an uninterrupted run."""
    from safetensors.torch import load_file
    cfg = dict(template=family["large"], delta="hidden=16,layers=1,heads=2", data=str(task_data["train"]),
               max_steps=3, lr=5e-3, batch_size=4, save_steps=2)
    whole = train_delta(DeltaConfig(**cfg, out=str(tmp_path / "whole")))
    cut = tmp_path / "cut"
    train_delta(DeltaConfig(**cfg, out=str(cut)))
    import shutil
    (cut / "delta.json").unlink()
    (cut / "model.safetensors").unlink()
    shutil.rmtree(cut / "checkpoints" / "checkpoint-3")
    resumed = train_delta(DeltaConfig(**cfg, out=str(cut)))
    assert resumed.resumed_from and resumed.resumed_from.endswith("checkpoint-2")
    assert resumed.global_step == whole.global_step == 3
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("data, message", [
    ({"solver": {"kind": "delta"}}, "solver kind 'delta' needs a `delta` section"),
    ({"delta": {"path": "D", "mapping": "nearest"}}, "field `delta.mapping`: mapping 'nearest': write auto"),
    ({"delta": {"path": "D", "strength": float("nan")}}, "field `delta.strength`: strength must be a finite number"),
    ({"delta": {"path": "D", "strenght": 1}}, "field `delta.strenght`: unknown field"),
    ({"delta": {"strength": 1}}, "field `delta.path`: required field is missing"),
    ({"small": {"path": "S", "mapping": 3}}, "field `small.mapping`"),
])
def test_recipe_delta_section_errors_name_the_field(data, message):
    from logitfusion.engine.recipe import Recipe, RecipeError
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Recipe.from_dict({"large": {"path": "L"}} | data)


def test_recipe_delta_defaults_and_relative_paths(tmp_path):
    from logitfusion.engine.recipe import Recipe
    r = Recipe.from_dict({"large": {"path": "L"}, "delta": {"path": "D", "mapping": "maps/m.safetensors"},
                          "load": {"vocab_cache": "cache"}}, base_dir=tmp_path)
    assert r.solver.kind == "delta" and r.build_solver().strength == 1.0 and r.delta_strength == 1.0
    assert r.delta.path == str(tmp_path / "D") and r.delta.mapping == str(tmp_path / "maps" / "m.safetensors")
    assert r.load.vocab_cache == str(tmp_path / "cache")
    assert Recipe.from_dict({"large": {"path": "L"}, "delta": {"path": "D", "mapping": "auto"}}).delta.mapping == "auto"
