import copy
import json
import random
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

import adl
import tools

SCHEMAS = tools.schemas()
PROPS = {s["function"]["name"]: list(s["function"]["parameters"]["properties"]) for s in SCHEMAS}
CANONICAL = set(PROPS) | {p for ps in PROPS.values() for p in ps}
TOOL_WORD = re.compile(r"\b(" + "|".join(adl.CANONICAL_TOOLS) + r")\b")


def dumps(x):
    return json.dumps(x, ensure_ascii=False)


def full_call(tool):
    return {"name": tool, "parameters": {p: f"value of {p}" for p in PROPS[tool]}}


# -----------------------------------------------------------------------------
# 1. round trip and names


def test_round_trip_over_1000_mappings():
    rng = random.Random(0)
    for _ in range(1000):
        new, m = adl.randomize(SCHEMAS, rng)
        fresh = list(m.names.values()) + [p for ps in m.params.values() for p in ps.values()]
        assert all(re.fullmatch(r"[a-z0-9]{6}", n) for n in fresh)
        assert len(set(fresh)) == len(fresh) and not set(fresh) & CANONICAL
        offered = {s["function"]["name"]: set(s["function"]["parameters"]["properties"]) for s in new}
        stored = adl.Mapping.from_json(json.loads(dumps(m.to_json())))
        for tool in PROPS:
            call = full_call(tool)
            randomized = m.from_canonical(call)
            assert set(randomized["parameters"]) == offered[randomized["name"]]
            assert stored.to_canonical(randomized) == call
        assert m.inverse().inverse() == m


@pytest.mark.parametrize("switch", ["names", "params", "descriptions"])
def test_each_switch_alone(switch):
    flags = {k: k == switch for k in ("names", "params", "descriptions")}
    new, m = adl.randomize(SCHEMAS, random.Random(1), **flags)
    for old, s in zip(SCHEMAS, new):
        tool, f = old["function"]["name"], s["function"]
        props = f["parameters"]["properties"]
        assert (f["name"] != tool) == flags["names"]
        assert (list(props) != PROPS[tool]) == flags["params"]
        if flags["params"]:  # a kept description quoting its own parameters ('cell_size') follows the rename
            assert not any(f"'{p}'" in dumps(s) for p in PROPS[tool])
        assert set(f["parameters"].get("required", [])) <= set(props)
        assert (f["description"] in adl.TOOL_POOL[tool]) == flags["descriptions"]
        for p, spec in zip(PROPS[tool], props.values()):
            assert (spec["description"] in adl.PARAM_POOL[tool][p]) == flags["descriptions"]
        assert m.to_canonical(m.from_canonical(full_call(tool))) == full_call(tool)


def test_malformed_calls_pass_through():
    _, m = adl.randomize(SCHEMAS, random.Random(2))
    ocr = m.names["OCR"]
    assert m.to_canonical({}) == {}
    assert m.to_canonical({"name": 3, "parameters": {"x": 1}}) == {"name": 3, "parameters": {"x": 1}}
    assert m.to_canonical({"name": ocr, "parameters": "img_1"}) == {"name": "OCR", "parameters": "img_1"}
    assert m.to_canonical({"name": ocr, "parameters": {"x": 1}}) == {"name": "OCR", "parameters": {"x": 1}}
    assert m.to_canonical({"name": "nosuch", "parameters": {"x": 1}}) == {"name": "nosuch", "parameters": {"x": 1}}


# -----------------------------------------------------------------------------
# 2. a whole TC record


def tc_record():
    def assistant(think, call=None, response=None):
        tail = f"<tool_call>{dumps(call)}</tool_call>" if call else f"<response>{response}</response>"
        return {"role": "assistant", "content": f"<think>{think}</think>{tail}"}

    def observation(obs, image=None):
        text = dumps(obs) + (f"\nNew image generated and saved as: {image}" if image else "")
        parts = [{"type": "text", "text": text}]
        return {"role": "user",
                "content": parts + ([{"type": "image", "image": f"images/r0_{image}.png"}] if image else [])}

    system = ("You are a visual reasoning assistant. You can call these tools:\n<tools>\n"
              + "\n".join(dumps(s) for s in SCHEMAS)
              + "\n</tools>\n\nThink inside <think>...</think>, then one tool call or a <response>.")
    crop = {"name": "Crop", "parameters": {"image": "img_1", "coordinates": [0, 0, 64, 64]}}
    return {
        "id": "vstar-0", "task": "vstar", "kind": "reflect", "tools": SCHEMAS, "adl_mapping": None, "answer": "B",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": [{"type": "image", "image": "images/r0_img_1.png"},
                                         {"type": "text", "text": "What colour is the small star? (A) red (B) blue"}]},
            assistant("The star is tiny. Point can find it; Crop then zooms. PointCloud is not a tool.",
                      {"name": "Point", "parameters": {"image": "img_1", "description": "star"}}),
            observation({"name": "Point", "status": "success", "points": [[40, 30]]}),
            assistant("Zoom around (40, 30) with Crop.",
                      {"name": "Crop", "parameters": {"image": "img_1", "coordinates": [20, 10, 900, 50]}}),
            observation({"name": "Crop", "status": "error",
                         "error": "argument 'coordinates' must lie inside 'img_1' (128x128); tool 'Crop' did not run"}),
            assistant("The box was too large; retry Crop with a smaller box.", crop),
            observation({"name": "Crop", "status": "success", "size": [256, 256]}, image="img_2"),
            {"role": "assistant",
             "content": '<think>Try OCR too.</think><tool_call>{"name": "OCR", "param</tool_call>'},
            observation({"name": "tool_call", "status": "error", "error": "the tool call is not valid JSON"}),
            assistant("No text needed, OCR failed anyway; the star is blue.", response="\\boxed{B}"),
        ],
    }


