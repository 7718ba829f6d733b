"""Tasks: generation, determinism, disjoint splits, scoring, answer extraction, format, save/load."""
import io
import json

import numpy as np
import pytest
from PIL import Image

import tasks


def png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # deterministic at any level; 1 is fast
    return buf.getvalue()


def pixels(img):
    return img.size, img.tobytes()


@pytest.mark.parametrize("task", tasks.TASKS)
def test_examples_have_the_contracted_shape(task):
    for i, ex in enumerate(tasks.generate(task, 6, split="train", seed=3)):
        assert ex["id"] == f"{task}-train-3-{i}" and ex["task"] == task
        assert isinstance(ex["question"], str) and isinstance(ex["answer"], str) and ex["answer"]
        assert ex["images"] and all(isinstance(im, Image.Image) and im.mode == "RGB" for im in ex["images"])
        assert "level" in ex["meta"]
        json.dumps(ex["meta"])  # meta is plain JSON


@pytest.mark.parametrize("task", tasks.TASKS)
def test_same_arguments_give_byte_identical_examples(task):
    a, b = tasks.generate(task, 4, "rl", 7), tasks.generate(task, 4, "rl", 7)
    assert [x["answer"] for x in a] == [x["answer"] for x in b]
    assert [x["question"] for x in a] == [x["question"] for x in b]
    assert [png(im) for x in a for im in x["images"]] == [png(im) for x in b for im in x["images"]]
    c = tasks.generate(task, 4, "rl", 8)
    assert [pixels(x["images"][0]) for x in a] != [pixels(x["images"][0]) for x in c]
    # a later slice of the stream (TC curation makes its examples 8 at a time) is that part of the whole
    d = tasks.generate(task, 2, "rl", 7, start=2)
    assert [x["id"] for x in d] == [x["id"] for x in a[2:]]
    assert [png(im) for x in d for im in x["images"]] == [png(im) for x in a[2:] for im in x["images"]]


@pytest.mark.parametrize("task", tasks.TASKS)
def test_splits_share_no_example(task):
    by_split = {s: tasks.generate(task, 20, s) for s in tasks.SPLITS}
    seen = {}
    for split, examples in by_split.items():
        for ex in examples:
            keys = [pixels(ex["images"][0])]
            if task.startswith("vsp"):  # grid layouts are few: the puzzle itself must not repeat
                m = ex["meta"]
                keys.append(json.dumps([m["grid"], m["start"], m["goal"], m["holes"]]))
            for k in keys:
                assert seen.setdefault(k, split) == split, f"{ex['id']} also in {seen[k]}"


def test_grid_tasks_geometry_and_balance():
    nav = tasks.generate("vsp_nav", 60, sizes=(3, 5, 8))
    for ex in nav:
        m = ex["meta"]
        assert ex["images"][0].size == (64 * m["grid"], 64 * m["grid"]) and m["grid"] in (3, 5, 8)
        assert tasks.score(ex, ex["answer"]) == 1
    assert {ex["meta"]["grid"] for ex in tasks.generate("vsp_nav", 60)} == set(range(3, 9))
    verify = tasks.generate("vsp_verify", 200)
    yes = sum(ex["answer"] == "Yes" for ex in verify) / len(verify)
    assert 0.4 <= yes <= 0.6, yes
    for ex in verify:
        assert ex["meta"]["moves"] in ex["question"]


def test_jigsaw_hole_is_the_only_black_and_pieces_fit():
    for ex in tasks.generate("jigsaw", 30):
        x1, y1, x2, y2 = ex["meta"]["hole"]
        a = np.asarray(ex["images"][0])
        black = (a.max(-1) == 0)
        assert black[y1:y2, x1:x2].all() and black.sum() == (x2 - x1) * (y2 - y1)
        assert len(ex["images"]) == 1 + ex["meta"]["level"] and ex["meta"]["level"] in (2, 3)
        assert all(im.size == (x2 - x1, y2 - y1) for im in ex["images"][1:])


def test_vstar_target_is_at_most_one_token_at_model_resolution():
    max_pixels = 224 * 224  # the tiny model's processor default; one vision token covers 28x28 px
    for ex in tasks.generate("vstar", 20):
        w, h = ex["images"][0].size
        scale = min(1.0, (max_pixels / (w * h)) ** 0.5)
        assert max(t[2] for t in ex["meta"]["targets"]) * scale <= 28
        assert "(A)" in ex["question"] and ex["answer"] in "ABCD"


