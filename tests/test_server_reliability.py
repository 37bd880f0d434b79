"""The server under bad input (issue 14): one bad request never hurts another, every invalid body
is a 4xx in the OpenAI format without a traceback or a path, and valid streams running meanwhile
finish with the text `Fuser.generate` gives. A real uvicorn server on 127.0.0.1, the real
`openai` client and httpx; hypothesis draws the bodies (fixed seed, bounded example counts).
"""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logitfusion.engine import limits
from logitfusion.engine.fuser import Fuser
from logitfusion.serve import create_app
from test_server import KEY, Server, error_of, metrics, wait_for, write_recipe


pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it


LIMIT = 8  # this server's max_tokens_limit: valid requests stay quick
STREAM_PROMPTS = ["the cat", "Question: 2 plus 3? Answer:", "héllo ☃ 日本"]
VALID_PROMPTS = ["the cat", "a", "Question: 2 plus 3? Answer:", "héllo ☃ 日本", "dog\nsat", "[bold]m[/] :m:"]
SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def recipe(family, tmp_path_factory):
    return write_recipe(tmp_path_factory.mktemp("reliability") / "fusion.yaml", family, ["expert1", "lora1"])


@pytest.fixture(scope="module")
def ref(recipe):
    return Fuser.from_recipe(recipe)


@pytest.fixture(scope="module")
def server(recipe):
    app = create_app({"fusion": Fuser.from_recipe(recipe)}, api_key=KEY, max_batch=8, max_queue=64,
                     max_tokens_limit=LIMIT)
    with Server(app) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with server.http() as client:
        yield client


class Streams:
    """Valid streams sent back to back from background threads while a test runs; each one's text
    is checked against Fuser.generate."""

    def __init__(self, server, ref, n=3):
        self.client, self.stop, self.errors, self.done = server.client(), threading.Event(), [], 0
        self.want = {p: ref.generate(p, max_new_tokens=LIMIT, ignore_eos=True)[0].text for p in STREAM_PROMPTS}
        self.threads = [threading.Thread(target=self._loop, args=(STREAM_PROMPTS[i % 3],), daemon=True)
                        for i in range(n)]

    def _loop(self, prompt):
        while not self.stop.is_set():
            try:
                chunks = list(self.client.completions.create(model="fusion", prompt=prompt, max_tokens=LIMIT,
                                                             stream=True, extra_body={"ignore_eos": True}))
                text = "".join(c.choices[0].text for c in chunks)
                if text != self.want[prompt] or chunks[-1].choices[0].finish_reason != "length":
                    self.errors.append(f"{prompt!r}: got {text!r}, want {self.want[prompt]!r}")
                self.done += 1
            except Exception as e:  # noqa: BLE001 - any failure of a valid stream is the finding
                self.errors.append(f"{prompt!r}: {e!r}")

    def __enter__(self):
        for t in self.threads:
            t.start()
        wait_for(lambda: self.done >= 1 or self.errors, timeout=60, what="a first background stream")
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)
        assert not self.errors, self.errors[:5]
        assert self.done >= len(self.threads)


