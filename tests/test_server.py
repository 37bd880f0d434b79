"""The OpenAI-compatible server end to end: a real uvicorn server on 127.0.0.1, driven by the real
`openai` client (and httpx where a client must misbehave), on the toy family. Every expected
answer comes from the library (`Fuser.generate`) on a separately loaded copy of the same recipe.

Every wait is bounded: thread pools have fixed sizes, futures and polls have deadlines, and the
clients have timeouts.
"""

import os
import socket
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
import yaml

from logitfusion import SamplingParams
from logitfusion.engine.decoding import Batch, Seq
from logitfusion.engine.detokenize import find_stop
from logitfusion.engine.fuser import Fuser
from logitfusion.serve import create_app
from logitfusion.serve.serving import CHAT_FALLBACK_STOP, chat_prompt
from logitfusion.serve.tracker import Tracker, holdback
from logitfusion.testing.serving import server_process


pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it


KEY = "test-key-123"
LIMIT = 64  # max_tokens_limit of the test server
BODY_LIMIT = 64 * 1024
PROMPTS = ["the cat", "Question: 2 plus 3? Answer:", "héllo ☃ 日本", "a"]


# ---------------------------------------------------------------- fixtures

def write_recipe(path, family, experts):
    path.write_text(yaml.safe_dump({
        "large": {"path": family["large"]},
        "small": {"path": family["small"]},
        "experts": [{"name": e, "path": family["experts"][e]} for e in experts],
        "solver": {"kind": "dynamic", "grid": {"start": 0, "stop": 2, "step": 0.25}},
        "generation": {"max_new_tokens": 16},
    }))
    return path