def test_apply_then_inverse_restores_the_record():
    record = tc_record()
    original = copy.deepcopy(record)
    _, m = adl.randomize(SCHEMAS, random.Random(3))
    randomized = adl.apply(record, m)
    assert record == original  # no mutation
    assert randomized["adl_mapping"] == m.to_json()
    assert adl.apply(randomized, m.inverse()) == original
    assert adl.apply(json.loads(dumps(randomized)),
                     adl.Mapping.from_json(randomized["adl_mapping"]).inverse()) == original

    # No canonical tool name survives anywhere the model looks.
    assert not TOOL_WORD.search(dumps(randomized["messages"])) and not TOOL_WORD.search(dumps(randomized["tools"]))
    assert "PointCloud" in randomized["messages"][2]["content"]  # whole words only
    system = randomized["messages"][0]["content"]
    assert all(dumps(s) in system.split("\n") for s in randomized["tools"])
    calls = [json.loads(c) for msg in randomized["messages"] if msg["role"] == "assistant"
             for c in re.findall(r"<tool_call>(.*?)</tool_call>", msg["content"]) if c.endswith("}")]
    assert [c["name"] for c in calls] == [m.names["Point"], m.names["Crop"], m.names["Crop"]]
    assert calls[2]["parameters"] == {m.params["Crop"]["image"]: "img_1",
                                      m.params["Crop"]["coordinates"]: [0, 0, 64, 64]}
    error = json.loads(randomized["messages"][5]["content"][0]["text"])
    assert error["name"] == m.names["Crop"]
    assert f"'{m.params['Crop']['coordinates']}'" in error["error"] and f"'{m.names['Crop']}'" in error["error"]
    assert "'img_1'" in error["error"]
    assert randomized["messages"][7]["content"][0]["text"].endswith("\nNew image generated and saved as: img_2")


def test_identity_mapping_round_trip():
    record = tc_record()
    _, m = adl.randomize(SCHEMAS, random.Random(4), names=False, params=False, descriptions=False)
    same = adl.apply(record, m)
    assert {**same, "adl_mapping": None} == record
    assert adl.apply(same, m.inverse()) == record


# -----------------------------------------------------------------------------
# 3. paraphrase pools

LEAK = re.compile(r"\b(" + "|".join(adl.CANONICAL_TOOLS) + r")\b", re.IGNORECASE)


def test_pools_cover_every_tool_and_parameter_without_naming_a_tool():
    assert set(adl.TOOL_POOL) == set(PROPS) == set(adl.PARAM_POOL)
    for tool, params in PROPS.items():
        assert set(adl.PARAM_POOL[tool]) == set(params)
        for pool in [adl.TOOL_POOL[tool]] + [adl.PARAM_POOL[tool][p] for p in params]:
            assert len(set(pool)) >= 8
            for text in pool:
                assert not LEAK.search(text) and "A*" not in text, text


# -----------------------------------------------------------------------------
# 4. randomized calls run the same tools


def test_randomized_calls_execute_like_canonical_ones():
    blank = Image.new("RGB", (128, 128), "white")
    holed = blank.copy()
    ImageDraw.Draw(holed).rectangle([32, 40, 79, 95], fill="black")
    cases = [
        ({"name": "Crop", "parameters": {"image": "img_1", "coordinates": [0, 0, 64, 64]}}, blank),
        ({"name": "Crop", "parameters": {"image": "img_1", "coordinates": [0, 0, 640, 64]}}, blank),
        ({"name": "OCR", "parameters": {"image": "img_1"}}, blank),
        ({"name": "Point", "parameters": {"image": "img_1", "description": "gift"}}, blank),
        ({"name": "DetectBlackArea", "parameters": {"image": "img_1"}}, holed),
    ]
    _, m = adl.randomize(SCHEMAS, random.Random(5))
    for call, image in cases:
        expected = tools.call_tool(call["name"], call["parameters"], [image])
        randomized = m.from_canonical(call)
        back = m.to_canonical(randomized)
        got = tools.call_tool(back["name"], back["parameters"], [image])
        assert (got.status, got.data, got.error) == (expected.status, expected.data, expected.error)
        assert (got.image is None) == (expected.image is None)
        if got.image is not None:
            assert np.array_equal(np.asarray(got.image), np.asarray(expected.image))
        seen = m.observation(tools.observation(back["name"], got, "img_2" if got.image is not None else None))
        obs = json.loads(seen.split("\n")[0])
        assert obs["name"] == randomized["name"] and not TOOL_WORD.search(seen)
        if got.status == "error" and "'coordinates'" in expected.error:
            assert f"'{m.params['Crop']['coordinates']}'" in obs["error"]

    # A name outside the randomized vocabulary stays unknown and the error says so in its own terms.
    back = m.to_canonical({"name": "zzz999", "parameters": {}})
    result = tools.call_tool(back["name"], back["parameters"], [blank])
    assert result.status == "error" and "zzz999" in m.observation(tools.observation("zzz999", result))
