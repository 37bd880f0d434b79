"""Making experts: `logitfusion finetune` (HF Trainer, full or LoRA, resumable) and `merge`
(task arithmetic), on a tiny toy base built in a temporary folder."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from typer.testing import CliRunner

from logitfusion.testing import toy
from logitfusion.cli import app
from logitfusion.engine.fuser import Fuser
from logitfusion.train.finetune import MARKER, Collator, FinetuneConfig, encode_example, finetune, load_dataset


pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it


runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def said(r) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(r.output.replace("\n", "").split()) + " | " + " ".join(r.output.split())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    tok = toy.build_tokenizer(root / "base")
    toy.build_model(root / "base", tok, hidden=48, layers=2, init_std=0.02)
    train = root / "train.jsonl"
    with train.open("w") as f:
        for line in toy.task_lines():
            q, a = line.rstrip("\n").split(" Answer:")
            f.write(json.dumps({"prompt": q + " Answer:", "completion": a}) + "\n")
    held_out = root / "held_out.jsonl"
    _, test = toy.arithmetic_facts()
    held_out.write_text("".join(json.dumps({"prompt": p, "completion": " " + a}) + "\n" for p, a in test))
    return {"root": root, "base": str(root / "base"), "train": train, "held_out": held_out}


def completion_loss(model_dir, data) -> float:
    """Mean loss on completion tokens by a direct forward (no Trainer)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = Collator(tok.pad_token_id)(load_dataset(data, tok))
    with torch.no_grad():
        return float(model(**batch).loss)


def cfg(base, out, **kw):
    args = dict(base=base["base"], data=str(base["train"]), out=str(out), max_steps=8, save_steps=4,
                lr=3e-3, batch_size=16)
    return FinetuneConfig(**(args | kw))


def weights(path) -> dict:
    name = "adapter_model.safetensors" if (Path(path) / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(Path(path) / name))


def test_labels_mask_the_prompt_and_pad(base):
    tok = AutoTokenizer.from_pretrained(base["base"])
    pc = encode_example({"prompt": "Question: 3 plus 4?", "completion": " 7"}, tok, "{prompt} Answer:", 64)
    text = encode_example({"text": "3 plus 4 makes 7."}, tok, "{prompt}", 64)
    batch = Collator(tok.pad_token_id)([pc, text])
    n_prompt = len(tok("Question: 3 plus 4? Answer:")["input_ids"])  # as the engine tokenises it
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    assert (labels[0, :n_prompt] == -100).all()
    n0 = int(mask[0].sum())
    assert tok.decode(labels[0, n_prompt:n0]) == " 7" + tok.eos_token  # completion + EOS, nothing else
    assert (labels[0, n0:] == -100).all() and (mask[0, n0:] == 0).all()
    n1 = int(mask[1].sum())
    assert torch.equal(labels[1, :n1], ids[1, :n1])  # text: loss on every token
    assert ids[1, n1 - 1] == tok.eos_token_id