@pytest.fixture(scope="module")
def recipes(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {"fusion": write_recipe(root / "fusion.yaml", family, ["expert1", "lora1"]),
            "fusion-e1": write_recipe(root / "fusion-e1.yaml", family, ["expert1"])}


@pytest.fixture(scope="module")
def ref(recipes):
    """The library's answers: the same recipes loaded separately from the served ones."""
    return {name: Fuser.from_recipe(path) for name, path in recipes.items()}


class Server:
    """uvicorn in a background thread, on a free loopback port."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            assert self.thread.is_alive(), "server thread died"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def client(self, api_key=KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    def http(self):
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


@pytest.fixture(scope="module")
def server(recipes):
    fusers = {name: Fuser.from_recipe(path) for name, path in recipes.items()}
    app = create_app(fusers, api_key=KEY, max_batch=32, max_queue=64, max_tokens_limit=LIMIT,
                     max_body_bytes=BODY_LIMIT)
    with Server(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def metrics(server) -> dict[str, float]:
    text = server.http().get("/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stream_completion(client, **kw):
    chunks = list(client.completions.create(stream=True, **kw))
    assert chunks[-1].choices[0].finish_reason is not None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    return chunks, "".join(c.choices[0].text for c in chunks)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    assert "Traceback" not in response.text
    return body["error"]


# ---------------------------------------------------------------- routes and answers

def test_models_health_and_metrics_routes(server, client):
    assert sorted(m.id for m in client.models.list()) == ["fusion", "fusion-e1"]
    assert client.models.retrieve("fusion").model_extra["experts"] == ["expert1", "lora1"]
    health = httpx.get(server.url + "/health", timeout=10)  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    m = server.http().get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    for name in ("logitfusion_requests_total", "logitfusion_generated_tokens_total", "logitfusion_queue_depth",
                 "logitfusion_active_sequences", "logitfusion_request_duration_seconds_bucket"):
        assert name in m.text


@pytest.mark.parametrize("solver", [None, "static:1.0", "large", "expert:lora1", "dynamic:joint"])
def test_completions_streamed_equals_non_streamed_equals_generate(client, ref, solver):
    extra = {"fusion": {"solver": solver}} if solver else None
    for prompt in PROMPTS[:3]:
        want = ref["fusion"].generate(prompt, solver=solver, max_new_tokens=16)[0]
        got = client.completions.create(model="fusion", prompt=prompt, max_tokens=16, extra_body=extra)
        chunks, streamed = stream_completion(client, model="fusion", prompt=[prompt], max_tokens=16, extra_body=extra)
        assert got.choices[0].text == streamed == want.text, (prompt, solver)
        assert got.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == \
            {"eos": "stop", "length": "length", "stop": "stop"}[want.finish_reason]
        assert got.usage.completion_tokens == len(want.token_ids)
        assert got.model_extra["fusion"]["solver"] == (solver or "dynamic")
        if len(want.text) > 2:
            assert len(chunks) > 2  # text really arrives piece by piece


def test_stop_strings_are_never_streamed(client, ref):
    for prompt in PROMPTS:
        free = ref["fusion"].generate(prompt, max_new_tokens=16)[0].text
        candidates = [free[i:i + 2] for i in range(3, len(free) - 1) if "\ufffd" not in free[i:i + 2]]
        if not candidates:
            continue
        stop = [candidates[0], "zzz-never"]
        want = ref["fusion"].generate(prompt, max_new_tokens=16, stop=stop)[0]
        assert want.finish_reason == "stop"
        got = client.completions.create(model="fusion", prompt=prompt, max_tokens=16, stop=stop)
        chunks, streamed = stream_completion(client, model="fusion", prompt=prompt, max_tokens=16, stop=stop)
        assert got.choices[0].text == streamed == want.text
        assert stop[0] not in streamed and got.choices[0].finish_reason == "stop"
        assert chunks[-1].choices[0].finish_reason == "stop"
        return
    pytest.fail("no prompt produced text to cut with a stop string")


def test_sampling_with_seed_is_reproducible_and_equals_generate(client, ref):
    kw = dict(temperature=0.9, top_p=0.9, seed=1234)
    want = ref["fusion"].generate("the cat", max_new_tokens=16, **kw)[0].text
    got = client.completions.create(model="fusion", prompt="the cat", max_tokens=16, **kw).choices[0].text
    _, streamed = stream_completion(client, model="fusion", prompt="the cat", max_tokens=16, **kw)
    assert got == streamed == want
    other = ref["fusion"].generate("the cat", max_new_tokens=16, temperature=0.9, top_p=0.9, seed=99)[0].text
    assert other != want  # the seed matters, so the equality above means something


def test_fusion_weights_returned_per_step(client, ref):
    extra = {"fusion": {"return_weights": True}}
    want = ref["fusion"].generate("the cat", max_new_tokens=16, trace=True)[0]
    got = client.completions.create(model="fusion", prompt="the cat", max_tokens=16, extra_body=extra)
    fusion = got.model_extra["fusion"]
    assert fusion["experts"] == ["expert1", "lora1"] and fusion["solver"] == "dynamic"
    assert fusion["weights"] == want.weights and len(want.weights) == len(want.token_ids)
    chunks, streamed = stream_completion(client, model="fusion", prompt="the cat", max_tokens=16, extra_body=extra)
    assert [w for c in chunks for w in c.model_extra["fusion"]["weights"]] == want.weights
    assert streamed == want.text
    chat = client.chat.completions.create(model="fusion", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, extra_body=extra)
    assert len(chat.model_extra["fusion"]["weights"]) == chat.usage.completion_tokens


def test_expert_subset_equals_a_recipe_with_only_those_experts(client, ref):
    want = ref["fusion-e1"].generate("the cat", max_new_tokens=16, trace=True)[0]
    sub = client.completions.create(model="fusion", prompt="the cat", max_tokens=16,
                                    extra_body={"fusion": {"experts": ["expert1"], "return_weights": True}})
    other = client.completions.create(model="fusion-e1", prompt="the cat", max_tokens=16,
                                      extra_body={"fusion": {"return_weights": True}})
    assert sub.choices[0].text == other.choices[0].text == want.text
    assert sub.model_extra["fusion"]["weights"] == other.model_extra["fusion"]["weights"] == want.weights
    assert sub.model_extra["fusion"]["experts"] == ["expert1"]


def test_completion_logprobs(client, ref):
    fuser = ref["fusion"]
    batch = Batch(fuser.models, fuser.solver)  # the engine's own log-probs, as reference
    (seq,) = batch.add(["the cat"], [SamplingParams(max_new_tokens=16, logprobs=True)])
    for _ in range(40):
        if not len(batch):
            break
        batch.step()
    got = client.completions.create(model="fusion", prompt="the cat", max_tokens=16, logprobs=2)
    lp = got.choices[0].logprobs
    n = len(seq.tokens) - (seq.finish_reason == "eos")
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(lp.top_logprobs) == n
    assert lp.token_logprobs == pytest.approx(seq.logprobs[:n], abs=1e-5)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert all(max(top.values()) >= chosen - 1e-4 for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    chunks, _ = stream_completion(client, model="fusion", prompt="the cat", max_tokens=16, logprobs=2)
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    assert [x for c in chunks for x in c.choices[0].logprobs.text_offset] == lp.text_offset


def test_each_prompt_is_tokenised_once_per_model_that_reads_it(server, client, monkeypatch):
    """Prefill checks, tokenises and counts the prompt (usage reads its count): no second pass."""
    from logitfusion.engine.decoding import members_for
    fuser = server.app.state.fusers["fusion"]
    members = members_for(fuser.models, fuser.solver)
    prompt, calls = "a zebra counts quartz", []
    for kind in {type(m.tokenizer or fuser.models.tokenizer) for m in members}:
        def counting(self, text, *args, _call=kind.__call__, **kwargs):
            if isinstance(text, str) and prompt in text:
                calls.append(text)
            return _call(self, text, *args, **kwargs)
        monkeypatch.setattr(kind, "__call__", counting)
    got = client.completions.create(model="fusion", prompt=prompt, max_tokens=2)
    assert len(members) >= 3 and len(calls) == len(members), calls
    assert got.usage.prompt_tokens == len(fuser.models.tokenizer(prompt)["input_ids"])


def test_chat_streamed_and_not_equal_generate(client, ref):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Question: 2 plus 3?"}]
    prompt = "system: be brief\nuser: Question: 2 plus 3?\nassistant:"  # the documented fallback format
    want = ref["fusion"].generate(prompt, max_new_tokens=12, stop=[CHAT_FALLBACK_STOP])[0]
    got = client.chat.completions.create(model="fusion", messages=messages, max_tokens=12)
    assert got.choices[0].message.role == "assistant" and got.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="fusion", messages=messages, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == got.usage.completion_tokens
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert got.choices[0].message.content == streamed == want.text
    lp = client.chat.completions.create(model="fusion", messages=messages, max_tokens=12, logprobs=True,
                                        top_logprobs=2).choices[0].logprobs.content
    assert lp and all(t.logprob <= 0 and len(t.top_logprobs) <= 2 for t in lp)


def test_chat_template_is_used_when_the_tokenizer_has_one(family):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(family["large"])
    messages = [{"role": "user", "content": "hi"}]
    assert chat_prompt(tok, messages) == ("user: hi\nassistant:", [CHAT_FALLBACK_STOP])
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert chat_prompt(tok, messages) == ("<user>hi</s><assistant>", [])


# ---------------------------------------------------------------- incremental decoding (unit, real tokenizer)

def follow(tok, text, stop=()):
    """Feed the tokens of `text` one by one to a Tracker, as the scheduler does; returns the pieces."""
    seq = Seq("p", SamplingParams(stop=list(stop)))
    job = types.SimpleNamespace(stream=True, logprobs=None, return_weights=False, seq=seq)
    tracker, pieces = Tracker(job, tok), []
    for t in tok(text)["input_ids"]:
        seq.tokens.append(t)
        if stop and (cut := find_stop(tok, seq)) is not None:
            seq.finish_reason, seq.stop_at = "stop", cut
        delta = tracker.advance()
        if delta:
            pieces.append(delta["text"])
        if seq.done:
            break
    seq.finish_reason = seq.finish_reason or "length"
    pieces.append(tracker.finish(seq.result(tok).text)["text"])
    return pieces, seq.result(tok).text


def test_tracker_streams_only_whole_characters_and_holds_back_stop_strings(family):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(family["large"])
    text = "héllo ☃ 日本 and 3 plus 4 makes 7."
    ids = tok(text)["input_ids"]
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(len(ids)))  # characters do span tokens
    pieces, final = follow(tok, text)
    assert "".join(pieces) == final == text
    assert not any("\ufffd" in p for p in pieces)
    for stop in ["☃", "日本", "plus 4", "makes"]:
        pieces, final = follow(tok, text, stop=[stop])
        assert final == text[: text.index(stop)]
        assert "".join(pieces) == final and stop not in "".join(pieces)
    assert holdback("abc pl", ["plus"]) == 2 and holdback("abc", ["plus"]) == 0


# ---------------------------------------------------------------- concurrency

def test_32_concurrent_clients_get_correct_answers_and_are_batched(server, client, ref):
    prompts = [f"Question: {i} plus {i % 7}? Answer:" if i % 2 else f"the {i} cats" for i in range(32)]
    want = [g.text for g in ref["fusion"].generate(prompts, max_new_tokens=16)]

    def ask(p):
        return client.completions.create(model="fusion", prompt=p, max_tokens=16).choices[0].text

    before = metrics(server)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(ask, p) for p in prompts]
        concurrent = [f.result(timeout=120) for f in futures]
    t_concurrent = time.perf_counter() - t0
    after = metrics(server)
    assert concurrent == want
    steps = after["logitfusion_decode_steps_total"] - before["logitfusion_decode_steps_total"]
    rows = after["logitfusion_decode_rows_total"] - before["logitfusion_decode_rows_total"]
    assert rows / steps > 4, "requests were not decoded together"

    t0 = time.perf_counter()
    sequential = [ask(p) for p in prompts]
    t_sequential = time.perf_counter() - t0
    assert sequential == want
    print(f"\n32 clients x 16 tokens: concurrent {t_concurrent:.2f}s, one at a time {t_sequential:.2f}s, "
          f"speed-up {t_sequential / t_concurrent:.1f}x; mean batch {rows / steps:.1f} rows")


def test_disconnect_mid_stream_frees_the_slot_and_spares_the_others(server, client, ref):
    prompts = ["the cat", "héllo ☃ 日本", "a"]
    want = [g.text for g in ref["fusion"].generate(prompts, max_new_tokens=48, ignore_eos=True)]
    before = metrics(server)
    cancelled = 'logitfusion_sequences_finished_total{model="fusion",reason="cancelled"}'

    def ask(p):
        return client.completions.create(model="fusion", prompt=p, max_tokens=48,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(ask, p) for p in prompts]
        body = {"model": "fusion", "prompt": "the dog", "max_tokens": LIMIT, "stream": True, "ignore_eos": True}
        with server.http() as http, http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
            assert len(got) >= 2 and "[DONE]" not in got[-1]
        # closed after a few chunks, long before its 64 tokens
        answers = [f.result(timeout=60) for f in futures]
    assert answers == want
    wait_for(lambda: metrics(server)["logitfusion_active_sequences"] == 0, what="active sequences back to 0")
    after = metrics(server)
    assert after.get(cancelled, 0) == before.get(cancelled, 0) + 1
    assert after["logitfusion_queue_depth"] == 0
    # the server still serves
    assert client.completions.create(model="fusion", prompt="the cat", max_tokens=4).choices[0].text == \
        ref["fusion"].generate("the cat", max_new_tokens=4)[0].text


def test_requests_join_a_running_batch(server, client, ref):
    """A request that arrives while a long one decodes joins its batch at a step boundary."""
    long_want = ref["fusion"].generate("the dog", max_new_tokens=LIMIT, ignore_eos=True)[0].text
    short_want = ref["fusion"].generate("the cat", max_new_tokens=4, ignore_eos=True)[0].text
    before = metrics(server)
    stream = client.completions.create(model="fusion", prompt="the dog", max_tokens=LIMIT, stream=True,
                                       extra_body={"ignore_eos": True})
    pieces = [next(stream).choices[0].text]
    short = client.completions.create(model="fusion", prompt="the cat", max_tokens=4,
                                      extra_body={"ignore_eos": True}).choices[0].text
    rest = list(stream)
    after = metrics(server)
    assert short == short_want
    assert "".join(pieces + [c.choices[0].text for c in rest]) == long_want
    steps = after["logitfusion_decode_steps_total"] - before["logitfusion_decode_steps_total"]
    rows = after["logitfusion_decode_rows_total"] - before["logitfusion_decode_rows_total"]
    assert steps == LIMIT  # the short request took no steps of its own...
    assert rows == LIMIT + 4  # ...its 4 tokens were decoded as a second row of the long one's steps


def test_recipe_speculation_serves_the_same_answers(family, tmp_path, ref):
    """A recipe with generation.speculate: the server's batches draft and verify, and greedy
    answers, streamed or not and batched with others, equal plain decoding's."""
    from concurrent.futures import ThreadPoolExecutor
    path = write_recipe(tmp_path / "spec.yaml", family, ["expert1"])
    data = yaml.safe_load(path.read_text())
    data["generation"]["speculate"] = 3
    path.write_text(yaml.safe_dump(data))
    fuser = Fuser.from_recipe(path)
    prompts = ["the cat sells", "Question: 3 plus 4? Answer:", "two dogs"]
    want = [g.text for g in ref["fusion-e1"].generate(prompts, max_new_tokens=12)]
    calls = []
    handle = fuser.models.large.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with Server(create_app({"spec": fuser})) as s:
            client = s.client()
            with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent requests share one batch
                got = list(pool.map(lambda p: client.completions.create(model="spec", prompt=p, max_tokens=12)
                                    .choices[0].text, prompts))
            assert got == want
            calls.clear()
            assert stream_completion(client, model="spec", prompt=prompts[0], max_tokens=12)[1] == want[0]
    finally:
        handle.remove()
    tokens = len(ref["fusion-e1"].generate(prompts[0], max_new_tokens=12)[0].token_ids)
    assert len(calls) < tokens  # plain decoding: a prefill and one forward per further token


def test_decoding_failure_is_a_clean_500(family, tmp_path):
    """An expert with NaN weights: the engine stops the sequence; the client gets an OpenAI error."""
    import torch
    from transformers import AutoModelForCausalLM
    broken = AutoModelForCausalLM.from_pretrained(family["experts"]["expert1"])
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    broken.save_pretrained(str(tmp_path / "nan"))
    family = dict(family, experts={"expert1": str(tmp_path / "nan")})
    fuser = Fuser.from_recipe(write_recipe(tmp_path / "broken.yaml", family, ["expert1"]))
    with Server(create_app({"broken": fuser})) as s:
        client = s.client()
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="broken", prompt="the cat", max_tokens=4)
        assert e.value.body["code"] == "decoding_error" and "NaN" in e.value.body["message"]
        assert "Traceback" not in e.value.response.text
        with pytest.raises(openai.APIError) as e:
            list(client.completions.create(model="broken", prompt="the cat", max_tokens=4, stream=True))
        assert "NaN" in e.value.message
        # the large model alone does not read the broken expert, and still works
        assert client.completions.create(model="broken", prompt="the cat", max_tokens=2,
                                         extra_body={"fusion": {"solver": "large"}}).usage.completion_tokens >= 1


