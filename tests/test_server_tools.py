"""Tool calls on /v1/chat/completions: tools with tool_choice "required" or a named function are
answered with tool_calls whose arguments are instances of the function's parameters schema
(structured output), streamed or not, through the official openai client and raw HTTP; "auto" and
bad tool definitions are refused with 400."""
import json
import os

import jsonschema
import pytest

import llamas

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "pattern": "[A-Z]{3}"}},
                                       "required": ["zone"]}}}
NOARGS = {"type": "function", "function": {"name": "ping"}}
TOOLS = [WEATHER, TIME, NOARGS]
PARAMS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "maxProperties": 0}) for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


TINY = os.path.join(os.path.dirname(__file__), "fixtures", "gpt2-tiny")
# The tiny model's context is 128 tokens, too few for the plain template's line of tool JSON: this
# template says only how many tools there are (and shows that the template gets them).
TEMPLATE = ("{% if tools %}tools: {{ tools | length }}\n{% endif %}"
            "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")


@pytest.fixture(scope="module")
def http():
    pytest.importorskip("uvicorn")
    from test_server import served_client
    with served_client(llamas.load(TINY), max_batch=16, chat_template=TEMPLATE) as c:
        yield c


@pytest.fixture(scope="module")
def client(http):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=str(http.base_url).rstrip("/") + "/v1", api_key="none", max_retries=0)


def check_calls(calls, allowed=None):
    assert calls
    for call in calls:
        name = call.function.name if hasattr(call, "function") else call["function"]["name"]
        args = call.function.arguments if hasattr(call, "function") else call["function"]["arguments"]
        assert allowed is None or name in allowed
        jsonschema.validate(json.loads(args), PARAMS[name])
        cid = call.id if hasattr(call, "id") else call["id"]
        assert cid.startswith("call_")


def test_required_answers_with_tool_calls(client):
    model = client.models.list().data[0].id
    seen = set()
    for seed in range(6):
        out = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                             max_tokens=90, seed=seed, temperature=1.0, n=2)
        for choice in out.choices:
            if choice.finish_reason == "length":  # cut short: the text as it came
                assert choice.message.tool_calls is None and choice.message.content
                continue
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            check_calls(choice.message.tool_calls)
            seen.update(c.function.name for c in choice.message.tool_calls)
    assert seen  # some call was completed


def test_named_function_and_single_call(client):
    model = client.models.list().data[0].id
    for seed in range(3):
        out = client.chat.completions.create(
            model=model, messages=MESSAGES, tools=TOOLS, max_tokens=80, seed=seed,
            tool_choice={"type": "function", "function": {"name": "get_time"}})
        choice = out.choices[0]
        if choice.finish_reason == "length":
            continue
        assert choice.finish_reason == "stop"  # as OpenAI answers a forced function
        assert len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls, {"get_time"})
        out = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=False, max_tokens=90, seed=seed)
        if out.choices[0].finish_reason == "tool_calls":
            assert len(out.choices[0].message.tool_calls) == 1


def test_required_resolves_each_tools_local_refs(http):
    # pydantic writes nested models as "$defs" with "#/$defs/..." references, relative to the
    # function's own parameters schema, not to the array of calls "required" wraps them in.
    point = {"type": "function", "function": {"name": "move", "parameters": {
        "type": "object", "properties": {"to": {"$ref": "#/$defs/Point"}}, "required": ["to"],
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                             "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "additionalProperties": False}}}
    body = {"messages": MESSAGES, "tools": [point, WEATHER], "tool_choice": "required", "max_tokens": 90,
            "temperature": 1.0}
    done = 0
    for seed in range(4):
        r = http.post("/v1/chat/completions", json={**body, "seed": seed})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if choice["finish_reason"] != "tool_calls":
            continue
        done += 1
        for call in choice["message"]["tool_calls"]:
            schema = point["function"]["parameters"] if call["function"]["name"] == "move" else PARAMS["get_weather"]
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    assert done


def test_a_schema_of_any_value_still_gets_object_arguments(http):
    anything = {"type": "function", "function": {"name": "f", "parameters": {}}}
    for seed in range(3):
        r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": [anything], "max_tokens": 60,
                                                    "tool_choice": {"type": "function", "function": {"name": "f"}},
                                                    "temperature": 1.0, "seed": seed})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]), dict)