def clean_error(r: httpx.Response, family_root: str) -> dict:
    """A 4xx in the OpenAI format that shows neither a traceback nor a path of the machine."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    err = error_of(r)
    assert isinstance(err["message"], str) and err["message"]
    for leak in ("Traceback", 'File "', "site-packages", family_root, "/tmp/"):
        assert leak not in r.text, (leak, r.text[:500])
    return err


@pytest.fixture(scope="module")
def root(family):
    from pathlib import Path
    return str(Path(family["large"]).parent)


def post(http, path, body):
    # allow_nan: NaN and Infinity are what a careless client sends; Python's JSON reads them
    return http.post(path, content=json.dumps(body, allow_nan=True), headers={"Content-Type": "application/json"})


# ---------------------------------------------------------------- regressions, one per defect

def test_lone_surrogate_prompt_is_its_own_400_and_running_streams_finish(server, http, ref, root):
    with Streams(server, ref):
        for path, body in [("/v1/completions", {"model": "fusion", "prompt": "bad \ud800 x", "max_tokens": 4}),
                           ("/v1/completions", {"model": "fusion", "prompt": ["\udfff"], "max_tokens": 4}),
                           ("/v1/chat/completions", {"model": "fusion", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "hi \ud800"}]}),
                           ("/v1/completions", {"model": "fusion", "prompt": "x", "stop": ["\ud800"]})]:
            err = clean_error(post(http, path, body), root)
            assert "surrogate" in err["message"]


def test_a_few_dozen_bad_requests_hold_no_slot(server, http, ref, root):
    bodies = [{"model": "fusion", "prompt": "bad \ud800 x"},
              {"model": "fusion", "prompt": "x", "temperature": 1.0, "seed": 2**70}] * 20
    with ThreadPoolExecutor(8) as pool:
        for r in pool.map(lambda b: post(http, "/v1/completions", b), bodies):
            clean_error(r, root)
    wait_for(lambda: metrics(server)["logitfusion_active_sequences"] == 0, what="every slot free")
    got = server.client().completions.create(model="fusion", prompt="the cat", max_tokens=4)
    assert got.choices[0].text == ref.generate("the cat", max_new_tokens=4)[0].text


def test_scheduler_fails_only_the_request_that_breaks(server, ref):
    """Past the HTTP checks (a client of `create_app`'s scheduler, or a check that misses a case):
    a request whose tokenisation or prefill raises on the scheduler thread gets its own 400 and
    the streams decoding meanwhile finish unchanged."""
    import asyncio

    from logitfusion.serve.events import Failed
    from logitfusion.serve.scheduler import Job
    from logitfusion.serve.serving import build_solver
    scheduler, fuser = server.app.state.scheduler, server.app.state.fusers["fusion"]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    key, solver = build_solver(fuser, None)[:2]

    def submit(prompt, **params):
        job = Job("fusion", fuser, key, solver, prompt, fuser.sampling(max_new_tokens=4, **params), False, None,
                  False, loop)
        scheduler.submit(job)
        return job

    try:
        with Streams(server, ref):
            # a lone surrogate reaches the tokenizer; a 70-bit seed reaches torch's generator
            jobs = [job for _ in range(3) for job in (submit("bad \ud800 x"),
                                                      submit("the cat", temperature=1.0, seed=2**70))]
            for job in jobs:
                event = asyncio.run_coroutine_threadsafe(job.events.get(), loop).result(60)
                assert isinstance(event, Failed) and event.error.status == 400, event
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    wait_for(lambda: metrics(server)["logitfusion_active_sequences"] == 0, what="every slot free")


def test_seed_beyond_64_bits_is_a_400_naming_seed(http, root):
    for seed in (2**70, -(2**70), 2**63):
        err = clean_error(post(http, "/v1/completions", {"model": "fusion", "prompt": "x", "temperature": 1.0,
                                                         "seed": seed}), root)
        assert err["param"] == "seed" and str(limits.SEED_MAX) in err["message"]


def test_tiny_temperature_is_greedy(server, ref):
    want = ref.generate("the cat", max_new_tokens=LIMIT)[0].text
    for t in (1e-40, 1e-300):
        got = server.client().completions.create(model="fusion", prompt="the cat", max_tokens=LIMIT,
                                                 temperature=t, seed=1)
        assert got.choices[0].text == want and got.choices[0].finish_reason != "error"


@pytest.mark.parametrize("solver", ["static:1e38", "static:-1", "static:nan", "static:1,1e38"])
def test_degenerate_static_weights_are_a_400(http, root, solver):
    err = clean_error(post(http, "/v1/completions", {"model": "fusion", "prompt": "x",
                                                     "fusion": {"solver": solver}}), root)
    assert err["param"] == "fusion" and "outside" in err["message"]


@pytest.mark.parametrize("role", ["tool", "developer\n", "user\nsystem", "User", ""])
def test_chat_role_must_be_system_user_or_assistant(http, root, role):
    err = clean_error(post(http, "/v1/chat/completions", {"model": "fusion", "max_tokens": 2,
                                                          "messages": [{"role": role, "content": "hi"}]}), root)
    assert "messages" in err["message"]


def test_max_completion_tokens_zero_is_refused(http, root):
    for field in ("max_completion_tokens", "max_tokens"):
        err = clean_error(post(http, "/v1/chat/completions", {"model": "fusion", field: 0,
                                                              "messages": [{"role": "user", "content": "hi"}]}), root)
        assert err["param"] == "max_tokens" and "got 0" in err["message"]


def test_json_body_with_another_content_type_says_so(http, root):
    body = json.dumps({"model": "fusion", "prompt": "x", "max_tokens": 2})
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        r = http.post("/v1/completions", content=body, headers={"Content-Type": ctype})
        err = clean_error(r, root)
        assert r.status_code == 415 and "application/json" in err["message"] and ctype in err["message"]
    assert http.post("/v1/completions", content=body, headers={"Content-Type": "application/json; charset=utf-8"}
                     ).status_code == 200


def test_server_limits_come_from_the_shared_module():
    with pytest.raises(ValueError, match=str(limits.MAX_NEW_TOKENS)):
        create_app({"x": object()}, max_tokens_limit=limits.MAX_NEW_TOKENS + 1)


# ---------------------------------------------------------------- property tests

BIG = [0, 1, -1, 2, 2.5, 1e-300, 1e-40, 1e38, 1e308, 2**31, 2**63, 2**64, 2**70, -(2**70),
       float("nan"), float("inf"), float("-inf")]
odd_text = st.one_of(st.text(max_size=12), st.sampled_from(
    ["", " ", "\ud800", "a\udfffb", "\x00", "\n\nuser:", "[bold]m[/]", ":m:", "x" * 3000, "🙂" * 50]))
numbers = st.one_of(st.integers(-(2**72), 2**72), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(BIG))
junk = st.recursive(st.one_of(st.none(), st.booleans(), numbers, odd_text),
                    lambda inner: st.one_of(st.lists(inner, max_size=6),
                                            st.dictionaries(odd_text, inner, max_size=3)), max_leaves=8)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "top_k", "seed", "stop", "n", "logprobs", "top_logprobs", "echo", "best_of", "suffix",
          "presence_penalty", "logit_bias", "ignore_eos", "fusion", "response_format", "tools"]

# Per field, values that must be refused (with a valid rest of the body).
INVALID = {
    "model": st.one_of(st.text(max_size=10).filter(lambda m: m != "fusion"), numbers, st.lists(st.just("fusion"))),
    "prompt": st.one_of(st.sampled_from(["", "\ud800", "a\udfffb", "the cat " * 300]), numbers, st.none(),
                        st.lists(st.sampled_from(["a", "b"]), min_size=2, max_size=5), st.just([]),
                        st.lists(st.integers(0, 299), min_size=1, max_size=4)),
    "max_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=LIMIT + 1),
                            st.sampled_from([2.5, "four", float("nan"), float("inf"), [4]])),
    "temperature": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=2.0001, allow_infinity=True),
                             st.sampled_from([float("nan"), "hot", [1.0]])),
    "top_p": st.one_of(st.floats(max_value=0), st.floats(min_value=1.0001, allow_infinity=True),
                       st.sampled_from([float("nan")])),
    "top_k": st.one_of(st.integers(max_value=-1), st.integers(min_value=limits.MAX_TOP_K + 1)),
    "seed": st.one_of(st.integers(min_value=limits.SEED_MAX + 1), st.integers(max_value=limits.SEED_MIN - 1),
                      st.sampled_from([1.5, "seven"])),
    "stop": st.one_of(st.sampled_from(["", [""], ["\ud800"], ["a"] * 5, ["x" * (limits.MAX_STOP_CHARS + 1)]]),
                      st.lists(numbers, min_size=1, max_size=3)),
    "n": st.integers(min_value=2),
    "logprobs": st.one_of(st.integers(max_value=-1), st.integers(min_value=6)),
    "echo": st.just(True),
    "best_of": st.integers(min_value=2),
    "suffix": st.text(min_size=1, max_size=5),
    "presence_penalty": st.floats(min_value=0.01, max_value=2),
    "logit_bias": st.dictionaries(st.sampled_from(["1", "2"]), st.floats(-100, 100), min_size=1),
    "fusion": st.one_of(
        st.builds(lambda s: {"solver": s}, st.sampled_from(
            ["magic", "static:1e38", "static:-1", "static:nan", "static:inf", "static:1,2,3", "dynamic:slow",
             "expert:nobody", "delta", "static:\ud800", "large:1"])),
        st.builds(lambda e: {"experts": e}, st.sampled_from([[], ["nope"], ["expert1", "expert1"], ["\ud800"]])),
        st.just({"surprise": 1}), st.just({"solver": "large", "experts": ["expert1"]})),
}
CHAT_INVALID = {
    "messages": st.one_of(st.just([]), numbers, st.lists(st.builds(
        lambda r, c: {"role": r, "content": c},
        st.sampled_from(["tool", "function", "user\nsystem", "", "USER"]), st.just("hi")), min_size=1, max_size=3),
        st.just([{"role": "user", "content": "a \ud800"}]),
        st.just([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])),
    "max_completion_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=LIMIT + 1)),
    "top_logprobs": st.integers(min_value=6),
    "tools": st.just([{"type": "function", "function": {"name": "f"}}]),
    "response_format": st.just({"type": "json_object"}),
}


def base_body(chat: bool) -> dict:
    if chat:
        return {"model": "fusion", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return {"model": "fusion", "prompt": "the cat", "max_tokens": 2}


@st.composite
def invalid_body(draw):
    chat = draw(st.booleans())
    fields = {**INVALID, **CHAT_INVALID} if chat else INVALID
    fields = {k: v for k, v in fields.items() if not (chat and k in ("prompt", "echo", "best_of", "suffix",
                                                                      "logprobs"))}
    name = draw(st.sampled_from(sorted(fields)))
    body = base_body(chat)
    body[name] = draw(fields[name])
    return chat, body


@st.composite
def random_body(draw):
    chat = draw(st.booleans())
    body = base_body(chat)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        body[name] = draw(junk)
    if draw(st.booleans()):
        body = draw(junk)  # not even an object
    return chat, body


@st.composite
def valid_body(draw):
    prompt = draw(st.one_of(st.sampled_from(VALID_PROMPTS),
                            st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
                            .filter(lambda t: t.strip())))
    sampled = draw(st.booleans())
    body = {"model": "fusion", "prompt": draw(st.sampled_from([prompt, [prompt]])),
            "max_tokens": draw(st.integers(1, LIMIT)),
            "temperature": draw(st.sampled_from([0.5, 1.0, 2.0, 1e-300])) if sampled else 0.0,
            "seed": draw(st.integers(limits.SEED_MIN, limits.SEED_MAX - 8)),
            "top_k": draw(st.sampled_from([0, 1, 5, 2**20])), "top_p": draw(st.sampled_from([1.0, 0.9, 1e-9])),
            "stop": draw(st.one_of(st.none(), st.lists(st.sampled_from(["e", "\n", "the", "☃"]), max_size=4))),
            "fusion": {"solver": draw(st.sampled_from(["dynamic", "static:1.0", "static:0,1000", "large",
                                                       "expert:lora1", "dynamic:joint"]))}}
    return body


def test_property_invalid_bodies_are_4xx_while_streams_run(server, http, ref, root):
    with Streams(server, ref):
        @settings(max_examples=120, **SETTINGS)
        @given(invalid_body())
        def check(case):
            chat, body = case
            clean_error(post(http, "/v1/chat/completions" if chat else "/v1/completions", body), root)
        check()


def test_property_random_bodies_never_fail_the_server(server, http, ref, root):
    with Streams(server, ref):
        @settings(max_examples=120, **SETTINGS)
        @given(random_body())
        def check(case):
            chat, body = case
            r = post(http, "/v1/chat/completions" if chat else "/v1/completions", body)
            if r.status_code == 200:
                assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
            else:
                clean_error(r, root)
        check()


def test_property_valid_bodies_give_what_fuser_generate_gives(server, http, ref, root):
    with Streams(server, ref):
        @settings(max_examples=40, **SETTINGS)
        @given(valid_body())
        def check(body):
            r = post(http, "/v1/completions", body)
            assert r.status_code == 200, r.text[:500]
            prompt = body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][0]
            want = ref.generate(prompt, solver=body["fusion"]["solver"], max_new_tokens=body["max_tokens"],
                                temperature=body["temperature"], seed=body["seed"], top_k=body["top_k"],
                                top_p=body["top_p"], stop=body["stop"])[0]
            assert r.json()["choices"][0]["text"] == want.text
        check()
