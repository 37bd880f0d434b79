"""The large model inside vLLM (logitfusion.vllm): fusion as a vLLM V1 logits processor.

Skipped without vLLM (pip install 'logitfusion[vllm]'). One vLLM engine for the whole module
(an engine start costs 40-70 s of CPU). Greedy tokens through vLLM must be the HF engine's
(Fuser.generate) for the same recipe, with more requests than vLLM's batch slots, so rows join and
leave mid-run, and with methods mixed in one batch; the row bookkeeping (moves, swaps,
preemption) is also driven by hand with the large model's logits computed here. Weight traces
(extra_args.trace, written to the engine's trace folder) must hold the HF engine's weights."""

import os
from types import SimpleNamespace

import pytest
import torch

from logitfusion.testing.serving import require_vllm, server_process

vllm = require_vllm()  # skips the module without vLLM (a failure under `make test-vllm`)

from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from logitfusion.testing import toy  # noqa: E402
from logitfusion.engine.fuser import Fuser  # noqa: E402
from logitfusion.vllm.offline import fused_llm, sampling  # noqa: E402
from logitfusion.vllm.processor import FusionLogitsProcessor  # noqa: E402
from logitfusion.vllm.settings import CONFIG_KEY, TRACES_ENV, TRACES_KEY, SettingsError, methods  # noqa: E402
from logitfusion.vllm.traces import read_trace, trace_file  # noqa: E402

PROMPTS = ["Question: 3 plus 4? Answer:", "the cat sells", "a", "two dogs and three birds go to the river",
           "one bird", "Question: 5 plus 1? Answer:", "the king has ten coins and"]
LENGTHS = [6, 9, 4, 7, 5, 8, 10]  # rows finish at different steps, so waiting requests join mid-run
METHODS = ["static:1.0", "dynamic", "large"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A toy family vLLM's CPU attention can run (head size 32; the suite's large model has 24) and
    its recipe: the large model, the small base and two full experts, dynamic by default."""
    root = tmp_path_factory.mktemp("vllm_family")
    toy.vllm_family(root)
    path = root / "fusion.yaml"
    path.write_text(f"large: {{path: {root}/large}}\nsmall: {{path: {root}/small}}\nexperts: [{{name: e1, path: "
                    f"{root}/expert1}}, {{name: e2, path: {root}/expert2}}]\nsolver: {{kind: dynamic}}\n")
    return str(path)


@pytest.fixture(scope="module")
def fuser(recipe):
    return Fuser.from_recipe(recipe)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    return tmp_path_factory.mktemp("traces")


@pytest.fixture(scope="module")
def llm(recipe, traces):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ[TRACES_ENV] = str(traces)  # the engine process inherits it: its trace folder
    engine = fused_llm(recipe, enforce_eager=True, max_model_len=128, max_num_seqs=4, seed=0)
    os.environ.pop(TRACES_ENV)  # read at the start: later engines of the session get their own
    yield engine
    engine.llm_engine.engine_core.shutdown()  # now, not in an atexit hook after pytest closed its streams


def _engine_tokens(fuser, method, prompt, n):
    return fuser.generate(prompt, solver=method, max_new_tokens=n, ignore_eos=True)[0].token_ids


def _engine_run(fuser, method, prompt, n):
    """The HF engine's (tokens, per-step weights) for one prompt, traced."""
    g = fuser.generate(prompt, solver=method, max_new_tokens=n, ignore_eos=True, trace=True)[0]
    return g.token_ids, g.weights


def _close(a, b, tol=1e-5):
    return len(a) == len(b) and all(len(x) == len(y) and all(abs(u - v) <= tol for u, v in zip(x, y))
                                    for x, y in zip(a, b))


# ---------------------------------------------------------------- through vllm.LLM


def test_vllm_fused_greedy_tokens_are_the_engine_tokens(llm, fuser):
    """21 requests (7 prompts x static, dynamic, large alone) through 4 batch slots, methods mixed."""
    cases = [(p, n, m) for m in METHODS for p, n in zip(PROMPTS, LENGTHS)]
    outs = llm.generate([p for p, _, _ in cases],
                        [sampling(m, temperature=0, max_tokens=n, ignore_eos=True) for _, n, m in cases])
    got = [list(o.outputs[0].token_ids) for o in outs]
    want = [_engine_tokens(fuser, m, p, n) for p, n, m in cases]
    assert got == want
    by_method = {m: [g for g, (_, _, mm) in zip(got, cases) if mm == m] for m in METHODS}
    assert by_method["static:1.0"] != by_method["large"]  # fusion changed something


def test_vllm_recipe_solver_by_default(llm, fuser):
    outs = llm.generate(PROMPTS[:3], sampling(temperature=0, max_tokens=6, ignore_eos=True))
    assert [list(o.outputs[0].token_ids) for o in outs] == \
        [_engine_tokens(fuser, "dynamic", p, 6) for p in PROMPTS[:3]]


