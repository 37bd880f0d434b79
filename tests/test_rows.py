"""The fusion step on rows whose large-model logits are handed in from outside (engine/rows.py), as
a vLLM logits processor uses it: the large model runs in the test's own loop (no engine context,
no cache, one row at a time), rows join, leave and are reordered mid-run, and the tokens must be
those of the engine's full loop."""

import pytest
import torch

from logitfusion.engine.errors import DecodingError
from logitfusion.engine.rows import FusionRows

PROMPTS = ["Question: 3 plus 4? Answer:", "the cat sells", "a", "two dogs and three birds go to the river",
           "one bird", "Question: 5 plus 1? Answer:"]
LENGTHS = [6, 9, 4, 7, 5, 8]  # rows finish at different steps, so others join mid-run


@torch.no_grad()
def _large_logits(fuser, ids: list[int]) -> torch.Tensor:
    """The large model's next-token logits for one row, computed outside the engine. [V]"""
    out = fuser.models.large.model(torch.tensor([ids]))
    return out.logits[0, -1, : fuser.models.vocab_size].float()


def _external_loop(fuser, method: str, slots: int, shuffle: bool = True) -> list[list[int]]:
    """Greedy decoding with the large model in this loop and fusion in FusionRows: at most `slots`
    rows at once; waiting prompts join as rows finish; the row order is reversed every step."""
    tok = fuser.models.tokenizer
    solver = fuser.method(method)
    rows = FusionRows(fuser.models, solver)
    waiting = list(range(len(PROMPTS)))
    running: list[int] = []
    prompt = {i: tok(p)["input_ids"] for i, p in enumerate(PROMPTS)}
    out: dict[int, list[int]] = {}
    while waiting or running:
        while waiting and len(running) < slots:
            i = waiting.pop(0)
            rows.add(i, prompt[i])
            out[i] = []
            running.append(i)
        if shuffle:
            running.reverse()
        z_large = torch.stack([_large_logits(fuser, prompt[i] + out[i]) for i in running])
        fused = rows.apply(running, [out[i] for i in running], z_large)
        for i, token in zip(list(running), fused.argmax(-1).tolist()):
            out[i].append(token)
            if len(out[i]) == LENGTHS[i]:
                running.remove(i)
                rows.remove(i)
    return [out[i] for i in range(len(PROMPTS))]


def _engine(fuser, method: str) -> list[list[int]]:
    return [fuser.generate(p, solver=method, max_new_tokens=n, ignore_eos=True)[0].token_ids
            for p, n in zip(PROMPTS, LENGTHS)]


@pytest.mark.parametrize("method", ["static:1.0", "dynamic", "static:0.5,1.5", "dynamic:joint"])
def test_handed_in_large_logits_give_the_engine_tokens(full_fuser, method):
    assert _external_loop(full_fuser, method, slots=3) == _engine(full_fuser, method)


def test_lora_experts_and_one_slot(fuser):
    assert _external_loop(fuser, "dynamic", slots=1, shuffle=False) == _engine(fuser, "dynamic")


def test_large_alone_is_the_large_model(fuser1):
    assert _external_loop(fuser1, "large", slots=2) == _engine(fuser1, "large")


def test_a_row_added_with_output_is_rebuilt(fuser1):
    """A preempted request comes back as remove-then-add with its output so far: the small side
    is rebuilt from prompt + output, and the next fused logits are those of a row that never left."""
    tok = fuser1.models.tokenizer
    ids = tok(PROMPTS[0])["input_ids"]
    rows = FusionRows(fuser1.models, fuser1.method("dynamic"))
    rows.add("a", ids)
    out = []
    for _ in range(4):
        out.append(int(rows.apply(["a"], [out], _large_logits(fuser1, ids + out)[None]).argmax()))
    again = FusionRows(fuser1.models, fuser1.method("dynamic"))
    again.add("b", ids)
    again.apply(["b"], [[]], _large_logits(fuser1, ids)[None])
    again.remove("b")
    again.add("b", ids)  # back with 3 tokens of output: read in one go
    z = _large_logits(fuser1, ids + out[:3])[None]
    assert torch.allclose(again.apply(["b"], [out[:3]], z), rows_after(fuser1, ids, out[:3], z), atol=1e-5)
    assert len(rows.weights("a")) == 4 and len(rows.weights("a")[0]) == 1


def rows_after(fuser, ids, out, z):
    rows = FusionRows(fuser.models, fuser.method("dynamic"))
    rows.add("c", ids)
    for n in range(len(out)):
        rows.apply(["c"], [out[:n]], _large_logits(fuser, ids + out[:n])[None])
    return rows.apply(["c"], [out], z)


def test_bad_rows_are_refused(fuser1):
    rows = FusionRows(fuser1.models, fuser1.method("static:1"))
    with pytest.raises(DecodingError, match="never added"):
        rows.apply(["x"], [[]], torch.zeros(1, fuser1.models.vocab_size))
    rows.add("x", [1, 2])
    with pytest.raises(DecodingError, match="already running"):
        rows.add("x", [1, 2])
    with pytest.raises(DecodingError, match="reads other models"):
        rows.add("y", [1, 2], solver=fuser1.method("large"))
    rows.remove("nobody")  # a no-op


def test_the_small_side_runs_without_the_large_weights(family, fuser1):
    """load_model_set(large_weights=False): the large model's tokenizer only, as a vLLM worker loads
    it; the fused tokens are those of the engine with every model loaded."""
    from logitfusion.engine.models import LoadOptions, load_model_set
    side = load_model_set({"path": family["large"]}, {"path": family["small"]},
                          [{"name": "expert1", "path": family["experts"]["expert1"]}], LoadOptions(),
                          large_weights=False)
    assert side.large.model is None and side.vocab_size == fuser1.models.vocab_size
    with pytest.raises(RuntimeError, match="no weights here"):
        side.large.device
    tok = fuser1.models.tokenizer
    ids = tok(PROMPTS[1])["input_ids"]
    rows = FusionRows(side, fuser1.method("dynamic"))
    rows.add(0, ids)
    out: list[int] = []
    for _ in range(6):
        out.append(int(rows.apply([0], [out], _large_logits(fuser1, ids + out)[None]).argmax()))
    assert out == fuser1.generate(PROMPTS[1], solver="dynamic", max_new_tokens=6, ignore_eos=True)[0].token_ids
