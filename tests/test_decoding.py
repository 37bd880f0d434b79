"""The decoding loop on the toy family, checked against plain transformers / PEFT references."""

import pytest

from logitfusion.engine.config import EngineConfig
import torch

from logitfusion.testing import toy
from logitfusion.engine.decoding import Batch, decode
from logitfusion.engine.fuser import Fuser
from logitfusion.engine.sampling import DecodingError, SamplingParams
from logitfusion.engine.solvers import Choice, Dynamic, Solver, Static, make_grid

PROMPTS = ["the cat", "Question: 2 plus 3? Answer:", "a", "seven eight nine ten cat dog bird fish tree"]
N = 20  # new tokens


# ------------------------------------------------------------------ helpers

def cut_after_eos(ids, eos_id):
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


@pytest.fixture(scope="module")
def hf_greedy(hf_models, family):
    """hf_greedy(prompts, n) -> plain HF greedy generate() of the large model (left padded batch),
    generated ids per prompt, cut after the first EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family["large"])  # own copy: padding side changed below
    tok.padding_side = "left"
    model = hf_models["large"]

    def run(prompts, n):
        enc = tok(list(prompts), return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        width = enc["input_ids"].shape[1]
        return [cut_after_eos(out[i, width:].tolist(), tok.eos_token_id) for i in range(len(prompts))]

    return run


@pytest.fixture(scope="module")
def eos_prompts(fuser):
    """Prompts on which the large model's greedy decoding emits EOS within 30 tokens (found by
    search over toy-corpus lines, so that EOS handling is really exercised)."""
    lines = toy.corpus(30, seed=3)
    gens = fuser.generate(lines, solver="large", max_new_tokens=30, batch_size=len(lines))
    found = [(g.prompt, len(g.token_ids)) for g in gens if g.finish_reason == "eos"]
    assert found, "no toy prompt makes the large model emit EOS; widen the search"
    return found


def ids_of(gens):
    return [g.token_ids for g in gens]


# ------------------------------------------------------------------ weights 0 = the large model

@pytest.mark.parametrize("solver", ["static:0", "large"])
def test_zero_weights_and_large_alone_equal_hf_greedy_single_prompts(fuser, hf_greedy, solver):
    for p in PROMPTS:
        (g,) = fuser.generate(p, solver=solver, max_new_tokens=N)
        want = hf_greedy([p], N)[0]
        assert g.token_ids == want, p
        assert len(g.token_ids) == N and g.finish_reason == "length"


@pytest.mark.parametrize("solver", ["static:0", "large"])
def test_zero_weights_and_large_alone_equal_hf_greedy_left_padded_batch(fuser, hf_greedy, solver):
    gens = fuser.generate(PROMPTS, solver=solver, max_new_tokens=N)
    assert ids_of(gens) == hf_greedy(PROMPTS, N)


def test_eos_handling_matches_hf_and_other_sequences_continue(fuser, hf_greedy, eos_prompts):
    eos_id = fuser.models.tokenizer.eos_token_id
    prompt, n_eos = eos_prompts[0]
    batch = [PROMPTS[0], prompt, PROMPTS[3]]
    n = n_eos + 5
    gens = fuser.generate(batch, solver="static:0", max_new_tokens=n)
    assert ids_of(gens) == hf_greedy(batch, n)
    assert gens[1].finish_reason == "eos"
    assert gens[1].token_ids[-1] == eos_id and len(gens[1].token_ids) == n_eos
    assert eos_id not in gens[1].token_ids[:-1]
    assert "</s>" not in gens[1].text  # special tokens are not in the text
    for g in (gens[0], gens[2]):  # per-sequence finish: the others run to max_new_tokens
        assert g.finish_reason == "length" and len(g.token_ids) == n


# ------------------------------------------------------------------ static fusion = hand-computed arithmetic

def test_static_one_expert_equals_hand_computed_logit_arithmetic(fuser1, reference_logits):
    for p in PROMPTS[:3]:
        (g,) = fuser1.generate(p, solver="static:1", max_new_tokens=N, trace=True)
        assert len(g.token_ids) == N
        for k, token in enumerate(g.token_ids):
            prefix = g.token_ids[:k]
            z = (reference_logits("large", p, prefix) + reference_logits("expert1", p, prefix)
                 - reference_logits("small", p, prefix))
            assert int(z.argmax()) == token, (p, k)
            # the trace shows the same fused distribution
            top_id, top_p = g.trace[k].top["fused"][0]
            assert top_id == token and top_p == pytest.approx(float(z.softmax(-1).max()), abs=1e-4)


def test_static_one_expert_differs_from_large_alone(fuser1):
    fused = fuser1.generate(PROMPTS, solver="static:1", max_new_tokens=N)
    large = fuser1.generate(PROMPTS, solver="large", max_new_tokens=N)
    assert ids_of(fused) != ids_of(large)  # otherwise the arithmetic test above proves little


def test_static_three_experts_with_lora_equals_hand_computed(fuser, reference_logits):
    w = [0.5, 1.0, 1.5]
    gens = fuser.generate(PROMPTS[:2], solver=Static(w), max_new_tokens=12)
    for p, g in zip(PROMPTS[:2], gens):
        for k, token in enumerate(g.token_ids):
            prefix = g.token_ids[:k]
            z_s = reference_logits("small", p, prefix)
            z = reference_logits("large", p, prefix)
            for a, name in zip(w, ("expert1", "expert2", "lora1")):
                z = z + a * (reference_logits(name, p, prefix) - z_s)
            assert int(z.argmax()) == token, (p, k)


@pytest.mark.parametrize("name", ["expert1", "lora1"])
def test_expert_alone_equals_its_own_greedy_decoding(fuser, reference_logits, name):
    p = PROMPTS[1]
    (g,) = fuser.generate(p, solver=f"expert:{name}", max_new_tokens=12)
    for k, token in enumerate(g.token_ids):
        assert int(reference_logits(name, p, g.token_ids[:k]).argmax()) == token, k


# ------------------------------------------------------------------ batching and caching are invisible

SOLVERS = {
    "static": Static([1.0, 0.5, 1.0]),
    "dynamic-fast": Dynamic(strategy="fast"),
    "dynamic-joint-product": Dynamic(make_grid(0, 2, 0.5), strategy="joint"),
    "dynamic-joint-refine": Dynamic(strategy="joint"),  # 21**3 > 4096: continuous solver
}


@pytest.mark.parametrize("kind", list(SOLVERS))
def test_batched_equals_one_prompt_at_a_time(fuser, kind):
    solver = SOLVERS[kind]
    n = 10 if kind == "dynamic-joint-refine" else N  # the continuous solver is the slow one
    batched = fuser.generate(PROMPTS, solver=solver, max_new_tokens=n, trace=True)
    for p, b in zip(PROMPTS, batched):
        (single,) = fuser.generate(p, solver=solver, max_new_tokens=n, trace=True)
        assert single.token_ids == b.token_ids, (kind, p)
        assert single.text == b.text
        # the continuous solver amplifies float noise of padding a little; grid solvers are exact
        tol = 1e-2 if kind == "dynamic-joint-refine" else 1e-6
        assert len(single.weights) == len(b.weights) == n
        for s1, s2 in zip(single.weights, b.weights):
            assert s1 == pytest.approx(s2, abs=tol)


@pytest.mark.parametrize("kind", ["static", "dynamic-fast"])
def test_kv_cache_equals_no_cache(fuser, kind):
    solver = SOLVERS[kind]
    cached = fuser.generate(PROMPTS, solver=solver, max_new_tokens=N, use_cache=True)
    uncached = fuser.generate(PROMPTS, solver=solver, max_new_tokens=N, use_cache=False)
    assert ids_of(cached) == ids_of(uncached)


def test_kv_cache_writes_in_place_into_reserved_room(fuser1):
    """Steps write each position into the room reserved at prefill: no copy of the whole cache
    per step (DynamicLayer's torch.cat), and keys and values stay views of one buffer."""
    batch = Batch(fuser1.models, fuser1.method("dynamic"))
    batch.add(PROMPTS[:2], [SamplingParams(max_new_tokens=12)] * 2)
    layer = batch.contexts[0].cache.layers[0]
    assert type(layer).__name__ == "ReservedLayer"
    batch.step()
    buffer = layer.buffer[0].data_ptr()
    for _ in range(8):
        batch.step()
        assert layer.buffer[0].data_ptr() == buffer and layer.keys.data_ptr() == buffer


def test_batch_size_chunks_equal_one_batch(fuser):
    one = fuser.generate(PROMPTS, solver="dynamic", max_new_tokens=10, batch_size=8)
    chunks = fuser.generate(PROMPTS, solver="dynamic", max_new_tokens=10, batch_size=3)
    assert ids_of(one) == ids_of(chunks)
    assert [g.prompt for g in chunks] == PROMPTS


def test_dynamic_generation_differs_from_static_and_large(fuser):
    dyn = ids_of(fuser.generate(PROMPTS, solver="dynamic", max_new_tokens=N))
    assert dyn != ids_of(fuser.generate(PROMPTS, solver="large", max_new_tokens=N))
    assert dyn != ids_of(fuser.generate(PROMPTS, solver="static:1", max_new_tokens=N))


# ------------------------------------------------------------------ sampling

def test_sampling_is_reproducible_with_a_seed(fuser):
    kw = dict(solver="dynamic", max_new_tokens=N, temperature=1.0)
    a = fuser.generate(PROMPTS[:2], seed=11, **kw)
    b = fuser.generate(PROMPTS[:2], seed=11, **kw)
    c = fuser.generate(PROMPTS[:2], seed=12, **kw)
    assert ids_of(a) == ids_of(b)
    assert ids_of(a) != ids_of(c)
    greedy = fuser.generate(PROMPTS[:2], solver="dynamic", max_new_tokens=N)
    assert ids_of(a) != ids_of(greedy)


@pytest.mark.parametrize("solver", ["static:1", "dynamic"])
def test_batched_sampling_equals_unbatched_with_consecutive_seeds(fuser, solver):
    p0, p1 = PROMPTS[0], PROMPTS[3]
    kw = dict(solver=solver, max_new_tokens=N, temperature=0.8)
    batched = fuser.generate([p0, p1], seed=5, **kw)
    (s0,) = fuser.generate(p0, seed=5, **kw)
    (s1,) = fuser.generate(p1, seed=6, **kw)
    assert batched[0].token_ids == s0.token_ids
    assert batched[1].token_ids == s1.token_ids
    # an explicit seed list is the same thing
    listed = fuser.generate([p0, p1], seed=[5, 6], **kw)
    assert ids_of(listed) == ids_of(batched)


def test_top_k_1_and_tiny_top_p_equal_greedy(fuser):
    greedy = ids_of(fuser.generate(PROMPTS, solver="dynamic", max_new_tokens=N))
    top1 = fuser.generate(PROMPTS, solver="dynamic", max_new_tokens=N, temperature=1.5, top_k=1, seed=3)
    assert ids_of(top1) == greedy
    nucleus = fuser.generate(PROMPTS, solver="dynamic", max_new_tokens=N, temperature=1.5, top_p=1e-6, seed=3)
    assert ids_of(nucleus) == greedy


def test_sampling_respects_top_k(fuser):
    """With top_k=2 every sampled token is one of the two most likely fused tokens."""
    gens = fuser.generate(PROMPTS, solver="static:1", max_new_tokens=N, temperature=2.0, top_k=2, seed=0,
                          trace=True)
    picked_second = 0
    for g in gens:
        for token, step in zip(g.token_ids, g.trace):
            top2 = [i for i, _ in step.top["fused"][:2]]
            assert token in top2
            picked_second += token == top2[1]
    assert picked_second > 0  # really sampled, not greedy


def test_sampling_respects_top_p_nucleus(fuser):
    """top_p keeps the smallest set of most likely tokens whose mass reaches top_p, including the
    token that crosses the threshold."""
    top_p = 0.6
    gens = fuser.generate(PROMPTS, solver="static:1", max_new_tokens=30, temperature=1.0, top_p=top_p,
                          seed=0, trace=True)
    checked = crossing_picked = 0
    for g in gens:
        for token, step in zip(g.token_ids, g.trace):
            top = step.top["fused"]  # (id, prob) at temperature 1 = the sampling distribution
            cum, nucleus = 0.0, []
            for i, p in top:
                nucleus.append(i)
                cum += p
                if cum >= top_p:
                    break
            else:
                continue  # the nucleus is wider than the traced top tokens
            checked += 1
            assert token in nucleus
            crossing_picked += len(nucleus) > 1 and token == nucleus[-1]
    assert checked > 20 and crossing_picked > 0


# ------------------------------------------------------------------ stop strings

def _ascii_window(text, width):
    """A substring of `text`, from its middle, of plain letters (stable under re-decoding)."""
    for start in range(len(text) // 3, len(text) - width):
        piece = text[start:start + width]
        if piece.isascii() and piece.isalnum():
            return piece
    return None


def test_stop_string_cuts_the_text(fuser):
    for p in PROMPTS:
        (full,) = fuser.generate(p, solver="dynamic", max_new_tokens=30)
        stop = _ascii_window(full.text, 2)
        if stop is None:
            continue
        (cut,) = fuser.generate(p, solver="dynamic", max_new_tokens=30, stop=[stop])
        assert cut.finish_reason == "stop"
        assert cut.text == full.text[: full.text.find(stop)]
        assert stop not in cut.text
        assert full.token_ids[: len(cut.token_ids)] == cut.token_ids  # same tokens, fewer of them
        assert len(cut.token_ids) < len(full.token_ids)
        break
    else:
        pytest.fail("no prompt produced a usable ASCII stop string")


def test_earliest_of_several_stop_strings_wins_per_sequence(fuser):
    full = fuser.generate(PROMPTS, solver="static:1", max_new_tokens=30)
    text = full[1].text
    early, late = _ascii_window(text[: len(text) // 2 + 2], 2), _ascii_window(text, 3)
    assert early and late
    first = min(text.find(early), text.find(late))
    gens = fuser.generate(PROMPTS, solver="static:1", max_new_tokens=30, stop=[late, early])
    assert gens[1].finish_reason == "stop"
    assert gens[1].text == text[:first]
    for g, f in zip(gens, full):  # every sequence is cut at its own first stop (or not at all)
        hits = [f.text.find(s) for s in (late, early) if s in f.text]
        if g.finish_reason == "stop":
            assert g.text == f.text[: min(hits)]
        else:
            assert not hits and g.token_ids == f.token_ids


# ------------------------------------------------------------------ traces

def test_trace_contents(fuser):
    names = fuser.expert_names
    assert names == ["expert1", "expert2", "lora1"]
    gens = fuser.generate(PROMPTS[:2], solver="dynamic", max_new_tokens=8, trace=True)
    grid = set(make_grid(0, 2, 0.1))
    for g in gens:
        assert len(g.trace) == len(g.token_ids) == 8
        assert len(g.weights) == 8
        for token, step in zip(g.token_ids, g.trace):
            assert len(step.weights) == len(names)
            assert all(w in grid for w in step.weights)  # rounded grid values, e.g. 1.2 not 1.2000000476...
            assert sum(w != 0 for w in step.weights) <= 1  # fast path
            assert step.objective is not None and 0 <= step.objective < float("inf")
            assert set(step.top) == {"large", "small", "fused"} | {f"expert:{n}" for n in names}
            for role, top in step.top.items():
                assert len(top) == 5
                probs = [p for _, p in top]
                assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
                assert all(0 <= i < len(fuser.models.tokenizer) for i, _ in top)
            assert step.top["fused"][0][0] == token  # greedy: the emitted token is the fused top-1


def test_trace_weights_and_objective_equal_solver_recomputed(fuser, reference_logits):
    p = PROMPTS[1]
    (g,) = fuser.generate(p, solver="dynamic", max_new_tokens=10, trace=True)
    solver = Dynamic()
    nonzero_steps = 0
    for k, step in enumerate(g.trace):
        prefix = g.token_ids[:k]
        z_l = reference_logits("large", p, prefix)[None]
        z_s = reference_logits("small", p, prefix)[None]
        z_e = torch.stack([reference_logits(n, p, prefix) for n in ("expert1", "expert2", "lora1")])[None]
        w, j = solver.solve(z_l, z_s, z_e)
        assert step.objective == pytest.approx(j.item(), rel=1e-3, abs=1e-6)
        assert step.weights == pytest.approx(w[0].tolist(), abs=1e-6)
        # the large model's own top tokens in the trace are the reference's
        assert [i for i, _ in step.top["large"]] == z_l[0].topk(5).indices.tolist()
        nonzero_steps += any(step.weights)
    assert nonzero_steps > 0


def test_static_and_alone_traces(fuser):
    (g,) = fuser.generate(PROMPTS[0], solver=Static([0.5, 1.0, 1.5]), max_new_tokens=4, trace=True)
    assert [s.weights for s in g.trace] == [[0.5, 1.0, 1.5]] * 4
    assert all(s.objective is None for s in g.trace)
    (g,) = fuser.generate(PROMPTS[0], solver="large", max_new_tokens=4, trace=True)
    assert g.weights == [] and set(g.trace[0].top) == {"large", "fused"}
    (g,) = fuser.generate(PROMPTS[0], solver="dynamic", max_new_tokens=4)
    assert g.trace is None and g.weights == []


def test_direct_decode_equals_fuser_generate(fuser):
    gens = decode(fuser.models, PROMPTS[:2], Dynamic(), SamplingParams(max_new_tokens=5), engine=EngineConfig(trace=True))
    assert ids_of(gens) == ids_of(fuser.generate(PROMPTS[:2], solver="dynamic", max_new_tokens=5))
    assert [len(g.trace) for g in gens] == [5, 5]


# ------------------------------------------------------------------ lengths

@pytest.mark.parametrize("n", [1, 3, 7])
def test_max_new_tokens_is_respected(fuser, n):
    gens = fuser.generate(PROMPTS, solver="dynamic", max_new_tokens=n)
    for g in gens:
        assert len(g.token_ids) == n and g.finish_reason == "length"


def test_generation_stops_at_the_model_context(fuser):
    tok = fuser.models.tokenizer
    context = fuser.models.large.context
    assert context == 256
    words = ("one two three four five six seven eight nine ten " * 60).split()
    # the shortest word prefix with at least context - 4 tokens (bounded search)
    prompt = next(p for p in (" ".join(words[:n]) for n in range(10, len(words) + 1))
                  if len(tok(p)["input_ids"]) >= context - 4)
    n_prompt = len(tok(prompt)["input_ids"])
    assert context - 10 < n_prompt < context
    gens = fuser.generate([prompt, "the cat"], solver="dynamic", max_new_tokens=20)
    assert n_prompt + len(gens[0].token_ids) <= context
    assert len(gens[0].token_ids) >= 1 and gens[0].finish_reason == "length"
    assert len(gens[1].token_ids) == 20  # the short prompt in the same batch is not cut


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("prompts", ["", ["the cat", ""]])
def test_empty_prompt_is_an_error(fuser, prompts):
    with pytest.raises(DecodingError, match="empty"):
        fuser.generate(prompts, max_new_tokens=3)


def test_no_prompts_is_an_error(fuser):
    with pytest.raises(DecodingError, match="no prompts"):
        fuser.generate([], max_new_tokens=3)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-2), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(stop=[""]), "stop"),
    (dict(seed=[1, 2, 3]), "seeds"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_sampling_parameters_are_errors(fuser, kwargs, msg):
    with pytest.raises(DecodingError, match=msg):
        fuser.generate(PROMPTS[:2], **{"max_new_tokens": 3, **kwargs})


def test_prompt_longer_than_context_is_an_error(fuser):
    prompt = "the cat sells seven apples to the king " * 60
    assert len(fuser.models.tokenizer(prompt)["input_ids"]) > 256
    with pytest.raises(DecodingError, match="context") as e:
        fuser.generate(["the cat", prompt], max_new_tokens=3)
    assert "prompt 1" in str(e.value)


# ------------------------------------------------------------------ NaN logits

@pytest.fixture(scope="module")
def nan_copy(family, tmp_path_factory):
    """make(modify) -> path of a copy of the large model with some weights set to NaN."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def make(name, modify):
        out = tmp_path_factory.mktemp(name)
        model = AutoModelForCausalLM.from_pretrained(family["large"])
        with torch.no_grad():
            modify(model)
        model.save_pretrained(str(out))
        AutoTokenizer.from_pretrained(family["large"]).save_pretrained(str(out))
        return str(out)

    return make


def test_nan_logits_stop_the_sequence_with_an_error(family, nan_copy):
    path = nan_copy("nan_head", lambda m: m.lm_head.weight.fill_(float("nan")))
    f = Fuser.from_pretrained(path, family["small"], {"expert1": family["experts"]["expert1"]})
    for solver in ("static:0", "dynamic", "large"):
        gens = f.generate(PROMPTS[:2], solver=solver, max_new_tokens=5)
        for g in gens:
            assert g.finish_reason == "error", solver
            assert "NaN" in g.error and "large" in g.error
            assert g.token_ids == [] and g.text == ""
    # the expert alone does not run the broken model
    (g,) = f.generate(PROMPTS[0], solver="expert", max_new_tokens=5)
    assert g.finish_reason == "length" and len(g.token_ids) == 5


def test_nan_mid_sequence_keeps_good_tokens_and_spares_the_batch(family, fuser, nan_copy):
    """A token whose embedding is NaN poisons only the sequences that emit it, from the next step."""
    base = fuser.generate(PROMPTS, solver="large", max_new_tokens=8)
    g0 = base[0].token_ids
    prompt_ids = fuser.models.tokenizer(PROMPTS[0])["input_ids"]
    k = next(i for i in range(1, 6) if g0[i] not in g0[:i] and g0[i] not in prompt_ids)
    bad_token = g0[k]
    others = [i for i in range(1, len(PROMPTS)) if bad_token not in base[i].token_ids
              and bad_token not in fuser.models.tokenizer(PROMPTS[i])["input_ids"]]
    assert others

    def poison(m):
        m.model.embed_tokens.weight[bad_token] = float("nan")

    f = Fuser.from_pretrained(nan_copy("nan_embed", poison))
    gens = f.generate(PROMPTS, solver="large", max_new_tokens=8)
    assert gens[0].finish_reason == "error" and "step" in gens[0].error and "NaN" in gens[0].error
    assert gens[0].token_ids == g0[: k + 1]  # tokens up to and including the poisoned one
    for i in others:
        assert gens[i].finish_reason == "length" and gens[i].token_ids == base[i].token_ids


# ------------------------------------------------------------------ scripted tokens: exact stop-string checks

class Scripted(Solver):
    """Decodes a fixed token script through the real loop (runs the real large model, then puts
    all the mass on the next scripted token), so stop strings can be tested on chosen text."""

    reads = frozenset({"large"})

    def __init__(self, script):
        self.script, self.step = list(script), 0

    def __call__(self, z):
        logits = torch.zeros_like(z.large.float())
        logits[:, self.script[min(self.step, len(self.script) - 1)]] = 100.0
        self.step += 1
        return Choice(logits)


def scripted(fuser, text_or_ids, stop, n=None):
    tok = fuser.models.tokenizer
    ids = tok(text_or_ids)["input_ids"] if isinstance(text_or_ids, str) else list(text_or_ids)
    (g,) = fuser.generate("the cat", solver=Scripted(ids), max_new_tokens=n or len(ids), stop=stop)
    return g, ids


def test_scripted_solver_reproduces_its_script(fuser):
    g, ids = scripted(fuser, "hello world, then more", stop=None)
    assert g.token_ids == ids and g.text == "hello world, then more" and g.finish_reason == "length"


@pytest.mark.parametrize("text,stop,want", [
    ("hello world, then more", ["world"], "hello "),
    ("hello world, then more", ["more", ", "], "hello world"),
    ("a=1\n\nb=2 and so on", ["\n\n"], "a=1"),
    ("price: 5 €, ok then", ["€"], "price: 5 "),
    ("x 日本 y and more", ["日本"], "x "),
])
def test_scripted_stop_strings(fuser, text, stop, want):
    g, ids = scripted(fuser, text, stop)
    assert g.finish_reason == "stop" and g.text == want
    assert g.token_ids == ids[: len(g.token_ids)] and len(g.token_ids) < len(ids)


def test_stop_string_spanning_many_byte_tokens_is_detected(fuser):
    g, ids = scripted(fuser, "x 日本語日本 y and more text", ["日本語日本"])
    assert g.finish_reason == "stop" and g.text == "x ", (g.finish_reason, g.text)


def test_stop_string_across_special_tokens_is_detected(fuser):
    tok = fuser.models.tokenizer
    ids = tok("ab")["input_ids"][:1] + [tok.pad_token_id] * 10 + tok("b then more")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True).startswith("ab")
    g, _ = scripted(fuser, ids, ["ab"])
    assert g.finish_reason == "stop" and g.text == "", (g.finish_reason, g.text)


# ------------------------------------------------------------------ ignore_eos

def test_ignore_eos_decodes_past_eos(fuser, eos_prompts):
    prompt, n_eos = eos_prompts[0]
    (stopped,) = fuser.generate(prompt, solver="large", max_new_tokens=n_eos + 4)
    (went_on,) = fuser.generate(prompt, solver="large", max_new_tokens=n_eos + 4, ignore_eos=True)
    assert stopped.finish_reason == "eos" and len(stopped.token_ids) == n_eos
    assert went_on.finish_reason == "length" and len(went_on.token_ids) == n_eos + 4
    assert went_on.token_ids[:n_eos] == stopped.token_ids


# ------------------------------------------------------------------ dynamic batching (rows join and leave)

@pytest.mark.parametrize("use_cache", [True, False])
def test_rows_joining_and_leaving_a_running_batch_decode_as_if_alone(fuser, use_cache):
    import dataclasses

    from logitfusion.engine import decoding

    Batch = getattr(decoding, "Batch", None)
    if Batch is None:
        pytest.skip("decoding.Batch (dynamic batching) is not available")
    solver = Dynamic()
    batch = Batch(fuser.models, solver, EngineConfig(use_cache=use_cache))
    lengths = {PROMPTS[0]: 12, PROMPTS[1]: 4, PROMPTS[2]: 10, PROMPTS[3]: 9}
    params = {p: SamplingParams(max_new_tokens=n) for p, n in lengths.items()}
    first = batch.add(PROMPTS[:2], [dataclasses.replace(params[p]) for p in PROMPTS[:2]])
    for _ in range(3):
        batch.step()
    later = batch.add(PROMPTS[2:], [dataclasses.replace(params[p]) for p in PROMPTS[2:]])  # join mid-way
    steps = 0
    while len(batch):
        batch.step()
        steps += 1
        assert steps < 50
    for seq in first + later:
        got = seq.result(fuser.models.tokenizer)
        (alone,) = fuser.generate(seq.prompt, solver=solver, max_new_tokens=lengths[seq.prompt])
        assert got.token_ids == alone.token_ids, seq.prompt
        assert got.finish_reason == "length" and len(got.token_ids) == lengths[seq.prompt]


# ------------------------------------------------------------------ per-model prompt templates

def test_each_model_reads_its_own_template(family, reference_logits):
    """method.md §5: every model has its own prompt template; generated tokens go to all of them.
    The small base and its LoRA expert share one module but get different prompts here."""
    templates = {"large": "Few-shot: 1 plus 1? Answer: 2. {prompt}", "small": "{prompt}",
                 "expert1": "Q: {prompt}", "lora1": "Question: {prompt}? Answer:"}
    f = Fuser.from_recipe({
        "large": {"path": family["large"], "template": templates["large"]},
        "small": {"path": family["small"], "template": templates["small"]},
        "experts": [{"name": n, "path": family["experts"][n], "template": templates[n]} for n in ("expert1", "lora1")],
        "solver": {"kind": "static", "weights": [0.5, 1.0]},
    })
    prompt = "3 plus 4"
    gens = f.generate([prompt, "the dog"], max_new_tokens=6)
    for g in gens:
        p = g.prompt
        for k, token in enumerate(g.token_ids):
            prefix = g.token_ids[:k]
            z = {n: reference_logits(n, t.replace("{prompt}", p), prefix) for n, t in templates.items()}
            fused = z["large"] + 0.5 * (z["expert1"] - z["small"]) + 1.0 * (z["lora1"] - z["small"])
            assert int(fused.argmax()) == token, (p, k)
    # and the templates matter: without them the tokens differ
    plain = Fuser.from_pretrained(family["large"], family["small"],
                                  {n: family["experts"][n] for n in ("expert1", "lora1")},
                                  solver={"kind": "static", "weights": [0.5, 1.0]})
    assert [g.token_ids for g in plain.generate([prompt, "the dog"], max_new_tokens=6)] != \
        [g.token_ids for g in gens]