def test_vllm_expert_alone_and_traced_weights_are_the_engines(llm, fuser, traces):
    """expert:e1 / expert:e2 / nudge (models the processor runs anyway, or some of them) give the HF
    engine's tokens; traced requests (7 prompts through 4 slots: rows join and leave) leave a file
    each whose weights are the HF engine's."""
    cases = [(p, n, m) for m in ("expert:e1", "expert:e2", "nudge:0.3", "dynamic", "static:0.5,1.5")
             for p, n in zip(PROMPTS, LENGTHS)]
    keys = [f"t{i}" for i in range(len(cases))]
    params = [sampling(m, temperature=0, max_tokens=n, ignore_eos=True, extra_args={"trace": k})
              for (_, n, m), k in zip(cases, keys)]
    outs = llm.generate([p for p, _, _ in cases], params)
    got = [list(o.outputs[0].token_ids) for o in outs]
    want = [_engine_run(fuser, m, p, n) for p, n, m in cases]
    assert got == [t for t, _ in want]
    for (_, _, m), k, g, (_, weights) in zip(cases, keys, got, want):
        trace = read_trace(trace_file(traces, k), len(g))
        assert _close([s.weights for s in trace if s.weights is not None], weights), (m, k)
        assert m.startswith(("expert", "nudge")) or all(s.top["fused"][0][0] == t for s, t in zip(trace, g))
    assert got[:7] != got[7:14]  # e1 and e2 differ: each row reads its own expert


@pytest.mark.parametrize("bad", ["bogus", "delta:0.3", "static:1,2,3", 3])
def test_vllm_refuses_a_bad_method_per_request(llm, bad):
    with pytest.raises((ValueError, VLLMValidationError), match="extra_args.solver"):
        llm.generate(["the cat"], sampling(temperature=0, max_tokens=2, extra_args={"solver": bad}))
    ok = llm.generate(["the cat"], sampling("static:1.0", temperature=0, max_tokens=2))  # the engine lives on
    assert len(ok[0].outputs[0].token_ids) == 2


@pytest.mark.parametrize("bad", ["../escape", "a/b", "", 7])
def test_vllm_refuses_a_trace_key_that_is_not_a_plain_name(llm, bad):
    with pytest.raises((ValueError, VLLMValidationError), match="extra_args.trace"):
        llm.generate(["the cat"], sampling("static:1.0", temperature=0, max_tokens=2, extra_args={"trace": bad}))


# ---------------------------------------------------------------- the processor driven by hand


def test_settings_refuse_speculation_and_a_missing_recipe(recipe, tmp_path, monkeypatch):
    spec = tmp_path / "spec.yaml"
    spec.write_text(open(recipe).read() + "generation: {speculate: 4}\n")
    with pytest.raises(SettingsError, match="speculate"):
        methods(str(spec))
    monkeypatch.delenv("LOGITFUSION_RECIPE", raising=False)
    with pytest.raises(SettingsError, match="LOGITFUSION_RECIPE"):
        FusionLogitsProcessor(SimpleNamespace(additional_config={}), torch.device("cpu"), False)


@torch.no_grad()
def _large_logits(fuser, ids):
    return fuser.models.large.model(torch.tensor([ids])).logits[0, -1, : fuser.models.vocab_size].float()


class _Request:
    def __init__(self, i, method, trace=None):
        self.i, self.prompt = i, None
        self.params = SimpleNamespace(extra_args={"solver": method} | ({"trace": trace} if trace else {}))
        self.output: list[int] = []


def _drive(proc, fuser, requests, slots=3):
    """vLLM's persistent batch by hand: finished rows leave holes, waiting requests fill them, the
    last rows move into the holes left (one-way moves), every other step the first two rows swap,
    and request 1 is preempted once (removed, then added back with its output so far, which the
    processor must rebuild). Returns whether the preemption happened."""
    tok = fuser.models.tokenizer
    waiting, batch, step, preempted = list(requests), [], 0, False
    while waiting or batch:
        removed, added, moved = [], [], []
        for index, r in enumerate(batch):
            done = len(r.output) >= LENGTHS[r.i]
            if done or (r.i == 1 and step == 3 and not preempted):
                removed.append(index)
                batch[index] = None
                if not done:
                    preempted = True
                    waiting.insert(1, r)
        while waiting and sum(r is not None for r in batch) < slots:
            r = waiting.pop(0)
            r.prompt = tok(PROMPTS[r.i])["input_ids"]
            index = batch.index(None) if None in batch else len(batch)
            batch[index:index + 1] = [r]
            added.append((index, r.params, r.prompt, r.output))
        while None in batch:  # condense
            if batch[-1] is None:
                batch.pop()
                continue
            hole = batch.index(None)
            batch[hole] = batch.pop()
            moved.append((len(batch), hole, MoveDirectionality.UNIDIRECTIONAL))
        if len(batch) >= 2 and step % 2:
            batch[0], batch[1] = batch[1], batch[0]
            moved.append((0, 1, MoveDirectionality.SWAP))
        proc.update_state(BatchUpdate(len(batch), removed, added, moved) if (removed or added or moved) else None)
        if batch:
            logits = torch.stack([_large_logits(fuser, r.prompt + r.output) for r in batch])
            for r, token in zip(batch, proc.apply(logits).argmax(-1).tolist()):
                r.output.append(token)
        step += 1
    return preempted