def test_finetune_lowers_train_and_held_out_loss(base, tmp_path):
    out = tmp_path / "expert"
    before = completion_loss(base["base"], base["held_out"])
    before_train = completion_loss(base["base"], base["train"])
    r = cli("finetune", "--base", base["base"], "--data", base["train"], "--out", out, "--max-steps", 40,
            "--lr", "3e-3", "--batch-size", 16, "--save-steps", 20, "--warmup-ratio", 0.1)
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not list(out.glob("*.bin"))
    after_train = completion_loss(out, base["train"])
    after = completion_loss(out, base["held_out"])
    print(f"completion loss train {before_train:.3f} -> {after_train:.3f}, held out {before:.3f} -> {after:.3f}")
    assert after_train < before_train - 1.0
    assert after < before - 1.0
    state = json.loads((out / "checkpoints" / "checkpoint-40" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses[-1] < losses[0]
    # a rerun of the finished job does nothing
    r = cli("finetune", "--base", base["base"], "--data", base["train"], "--out", out, "--max-steps", 40,
            "--lr", "3e-3", "--batch-size", 16, "--save-steps", 20, "--warmup-ratio", 0.1)
    assert r.exit_code == 0 and "nothing to do" in said(r)
    # the result is an expert
    fuser = Fuser.from_pretrained(base["base"], base["base"], {"qa": str(out)})
    gen = fuser.generate(["Question: 3 plus 4? Answer:"], solver="expert:qa", max_new_tokens=4)
    assert gen[0].token_ids


def test_lora_adapter_loads_as_expert_and_generates(base, tmp_path):
    out = tmp_path / "lora"
    r = cli("finetune", "--base", base["base"], "--data", base["train"], "--out", out, "--lora",
            "--lora-rank", 4, "--lora-alpha", 8, "--max-steps", 6, "--lr", "3e-3", "--batch-size", 16)
    assert r.exit_code == 0, r.output
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["r"] == 4 and set(conf["target_modules"]) == {"q_proj", "v_proj"}
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    fuser = Fuser.from_pretrained(base["base"], base["base"], {"qa": str(out)})
    expert = fuser.models.experts[0]
    assert expert.adapter == "qa" and expert.model is fuser.models.small.model  # shares the small base
    gens = fuser.generate(["Question: 3 plus 4? Answer:"], max_new_tokens=4)
    assert gens[0].token_ids
    # the adapter was trained (B starts at zero)
    assert any(v.abs().sum() > 0 for k, v in weights(out).items() if "lora_B" in k)


class Interrupt(Exception):
    pass


class StopAfterSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise Interrupt()


def test_same_seed_same_weights_and_resume_completes(base, tmp_path):
    a = finetune(cfg(base, tmp_path / "a"))
    b = finetune(cfg(base, tmp_path / "b"))
    wa, wb = weights(a.out), weights(b.out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = finetune(cfg(base, tmp_path / "c", seed=1))
    assert not all(torch.equal(wa[k], weights(c.out)[k]) for k in wa)

    out = tmp_path / "r"
    with pytest.raises(Interrupt):
        finetune(cfg(base, out), callbacks=[StopAfterSave(4)])
    assert (out / "checkpoints" / "checkpoint-4").is_dir() and not (out / "model.safetensors").exists()
    res = finetune(cfg(base, out))
    assert res.resumed_from and res.resumed_from.endswith("checkpoint-4")
    state = json.loads((out / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and res.global_step == 8
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps == sorted(set(steps))  # steps 1..4 were not trained twice
    wr = weights(out)
    assert all(torch.allclose(wa[k], wr[k], atol=1e-5) for k in wa)  # same result as uninterrupted


@pytest.mark.parametrize("lora", [False, True])
def test_a_run_killed_after_its_final_checkpoint_is_restored_not_retrained(base, tmp_path, lora):
    """Killed between the final checkpoint and writing the model: the rerun restores that
    checkpoint (the Trainer alone would train one step more) and gives the uninterrupted weights."""
    whole = finetune(cfg(base, tmp_path / "whole", lora=lora))
    out = tmp_path / "cut"
    finetune(cfg(base, out, lora=lora))
    for f in out.iterdir():  # what a kill after checkpoint-8 leaves: the checkpoints only
        if f.name != "checkpoints":
            f.unlink()
    res = finetune(cfg(base, out, lora=lora))
    assert res.resumed_from.endswith("checkpoint-8") and res.global_step == 8
    assert res.train_loss == pytest.approx(whole.train_loss, rel=0.2)
    assert not (out / "checkpoints" / "checkpoint-9").exists()
    wa, wr = weights(whole.out), weights(out)
    assert wa.keys() == wr.keys() and all(torch.equal(wa[k], wr[k]) for k in wa)


def test_merge_task_arithmetic(base, tmp_path):
    e1 = tmp_path / "e1"
    toy.perturbed_copy(base["base"], e1, scale=0.5, seed=3)
    wb, we = weights(base["base"]), weights(e1)
    r = cli("merge", "--base", base["base"], "--expert", e1, "--lam", 0, "--out", tmp_path / "m0")
    assert r.exit_code == 0, r.output
    m0 = weights(tmp_path / "m0")
    assert all(torch.equal(m0[k], wb[k]) for k in wb)
    r = cli("merge", "--base", base["base"], "--expert", e1, "--lam", 1, "--out", tmp_path / "m1")
    assert r.exit_code == 0, r.output
    m1 = weights(tmp_path / "m1")
    assert all(torch.allclose(m1[k], we[k], atol=1e-6) for k in wb)
    e2 = tmp_path / "e2"
    toy.perturbed_copy(base["base"], e2, scale=0.5, seed=4)
    r = cli("merge", "--base", base["base"], "--expert", e1, "--expert", e2, "--lam", 0.5, "--out", tmp_path / "mh")
    assert r.exit_code == 0, r.output
    mh, w2 = weights(tmp_path / "mh"), weights(e2)
    k = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(mh[k], wb[k] + 0.5 * ((we[k] - wb[k]) + (w2[k] - wb[k])), atol=1e-6)
    fuser = Fuser.from_pretrained(base["base"], base["base"], {"merged": str(tmp_path / "mh")})
    assert fuser.generate(["Question: 1 plus 2? Answer:"], max_new_tokens=3)[0].token_ids
    # a LoRA adapter is merged into the base weights first
    ad = toy.lora_adapter(base["base"], tmp_path / "ad")
    r = cli("merge", "--base", base["base"], "--expert", ad, "--lam", 1, "--out", tmp_path / "ml")
    assert r.exit_code == 0, r.output
    ml = weights(tmp_path / "ml")
    assert not torch.equal(ml[k], wb[k]) and torch.equal(ml["model.embed_tokens.weight"], wb["model.embed_tokens.weight"])


def test_merge_refuses_other_architecture(base, tmp_path):
    tok = AutoTokenizer.from_pretrained(base["base"])
    toy.build_model(tmp_path / "wide", tok, hidden=64, layers=2)
    r = cli("merge", "--base", base["base"], "--expert", tmp_path / "wide", "--out", tmp_path / "m")
    assert r.exit_code == 2 and "not derived from the small base" in said(r)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("", "is empty"),
    ('{"prompt": "a", "completion": "b"}\nnot json\n', "train.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "completion": "b"}\n\n{"question": "a"}\n', "train.jsonl:3: needs string fields"),
])
def test_bad_data(base, tmp_path, content, message):
    data = tmp_path / "train.jsonl"
    if content is not None:
        data.write_text(content)
    r = cli("finetune", "--base", base["base"], "--data", data, "--out", tmp_path / "o")
    assert r.exit_code == 2, r.output
    assert message in said(r)


def test_bad_base_and_occupied_out(base, tmp_path):
    r = cli("finetune", "--base", tmp_path / "nope", "--data", base["train"], "--out", tmp_path / "o")
    assert r.exit_code == 2 and "does not exist" in said(r)
    (tmp_path / "empty").mkdir()
    r = cli("finetune", "--base", tmp_path / "empty", "--data", base["train"], "--out", tmp_path / "o")
    assert r.exit_code == 2 and "not a Hugging Face model directory" in said(r)
    other = tmp_path / "other"
    toy.perturbed_copy(base["base"], other, seed=5)
    args = ["finetune", "--base", base["base"], "--data", base["train"], "--out", other, "--max-steps", 2]
    r = cli(*args)
    assert r.exit_code == 2 and "already holds a different model" in said(r)
    r = cli(*args, "--overwrite")
    assert r.exit_code == 0, r.output
    r = cli("finetune", "--base", base["base"], "--data", base["train"], "--out", tmp_path / "o2",
            "--lora", "--lora-targets", "nope_proj", "--max-steps", 2)
    assert r.exit_code == 2 and "nope_proj" in said(r)


def test_killed_cli_run_resumes_from_its_last_checkpoint(base, tmp_path):
    """A real interruption: the command runs as a process and is killed (SIGKILL) once a checkpoint
    exists; rerunning the same command finishes the run from there."""
    import os
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    args = ["finetune", "--base", base["base"], "--data", base["train"], "--out", out,
            "--max-steps", 400, "--save-steps", 5, "--batch-size", 16, "--lr", "3e-3"]
    env = os.environ | {"TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "logitfusion.cli", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    try:
        while not (out / "checkpoints" / "checkpoint-5" / "trainer_state.json").exists():
            assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / MARKER).exists()  # it did not finish
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "resumed from" in said(r)
    done = json.loads((out / MARKER).read_text())
    assert done["global_step"] == 400
    state = json.loads((out / "checkpoints" / "checkpoint-400" / "trainer_state.json").read_text())
    assert state["global_step"] == 400
