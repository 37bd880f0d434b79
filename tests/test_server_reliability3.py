"""The server under bad input, round 3 (issue 23): a JSON type other than the field's is a 400
naming the field (`true` is never the number 1, "3" never 3); bodies that are not UTF-8, JSON sent
without a Content-Type, JSON nested too deep, a text content part without text: each a 400 (or
the request served) saying what is wrong. A real uvicorn server on 127.0.0.1 and httpx; hypothesis
draws a wrong type for every field (fixed seed, bounded example counts)."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from logitfusion.cli import app as cli_app
from logitfusion.engine import limits
from logitfusion.engine.fuser import Fuser
from logitfusion.serve import create_app
from test_server import Server, error_of, write_recipe

pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it

SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
COMPLETION, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def recipe(family, tmp_path_factory):
    return write_recipe(tmp_path_factory.mktemp("reliability3") / "fusion.yaml", family, ["expert1"])


@pytest.fixture(scope="module")
def http(recipe):
    with Server(create_app({"fusion": Fuser.from_recipe(recipe)}, max_tokens_limit=4)) as s, s.http() as client:
        yield client


def raw(http, path, data: bytes, content_type: str | None = "application/json"):
    return http.post(path, content=data, headers={"Content-Type": content_type} if content_type else {})


def base(path: str) -> dict:
    if path == CHAT:
        return {"model": "fusion", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return {"model": "fusion", "prompt": "the cat", "max_tokens": 2}


@pytest.mark.parametrize("field, value", [("max_tokens", True), ("max_tokens", "3"), ("max_tokens", 2.0),
                                          ("temperature", True), ("seed", False), ("n", True), ("top_k", True),
                                          ("stream", 1), ("ignore_eos", "yes"), ("echo", 0), ("logprobs", True)])
def test_a_boolean_is_never_a_number_nor_a_number_a_boolean(http, field, value):
    r = http.post(COMPLETION, json=base(COMPLETION) | {field: value})
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == field and err["message"].startswith(f"{field}: ") and json.dumps(value) in err["message"]


def test_a_body_that_is_not_utf8_says_so(http):
    r = raw(http, COMPLETION, b'{"model": "fusion", "prompt": "caf\xe9"}')
    assert r.status_code == 400 and "not valid UTF-8 (byte 34)" in error_of(r)["message"]


def test_json_without_a_content_type_is_read_as_json(http):
    r = raw(http, COMPLETION, json.dumps(base(COMPLETION)).encode(), content_type=None)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_json_nested_too_deep_says_so(http):
    deep = json.dumps(base(COMPLETION))[:-1] + ', "metadata": ' + "[" * 5000 + "]" * 5000 + "}"
    r = raw(http, COMPLETION, deep.encode())
    assert r.status_code == 400 and f"nested more than {limits.MAX_JSON_DEPTH} levels" in error_of(r)["message"]
    ok = json.dumps(base(COMPLETION))[:-1] + ', "metadata": ' + "[" * 8 + "]" * 8 + "}"
    assert raw(http, COMPLETION, ok.encode()).status_code == 200


def test_invalid_json_says_where(http):
    r = raw(http, COMPLETION, b'{"model": "fusion", "prompt": }')
    assert r.status_code == 400 and "not valid JSON" in error_of(r)["message"] and "column 31" in error_of(r)["message"]


def test_a_text_content_part_without_text_says_so(http):
    body = base(CHAT) | {"messages": [{"role": "user", "content": [{"type": "text"}]}]}
    r = http.post(CHAT, json=body)
    assert r.status_code == 400
    assert 'content part of type "text" needs a string field "text"' in error_of(r)["message"]
    body["messages"][0]["content"] = [{"type": "text", "text": "hi"}]
    assert http.post(CHAT, json=body).status_code == 200


def test_serve_refuses_an_unknown_log_level(recipe):
    r = CliRunner().invoke(cli_app, ["serve", "-r", str(recipe), "--log-level", "loud"])
    assert r.exit_code == 2 and "--log-level 'loud' is not a log level" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


# ---------------------------------------------------------------- property: wrong JSON types, every field

# The JSON kinds each field takes (null: the field may be left unset).
KINDS = {"bool", "int", "float", "str", "null", "object", "list-str", "list-int", "list-obj"}
NUM = {"int", "float", "null"}
FIELDS = {
    COMPLETION: {"model": {"str"}, "prompt": {"str", "list-str"}, "max_tokens": {"int", "null"},
                 "temperature": NUM, "top_p": NUM, "top_k": {"int", "null"}, "seed": {"int", "null"},
                 "stop": {"str", "list-str", "null"}, "n": {"int", "null"}, "stream": {"bool", "null"},
                 "stream_options": {"object", "null"}, "presence_penalty": NUM, "frequency_penalty": NUM,
                 "logit_bias": {"object", "null"}, "ignore_eos": {"bool"}, "fusion": {"object", "null"},
                 "logprobs": {"int", "null"}, "echo": {"bool", "null"}, "best_of": {"int", "null"},
                 "suffix": {"str", "null"}},
}
FIELDS[CHAT] = {k: v for k, v in FIELDS[COMPLETION].items() if k not in ("prompt", "logprobs", "echo", "best_of",
                                                                        "suffix")}
FIELDS[CHAT] |= {"messages": {"list-obj"}, "max_completion_tokens": {"int", "null"}, "logprobs": {"bool", "null"},
                 "top_logprobs": {"int", "null"}, "tools": {"list-obj", "list-str", "list-int", "null"},
                 "response_format": {"object", "null"}}
VALUES = {"bool": st.booleans(), "int": st.integers(-3, 3), "float": st.sampled_from([0.5, 1.5, -2.5]),
          "str": st.sampled_from(["", "1", "x", "true"]), "null": st.none(), "object": st.just({}),
          "list-str": st.just(["x"]), "list-int": st.just([1]), "list-obj": st.just([{"x": 1}])}


@settings(max_examples=150, **SETTINGS)
@given(st.sampled_from([COMPLETION, CHAT]).flatmap(lambda path: st.tuples(
    st.just(path), st.sampled_from(sorted(FIELDS[path])), st.sampled_from(sorted(KINDS)))).flatmap(
    lambda t: st.tuples(st.just(t[0]), st.just(t[1]), st.just(t[2]), VALUES[t[2]])))
def test_property_a_wrong_json_type_for_any_field_is_a_400_naming_it(http, drawn):
    path, field, kind, value = drawn
    r = http.post(path, json=base(path) | {field: value})
    assert r.status_code < 500, r.text
    if kind not in FIELDS[path][field]:
        assert r.status_code == 400, (field, value, r.text)
        err = error_of(r)
        assert err["param"] == field and err["message"].startswith(field), (field, value, err)
