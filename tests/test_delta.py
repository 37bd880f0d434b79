"""Cross-model control: delta-model training (sft, unlearning), the delta recipe kind, cross-
vocabulary decoding (re-tokenisation) and cross-vocabulary dynamic fusion, on tiny real models."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitfusion import toy
from logitfusion.delta import DeltaConfig, mean_loss, train_delta
from logitfusion.training import TrainingError


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
    from logitfusion.delta import new_delta
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