# ---------------------------------------------------------------- errors and security

def test_wrong_or_missing_api_key_is_401(server):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(api_key="wrong").completions.create(model="fusion", prompt="x", max_tokens=2)
    assert e.value.status_code == 401
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions")):
            r = httpx.request(method, server.url + path, headers=headers, timeout=10)
            assert r.status_code == 401
            assert error_of(r)["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_oversize_body_is_413(server, client):
    big = "word " * (BODY_LIMIT // 4)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="fusion", prompt=big, max_tokens=2)
    assert e.value.status_code == 413
    with server.http() as http:  # without Content-Length (chunked): counted while reading
        r = http.post("/v1/completions", content=iter([b'{"prompt": "', big.encode(), b'"}']),
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"


def test_request_validation_errors_are_400_in_openai_format(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="fusion", prompt="x", max_tokens=LIMIT + 1)
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="fusion", prompt="x", max_tokens=2, n=2)
    assert e.value.body["param"] == "n" and "n=2" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="fusion", messages=[{"role": "user", "content": "x"}], n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="fusion", prompt="x", extra_body={"fusion": {"solver": "magic"}})
    assert "unknown method" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="fusion", prompt="x", extra_body={"fusion": {"experts": ["nope"]}})
    with pytest.raises(openai.BadRequestError) as e:  # longer than the toy models' 256-token context
        client.completions.create(model="fusion", prompt="the cat " * 300, max_tokens=2)
    assert "context" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="fusion", prompt=["a", "b"], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="fusion", prompt="x", max_tokens=2, stop=["a", "b", "c", "d", "e"])
    with server.http() as http:
        r = http.post("/v1/completions", content=b'{"model": "fusion", "prompt": ',
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 400
        err = error_of(r)
        assert err["type"] == "invalid_request_error" and "JSON" in err["message"]
        r = http.post("/v1/completions", json={"model": "fusion"})  # no prompt
        assert r.status_code == 400 and error_of(r)["param"] == "prompt"
        r = http.post("/v1/completions", json={"model": "fusion", "prompt": "x", "temperature": -1})
        assert r.status_code == 400 and error_of(r)["param"] == "temperature"
        r = http.get("/v1/nothing-here")
        assert r.status_code == 404 and error_of(r)["code"] == "not_found"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "fusion" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


def test_full_queue_is_429(recipes, ref):
    """One decoding slot and one queue place: a third request is turned away, nothing is lost."""
    app = create_app({"fusion": Fuser.from_recipe(recipes["fusion"])}, max_batch=1, max_queue=1,
                     max_tokens_limit=LIMIT)
    with Server(app) as s, ThreadPoolExecutor(1) as pool:
        client = s.client()
        want = ref["fusion"].generate("the cat", max_new_tokens=4)[0].text
        stream = client.completions.create(model="fusion", prompt="the dog", max_tokens=LIMIT, stream=True,
                                           extra_body={"ignore_eos": True})
        next(stream)  # decoding: the one slot is taken
        queued = pool.submit(lambda: client.completions.create(model="fusion", prompt="the cat", max_tokens=4))
        wait_for(lambda: metrics(s)["logitfusion_queue_depth"] == 1, what="a queued request")
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="fusion", prompt="the cat", max_tokens=4)
        assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
        assert e.value.response.headers["retry-after"] == "1"
        stream.close()  # the slot frees, the queued request runs
        assert queued.result(timeout=60).choices[0].text == want
        m = metrics(s)
        assert m['logitfusion_requests_total{route="/v1/completions",status="429"}'] == 1


