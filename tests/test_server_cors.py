"""CORS (`llamas serve --cors-origin`): browser pages of the allowed origins can call the API,
preflights are answered before the API key is checked, and without the option nothing changes."""
import json
import os

import httpx
import pytest

import llamas
from llamas._C import LlamasError
from llamas.server import create_app

TINY = os.path.join(os.path.dirname(__file__), "fixtures", "gpt2-tiny")
ORIGIN = "http://localhost:3000"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


@pytest.fixture(scope="module")
def model():
    return llamas.load(TINY)


@pytest.fixture(scope="module")
def cors(model):
    from test_server import ThreadServer
    with ThreadServer(create_app(model, api_key="k", cors_origins=[ORIGIN])) as s:
        yield s


def test_preflight_is_answered_without_the_key(cors):
    r = httpx.options(cors.url + "/v1/completions", headers=PREFLIGHT)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.options(cors.url + "/v1/completions", headers={**PREFLIGHT, "Origin": "http://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


def test_responses_carry_the_origin_streamed_or_not(cors):
    headers = {"Origin": ORIGIN, "Authorization": "Bearer k"}
    body = {"prompt": "When shall we", "max_tokens": 4, "temperature": 0}
    r = httpx.post(cors.url + "/v1/completions", json=body, headers=headers)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    with httpx.stream("POST", cors.url + "/v1/completions", json={**body, "stream": True}, headers=headers) as s:
        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in s.iter_lines()
                       if line.startswith("data: {"))
        assert s.headers["access-control-allow-origin"] == ORIGIN
    assert text == r.json()["choices"][0]["text"]
    r = httpx.post(cors.url + "/v1/completions", json=body, headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN  # the page sees why
    assert httpx.get(cors.url + "/tokenizer_info").status_code == 401
    assert httpx.get(cors.url + "/tokenizer_info", headers=headers).status_code == 200


def test_without_the_option_no_cors_headers(model):
    from test_server import ThreadServer
    with ThreadServer(create_app(model)) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers={"Origin": ORIGIN})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert httpx.options(s.url + "/v1/completions", headers=PREFLIGHT).status_code == 405


@pytest.mark.parametrize("bad", ["http://x", [""], [3]])
def test_bad_cors_origins_are_refused(model, bad):
    with pytest.raises(LlamasError, match="cors_origins"):
        create_app(model, cors_origins=bad)