def test_streamed_tool_calls_equal_the_whole_reply(client, http):
    model = client.models.list().data[0].id
    for seed in range(3):
        kwargs = dict(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=90, seed=seed)
        whole = client.chat.completions.create(**kwargs).choices[0]
        deltas, reason = [], None
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for c in chunk.choices:
                deltas.extend(c.delta.tool_calls or [])
                reason = c.finish_reason or reason
        assert reason == whole.finish_reason
        if whole.finish_reason == "tool_calls":
            assert [(d.function.name, d.function.arguments) for d in deltas] == \
                [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_none_generates_text_and_the_template_sees_the_tools(client, tiny_http):
    model = client.models.list().data[0].id
    out = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                         max_tokens=5, seed=1)
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason in ("stop", "length")
    without = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, seed=1).usage.prompt_tokens
    assert out.usage.prompt_tokens > without  # "tools: 3"
    # the plain template (a server without one) writes the tools as a first line of JSON
    body = {"messages": MESSAGES, "max_tokens": 2, "tools": [NOARGS], "tool_choice": "none"}
    with_tools = tiny_http.post("/v1/chat/completions", json=body).json()["usage"]["prompt_tokens"]
    plain = tiny_http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}).json()
    assert with_tools > plain["usage"]["prompt_tokens"]
    # a conversation that carries an earlier call and its result
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    out = client.chat.completions.create(model=model, messages=history, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert out.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("extra, message", [
    ({"tools": TOOLS}, "\"auto\" (the default with tools) needs a model"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "\"auto\""),
    ({"tool_choice": "required"}, "'tool_choice' needs 'tools'"),
    ({"tools": [], "tool_choice": "required"}, "'tools' must be a non-empty array"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"},
     "'tools[0].function.name' must be 1-64 letters"),
    ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "'tools[0].type' must be \"function\""),
    ({"tools": [NOARGS, NOARGS], "tool_choice": "required"}, "names a function twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "number", "multipleOf": 2}}}}}],
      "tool_choice": "required"}, "'tools[0].function.parameters': at #/properties/n: 'multipleOf' is not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
      "tool_choice": "required"}, "'tools[0].function.parameters' must describe a JSON object"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "names no function"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "'tool_choice' must be"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"tools": TOOLS, "tool_choice": "required", "logprobs": True}, "'logprobs' cannot be combined"),
    ({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": "yes"}, "'parallel_tool_calls'"),
])
def test_bad_tool_requests(http, extra, message):
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, **extra})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    bad_history = [{"role": "user", "content": "x", "tool_calls": []}]
    r = http.post("/v1/chat/completions", json={"messages": bad_history, "max_tokens": 4})
    assert r.status_code == 400 and "only for assistant messages" in r.json()["error"]["message"]
    assert http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}).status_code == 200


def test_structured_requests_are_counted(http):
    def count(kind):
        for line in http.get("/metrics").text.splitlines():
            if line.startswith(f'llamas_structured_output_requests_total{{kind="{kind}"}}'):
                return float(line.split()[-1])
        return 0.0
    before = {k: count(k) for k in ("tool_call", "regex", "json_object")}
    http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 8, "tools": TOOLS,
                                            "tool_choice": "required"})
    http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 8, "guided_regex": "a+"})
    http.post("/v1/completions", json={"prompt": "x", "max_tokens": 8, "response_format": {"type": "json_object"}})
    http.post("/v1/completions", json={"prompt": "x", "max_tokens": 8})
    assert {k: count(k) - before[k] for k in before} == {"tool_call": 1, "regex": 1, "json_object": 1}


def test_what_agent_loops_send_back_is_accepted(client, http):
    # An assistant reply fed back as message.model_dump() (with annotations, audio and function_call
    # null), tool results, text parts with other servers' hints, OpenAI's own fields that ask
    # nothing of this server, and a whole toolset with a keyword this server cannot hold a call to.
    model = client.models.list().data[0].id
    ping = {"type": "function", "function": {"name": "ping"}}
    r = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice=ping,
                                       max_tokens=60, temperature=0)
    reply = r.choices[0].message.model_dump()
    assert reply["tool_calls"], r
    assert {"annotations", "audio", "function_call"} <= set(reply)
    unsupported = {"type": "function", "function": {"name": "tag", "parameters": {
        "type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}}}}
    history = MESSAGES + [reply] + [{"role": "tool", "tool_call_id": c["id"], "content": "sunny"}
                                    for c in reply["tool_calls"]]
    history += [{"role": "user", "content": [{"type": "text", "text": "And now?", "cache_control": {"type": "x"}}]}]
    out = client.chat.completions.create(
        model=model, messages=history, tools=TOOLS + [unsupported], tool_choice="none", max_tokens=4,
        max_completion_tokens=3, seed=-1, reasoning_effort="low", verbosity="low", prompt_cache_key="k",
        safety_identifier="u1", stream=False, extra_body={"modalities": ["text"]})
    assert out.usage.completion_tokens <= 3  # max_completion_tokens wins over max_tokens
    named = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS + [unsupported],
                                           tool_choice=ping, max_tokens=40, temperature=0)
    check_calls(named.choices[0].message.tool_calls, {"ping"})
    with client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3, stream=True,
                                        stream_options={"include_usage": True, "include_obfuscation": False}) as s:
        assert [c for c in s][-1].usage.completion_tokens <= 3
    # asking for what is not here is refused by name; the unsupported keyword, when it is called
    for extra, message in (({"tools": TOOLS + [unsupported], "tool_choice": "required"}, "uniqueItems"),
                           ({"audio": {"voice": "alloy", "format": "wav"}}, "audio output"),
                           ({"web_search_options": {}}, "web search"),
                           ({"functions": [{"name": "f"}]}, "deprecated: send 'tools'"),
                           ({"modalities": ["text", "audio"]}, "'modalities' can only be"),
                           ({"messages": [dict(reply, function_call={"name": "f", "arguments": "{}"})]},
                            "messages[0].function_call"),
                           ({"messages": [{"role": "user", "content": "hi", "contnet": "x"}]},
                            "Unrecognized request argument supplied: messages[0].contnet")):
        body = dict({"messages": MESSAGES, "max_tokens": 2}, **extra)
        res = http.post("/v1/chat/completions", json=body)
        assert res.status_code == 400 and message in res.json()["error"]["message"], (extra, res.text)


def test_a_jinja_template_gets_earlier_calls_arguments_as_objects():
    from llamas.server_chat import ChatTemplate
    template = ChatTemplate("{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.arguments | tojson }}"
                            "{% endfor %}{% endfor %}")
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "ping", "arguments": "not json"}}]
    assert template.render([{"role": "assistant", "content": "", "tool_calls": calls}], add_generation_prompt=False) \
        == '{"city": "Paris"}"not json"'