# ---------------------------------------------------------------- the CLI command

def test_cli_serve_starts_a_working_server(recipes, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "logitfusion")
    argv = lambda port: [exe, "serve", "--recipe", str(recipes["fusion"]), "--recipe",  # noqa: E731
                         f"second={recipes['fusion-e1']}", "--port", str(port), "--max-batch", "4",
                         "--log-level", "warning"]
    with server_process(argv, tmp_path / "serve.log", dict(os.environ, LOGITFUSION_API_KEY=KEY), timeout=90) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        assert sorted(m.id for m in client.models.list()) == ["fusion", "second"]
        r = client.completions.create(model="second", prompt="the cat", max_tokens=3)
        assert r.usage.completion_tokens >= 1
        assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 401


def test_joint_solver_with_many_experts_serves(family, tmp_path):
    """Three experts and the default 21-point grid: `dynamic:joint` takes the continuous solver,
    which needs autograd inside the server's inference-mode thread."""
    path = tmp_path / "three.yaml"
    path.write_text(yaml.safe_dump({
        "large": {"path": family["large"]}, "small": {"path": family["small"]},
        "experts": [{"name": e, "path": family["experts"][e]} for e in ("expert1", "expert2", "lora1")],
        "solver": {"kind": "dynamic", "strategy": "joint"}, "generation": {"max_new_tokens": 6}}))
    fuser = Fuser.from_recipe(path)
    want = Fuser.from_recipe(path).generate(PROMPTS[0], max_new_tokens=6)[0]
    with Server(create_app({"three": fuser}, api_key=KEY)) as s:
        got = s.client().completions.create(model="three", prompt=PROMPTS[0], max_tokens=6)
    assert got.choices[0].text == want.text