def test_score_accepts_reasonable_forms_and_rejects_wrong_ones():
    nav = {"task": "vsp_nav", "answer": "R,R,D",
           "meta": {"grid": 3, "start": [0, 0], "goal": [2, 1], "holes": [[1, 1]]}}
    for good in ["R,R,D", "R, R, D", "RRD", "r,r,d", "right, right, down", " R R D ", "L,R,R,D", "U,R,R,D"]:
        assert tasks.score(nav, good) == 1.0, good      # off-grid moves (L, U at the corner) stay put
    for bad in ["R,D,R", "R,R", "", "R,R,D,D", "R,R,D,x", "hello", None]:
        assert tasks.score(nav, bad) == 0.0, bad       # into the hole, stops short, garbage
    verify = {"task": "vsp_verify", "answer": "No", "meta": {}}
    assert [tasks.score(verify, a) for a in ["No", "no", " NO.", "Yes", "N"]] == [1, 1, 1, 0, 0]
    jig = {"task": "jigsaw", "answer": "B", "meta": {"level": 3}}
    assert [tasks.score(jig, a) for a in ["B", "(B)", "b", "B.", " (b) ", "A", "C", "BB", None]] == [1] * 5 + [0] * 4
    vstar = {"task": "vstar", "answer": "C", "meta": {"options": ["red", "pink", "orange", "brown"]}}
    assert [tasks.score(vstar, a) for a in ["C", "(C)", "orange", "Orange", "red", "A"]] == [1, 1, 1, 1, 0, 0]
    gui = {"task": "guiqa", "answer": "Ana Lee", "meta": {}}
    assert [tasks.score(gui, a) for a in ["Ana Lee", "ana lee", "  Ana   Lee ", "Ana", "AnaLee"]] == [1, 1, 1, 0, 0]


def test_extract_answer():
    assert tasks.extract_answer("<think>x</think><response>so \\boxed{R,R,D}</response>") == "R,R,D"
    assert tasks.extract_answer("<response>\\boxed{A}</response> <response>\\boxed{B} or \\boxed{C}</response>") == "C"
    assert tasks.extract_answer("<response>\\boxed{\\text{a {b} c}}</response>") == "\\text{a {b} c}"
    assert tasks.extract_answer("<response>\\boxed{A} then \\boxed{B</response>") == "A"  # last *balanced*
    assert tasks.extract_answer("\\boxed{A}") is None
    assert tasks.extract_answer("<response>no box</response>") is None
    assert tasks.extract_answer(None) is None


def test_is_format_valid():
    call = '<think>look</think><tool_call>{"name": "Point", "parameters": {}}</tool_call>'
    resp = "<think>done</think>\n<response>\\boxed{A}</response>"
    assert tasks.is_format_valid([resp]) and tasks.is_format_valid([call, call, resp])
    assert not tasks.is_format_valid([])
    assert not tasks.is_format_valid([call])                                  # never answers
    assert not tasks.is_format_valid([resp, resp])                            # answers twice
    assert not tasks.is_format_valid(["<response>\\boxed{A}</response>"])     # no think
    assert not tasks.is_format_valid([call.replace("</tool_call>", "</tool_call>" + call[18:])])  # two calls
    assert not tasks.is_format_valid(["<think>a</think><think>b</think><response>x</response>"])
    assert not tasks.is_format_valid([call + "<response>x</response>"])


def test_save_and_load_round_trip(tmp_path):
    examples = [ex for t in tasks.TASKS for ex in tasks.generate(t, 2)]
    tasks.save(examples, tmp_path)
    back = tasks.load(tmp_path)
    assert [b["id"] for b in back] == [e["id"] for e in examples]
    # every field but the images equal, then as many images, pixel for pixel
    assert [{k: v for k, v in b.items() if k != "images"} for b in back] == \
        [{k: v for k, v in e.items() if k != "images"} for e in examples]
    assert [len(b["images"]) for b in back] == [len(e["images"]) for e in examples]
    assert all(pixels(a) == pixels(b) for e, l in zip(examples, back) for a, b in zip(e["images"], l["images"]))
    assert json.loads((tmp_path / "examples.jsonl").read_text().splitlines()[0])["images"][0].startswith("images/")
    lines = (tmp_path / "examples.jsonl").read_text().splitlines()
    for broken in ["{not json", json.dumps({"id": "x"}), lines[0].replace("images/", "nowhere/")]:
        (tmp_path / "examples.jsonl").write_text("\n".join([lines[0], broken] + lines[1:]) + "\n")
        with pytest.raises(ValueError, match=r"examples\.jsonl, line 2"):
            tasks.load(tmp_path)