def test_processor_rows_added_moved_and_preempted(recipe, fuser):
    proc = FusionLogitsProcessor(SimpleNamespace(additional_config={CONFIG_KEY: recipe}), torch.device("cpu"), False)
    requests = [_Request(i, m) for m in ("dynamic", "static:1.0") for i in range(len(PROMPTS))]
    assert _drive(proc, fuser, requests)
    assert [r.output for r in requests] == [_engine_tokens(fuser, m, PROMPTS[r.i], LENGTHS[r.i])
                                            for r, m in zip(requests, ["dynamic"] * 7 + ["static:1.0"] * 7)]
    assert len(proc.rows) == 0 and not proc.slots  # every row left


def test_processor_traces_survive_preemption(recipe, fuser, tmp_path):
    """A traced request preempted (removed, added back with its output, rebuilt) still has one step
    per output token, the HF engine's weights; an untraced one writes nothing."""
    config = SimpleNamespace(additional_config={CONFIG_KEY: recipe, TRACES_KEY: str(tmp_path)})
    proc = FusionLogitsProcessor(config, torch.device("cpu"), False)
    methods_ = ["dynamic", "static:1.0", "expert:e2", "large"]
    requests = [_Request(i, m, f"{m.replace(':', '-').replace('.', '_')}-{i}") for m in methods_
                for i in range(len(PROMPTS))]
    requests.append(_Request(0, "dynamic"))  # not traced
    assert _drive(proc, fuser, requests)
    for r in requests[:-1]:
        method = r.params.extra_args["solver"]
        tokens, weights = _engine_run(fuser, method, PROMPTS[r.i], LENGTHS[r.i])
        trace = read_trace(trace_file(tmp_path, r.params.extra_args["trace"]), len(r.output))
        assert r.output == tokens
        assert _close([s.weights for s in trace if s.weights is not None], weights), method
        assert len(trace) == (0 if method == "large" else len(tokens))
    assert len(list(tmp_path.iterdir())) == len(requests) - 1


# ---------------------------------------------------------------- vLLM's OpenAI server


@pytest.fixture(scope="module")
def server(recipe, tmp_path_factory):
    """`python -m logitfusion.vllm.serve RECIPE` on a free loopback port; its base URL."""
    import sys

    argv = lambda port: [sys.executable, "-m", "logitfusion.vllm.serve", recipe, "--host", "127.0.0.1",  # noqa: E731
                         "--port", str(port), "--enforce-eager", "--max-model-len", "128", "--max-num-seqs", "2"]
    # up to 3 minutes on a busy 2-core machine
    with server_process(argv, tmp_path_factory.mktemp("server") / "server.log",
                        os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=180) as url:
        yield url


@pytest.mark.slow
def test_served_completions_are_fused_and_a_bad_method_is_a_400(server, recipe, fuser):
    import httpx

    large = methods(os.path.realpath(recipe)).recipe.large.path
    for method in ("static:1.0", "dynamic"):
        body = {"model": large, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "vllm_xargs": {"solver": method}}
        r = httpx.post(f"{server}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        # token ids: vLLM's streamed text holds back a last incomplete UTF-8 character
        assert r.json()["choices"][0]["token_ids"] == _engine_tokens(fuser, method, PROMPTS[0], 6)
    r = httpx.post(f"{server}/v1/completions", timeout=60,
                   json={"model": large, "prompt": "a", "max_tokens": 2, "vllm_xargs": {"solver": "static:x"}})
    assert r.status_code == 400 and "extra_args.solver" in r.text


def test_processor_a_row_it_cannot_fuse_decodes_alone_and_the_rest_go_on(recipe, fuser, monkeypatch, caplog):
    """A row FusionRows refuses (found only in the worker) must not stop the engine and its other rows."""
    from logitfusion.engine.errors import DecodingError

    proc = FusionLogitsProcessor(SimpleNamespace(additional_config={CONFIG_KEY: recipe}), torch.device("cpu"), False)
    add = proc.rows.add

    def refuse_the_first(key, prompt, solver=None, **kw):
        if key == 0:
            raise DecodingError("prompt 0 is too long for small", field="prompt")
        add(key, prompt, solver, **kw)

    monkeypatch.setattr(proc.rows, "add", refuse_the_first)
    ids = [fuser.models.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    params = SimpleNamespace(extra_args={"solver": "static:1.0"})
    proc.update_state(BatchUpdate(2, [], [(0, params, ids[0], []), (1, params, ids[1], [])], []))
    assert "not fused" in caplog.text
    logits = torch.stack([_large_logits(fuser, i) for i in ids])
    out = proc.apply(logits.clone())
    assert torch.equal(out[0], logits[0]) and not torch.equal(out[1], logits[1])
