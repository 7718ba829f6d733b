"""Tools: scripted solvers that see only pixels + question, fuzzing, the time limit, contracts."""
import json
import math
import random
import re
import threading
import time

import numpy as np
import pytest
from PIL import Image

import tasks
import tools
from tools import call_tool

N = 500  # examples per task for the solver rates (the bar)

# -----------------------------------------------------------------------------
# scripted solvers: images + question + call_tool only; meta is used only to grade them


def point(images, description):
    r = call_tool("Point", {"image": "img_1", "description": description}, images)
    assert r.status == "success", r.error
    return r.data["points"]


def detect_grid(images):
    elf, gift, holes = (point(images, d) for d in ("elf", "gift", "holes"))
    return elf[0], gift[0], holes


def nav_rates(examples):
    ok = 0
    for ex in examples:
        elf, gift, holes = detect_grid(ex["images"])
        r = call_tool("AStar", {"start": elf, "goal": gift, "obstacles": holes,
                                "grid_size": ex["images"][0].width // 64}, ex["images"])
        ok += r.status == "success" and tasks.score(ex, r.data["path"]) == 1
    return {"vsp_nav accuracy": ok / len(examples)}


def verify_rates(examples):
    ok = 0
    for ex in examples:
        elf, gift, holes = detect_grid(ex["images"])
        moves = re.search(r"\b[LRUD](?:,[LRUD])*\b", ex["question"]).group(0)
        seen = {"grid": ex["images"][0].width // 64, "start": [v // 64 for v in elf],
                "goal": [v // 64 for v in gift], "holes": [[v // 64 for v in h] for h in holes]}
        answer = "Yes" if tasks.replay(seen, tools.parse_moves(moves), off_grid="fail") else "No"
        ok += tasks.score(ex, answer) == 1
    return {"vsp_verify accuracy": ok / len(examples)}


def jigsaw_rates(examples):
    found = rebuilt = 0
    for ex in examples:
        boxes = call_tool("DetectBlackArea", {"image": "img_1"}, ex["images"]).data["bounding_boxes"]
        hole = ex["meta"]["hole"]
        found += len(boxes) == 1 and max(abs(a - b) for a, b in zip(boxes[0], hole)) <= 2
        k = "ABC".index(ex["answer"]) + 1
        r = call_tool("InsertImage", {"base_image": "img_1", "image_to_insert": f"img_{k + 1}",
                                      "coordinates": boxes[0] if boxes else hole}, ex["images"])
        original = np.asarray(ex["images"][0]).astype(int)  # the window before it was blacked out
        original[hole[1]:hole[3], hole[0]:hole[2]] = np.asarray(ex["images"][k])
        rebuilt += r.status == "success" and bool(np.abs(np.asarray(r.image).astype(int) - original).mean() < 2)
    return {"jigsaw DetectBlackArea box within 2 px": found / len(examples),
            "jigsaw InsertImage reproduces the window": rebuilt / len(examples)}


def vstar_rates(examples):
    ok = 0
    for ex in examples:
        pts = point(ex["images"], ex["question"].split("\n")[0])  # the sentence before the options
        targets = ex["meta"]["targets"]
        ok += len(pts) == len(targets) and all(
            min(math.hypot(p[0] - t[0], p[1] - t[1]) for p in pts) <= 4 for t in targets)
    return {"vstar Point within 4 px": ok / len(examples)}


def read_field(detections, question):
    labels = [d for d in detections if d["text"].endswith(":") and d["text"][:-1] in question]
    if not labels:
        return None
    label = max(labels, key=lambda d: len(d["text"]))  # 'Due Date' over 'Date'
    cy = (label["bbox"][1] + label["bbox"][3]) / 2
    right = [d for d in detections if d["bbox"][0] > label["bbox"][2] and d["bbox"][1] - 4 <= cy <= d["bbox"][3] + 4]
    return min(right, key=lambda d: d["bbox"][0])["text"] if right else None


def guiqa_rates(examples):
    ok = 0
    for ex in examples:
        dets = call_tool("OCR", {"image": "img_1"}, ex["images"]).data["detections"]
        ok += tasks.score(ex, read_field(dets, ex["question"])) == 1
    return {"guiqa OCR exact value": ok / len(examples)}


@pytest.mark.parametrize("task,solver,bar", [
    ("vsp_nav", nav_rates, 0.99), ("vsp_verify", verify_rates, 0.99), ("jigsaw", jigsaw_rates, 0.99),
    ("vstar", vstar_rates, 0.98), ("guiqa", guiqa_rates, 0.98)])
def test_tools_solve_tasks_from_pixels(task, solver, bar):
    rates = solver(tasks.generate(task, N, split="test"))
    for name, rate in rates.items():
        print(f"{name}: {rate:.3f} on {N} test examples")
    assert all(rate >= bar for rate in rates.values()), rates

# -----------------------------------------------------------------------------
# fuzzing: malformed calls never raise, always explain, never run past the limit


@pytest.fixture(scope="module")
def images():
    grid = tasks.generate("vsp_nav", 1, sizes=(3,))[0]["images"]
    jig = tasks.generate("jigsaw", 1)[0]["images"]
    return grid + jig  # img_1 a 192x192 grid, img_2 the 224x224 window, img_3.. pieces


VALID = {
    "Point": {"image": "img_1", "description": "holes"},
    "Draw2DPath": {"image": "img_1", "start_point": [32, 32], "directions": "R,D", "step": 64, "line_color": "blue"},
    "AStar": {"start": [32, 32], "goal": [160, 160], "obstacles": [[96, 96]], "cell_size": 64, "grid_size": [3, 3]},
    "DetectBlackArea": {"image": "img_2", "threshold": 10, "min_area": 100},
    "InsertImage": {"base_image": "img_2", "image_to_insert": "img_3", "coordinates": [0, 0, 112, 112]},
    "Crop": {"image": "img_1", "coordinates": [0, 0, 64, 64]},
    "OCR": {"image": "img_1"},
}
BAD = [None, True, -5, -1.5, 1e12, float("nan"), float("inf"), "img_99", "img_0", "", "x" * 5000,
       [float("nan"), 1], [1e12] * 4, [-1, -1], [1, 2, 3, 4, 5], {"a": 1}, "[0, 0, 900, 20]",
       [[1, 2, 3]], [10, 10, 5, 5], "[1, 2"]


def malformed(rng):
    """One malformed call: an unknown tool, a missing, extra or broken argument, or no dict at all."""
    name = rng.choice(list(VALID))
    params = dict(VALID[name])
    kind = rng.randrange(6)
    if kind == 0:
        return rng.choice(["Foo", "", "point", "A*", "x" * 3000, None, 7]), params
    if kind == 1:
        required = tools.TOOLS[name][0]["function"]["parameters"]["required"]
        del params[rng.choice(required)]
    elif kind == 2:
        params[rng.choice(["foo", "img", "box", "x" * 300])] = rng.choice(BAD)
    elif kind == 3:
        params[rng.choice(list(params))] = rng.choice(BAD)
    elif kind == 4:
        return name, rng.choice(["not json", "[1, 2]", "null", "", [1, 2], None, 42, json.dumps(params)[:-1]])
    else:  # boxes outside the image, as a list or as a string
        name = rng.choice(["Crop", "InsertImage"])
        params = dict(VALID[name])
        box = [rng.randint(0, 300), rng.randint(0, 300), rng.randint(300, 5000), rng.randint(0, 5000)]
        params["coordinates"] = box if rng.random() < 0.5 else str(box)
    return name, params


def test_fuzz_malformed_calls(images):
    rng = random.Random(0)
    for i in range(2000):
        name, params = malformed(rng)
        r = call_tool(name, params, images, timeout=2.0)
        assert r.status == "error", (i, name, params, r)
        assert r.error and re.search(r"'[^']+'", r.error), (name, params, r.error)
        # validation caught it: not a tool that crashed on the arguments, nor one that ran to its time limit
        assert "failed on these arguments" not in r.error and "timed out" not in r.error, (name, params, r.error)


def test_valid_calls_succeed(images):
    for name, params in VALID.items():
        r = call_tool(name, params, images)
        assert r.status == "success", (name, r.error)
        assert json.loads(tools.observation(name, r, "img_9").split("\n")[0])["status"] == "success"


def test_error_messages_say_what_to_fix(images):
    r = call_tool("Crop", {"image": "img_2", "coordinates": [0, 0, 900, 20]}, images)
    assert r.error == ("argument 'coordinates' must be [x1, y1, x2, y2] with x1 < x2, y1 < y2 inside img_2 (224x224); "
                       "got [0, 0, 900, 20]")
    assert call_tool("Foo", {}, images).error.startswith("unknown tool 'Foo'; available: 'Point', 'Draw2DPath'")
    assert "missing argument 'description'" in call_tool("Point", {"image": "img_1"}, images).error
    assert "argument 'image'" in call_tool("OCR", {"image": "img_7"}, images).error


def test_time_limit_on_a_hanging_tool(monkeypatch, images):
    schema = tools._schema("Hang", "never returns", {}, [])
    release = threading.Event()  # the hung thread ends with the test, not 30 s later in a test that needs its slot
    monkeypatch.setitem(tools.TOOLS, "Hang", (schema, lambda args, imgs: release.wait(30)))
    try:
        # the exact message proves the call returned while the tool was still blocked (waiting for it would give
        # "returned no result")
        r = call_tool("Hang", {}, images, timeout=0.3)
        assert r.status == "error" and r.error == "tool 'Hang' timed out after 0.3 s"
    finally:
        release.set()

# -----------------------------------------------------------------------------
# contracts of individual tools


def test_schemas_follow_the_protocol():
    s = tools.schemas()
    assert [x["function"]["name"] for x in s] == ["Point", "Draw2DPath", "AStar", "DetectBlackArea", "InsertImage",
                                                  "Crop", "OCR"]
    params = {x["function"]["name"]: list(x["function"]["parameters"]["properties"]) for x in s}
    assert params["AStar"] == ["start", "goal", "obstacles", "cell_size", "grid_size"]
    assert params["InsertImage"] == ["base_image", "image_to_insert", "coordinates"]
    for x in s:
        assert x["type"] == "function" and x["function"]["parameters"]["type"] == "object"
        assert set(x["function"]["parameters"]["required"]) <= set(x["function"]["parameters"]["properties"])
    s[0]["function"]["name"] = "changed"  # deep copies: the registry is untouched
    assert tools.schemas(["Point"])[0]["function"]["name"] == "Point"


def test_observation_text():
    r = tools.ToolResult("success", {"points": [[1, 2]]}, image=Image.new("RGB", (4, 4)))
    assert tools.observation("Point", r, "img_3") == ('{"name": "Point", "status": "success", "points": [[1, 2]]}\n'
                                                      'New image generated and saved as: img_3')
    e = tools.ToolResult("error", error="argument 'image' is wrong")
    assert tools.observation("Crop", e) == '{"name": "Crop", "status": "error", "error": "argument \'image\' is wrong"}'


def test_astar_grid_size_unreachable_and_empty_path():
    args = {"start": [10, 10], "goal": [150, 10], "obstacles": [[80, 10]]}
    assert call_tool("AStar", {**args, "grid_size": [3, 2]}, []).data["path"] == "D,R,R,U"
    r = call_tool("AStar", args, [])  # inferred 3x1 grid: the wall cannot be walked around
    assert r.status == "error" and "unreachable" in r.error
    assert call_tool("AStar", {"start": [5, 5], "goal": [6, 6], "obstacles": []}, []).data["path"] == ""
    assert call_tool("AStar", {**args, "grid_size": 3, "obstacles": "[[80, 10]]"}, []).data["path"] == "D,R,R,U"


def test_draw_crop_insert_return_new_images(images):
    before = images[0].tobytes()
    r = call_tool("Draw2DPath", {"image": "img_1", "start_point": "[32, 32]", "directions": "RRD"}, images)
    assert r.status == "success" and r.image.tobytes() != before and images[0].tobytes() == before
    c = call_tool("Crop", {"image": "img_1", "coordinates": "[10, 10, 30, 50]"}, images).image
    assert min(c.size) >= tools.CROP_MIN_SIDE and max(c.size) <= tools.MAX_SIDE
    wide = Image.new("RGB", (2000, 40))
    c = call_tool("Crop", {"image": "img_1", "coordinates": [0, 0, 2000, 10]}, [wide]).image
    assert max(c.size) <= tools.MAX_SIDE


def test_crop_of_a_point_is_the_square_around_it_clipped_to_the_image():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    half = tools.CROP_POINT_SIDE // 2
    for (x, y), box in [((200, 150), [200 - half, 150 - half, 200 + half, 150 + half]),
                        ((5, 290), [0, 290 - half, 5 + half, 300])]:
        r = call_tool("Crop", {"image": "img_1", "coordinates": [x, y]}, [img])
        want = call_tool("Crop", {"image": "img_1", "coordinates": box}, [img])
        assert r.data["box"] == box and r.image.tobytes() == want.image.tobytes()
    assert call_tool("Crop", {"image": "img_1", "coordinates": "[200, 150]"}, [img]).data["box"][0] == 200 - half
    r = call_tool("Crop", {"image": "img_1", "coordinates": [400, 10]}, [img])
    assert r.error == "argument 'coordinates' as a point [x, y] must lie inside img_1 (400x300); got [400, 10]"


def test_point_vocabulary_and_empty_results(images):
    blank = [Image.new("RGB", (128, 128), (230, 230, 230))]
    assert call_tool("Point", {"image": "img_1", "description": "the gift"}, blank).data == {"points": []}
    r = call_tool("Point", {"image": "img_1", "description": "a unicorn"}, blank)
    assert r.status == "error" and "'description'" in r.error
    assert point(images, "player") == point(images, "elf") and len(point(images, "present")) == 1


def test_ocr_reads_every_glyph_of_the_font():
    assert len({g.tobytes() for g in tools.FONT}) == len(tools.FONT)  # glyphs are distinct
    lines = [tools.FONT_CHARS[i:i + 24].strip() for i in range(0, len(tools.FONT_CHARS), 24)]
    lines += ["ji = !", "i:i"]  # lines whose glyphs have blank rows (drawn at scale 1, then 2)
    img = Image.new("RGB", (400, 40 * len(lines)), (250, 250, 250))
    for i, line in enumerate(lines):
        tools.draw_text(img, (8 + i, 8 + 40 * i), line, (0, 0, 0), scale=1 + i % 2)
    got = [d["text"] for d in call_tool("OCR", {"image": "img_1"}, [img]).data["detections"]]
    assert got == lines


def test_soak_hung_tools_time_out_and_threads_stay_bounded(monkeypatch):
    """Calls through the engine's tool path (rollout.run_tool from a pool of 8, as rollout() runs them). 10,000
    calls, 1% hanging twice the limit: none raises, every hang is a timeout observation, the rest succeed,
    live threads and resident memory stay bounded. Then hangs that never end (until released): still no
    exception and no more than MAX_TOOL_THREADS tool threads; once they end, the tools work again."""
    import gc
    import os
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import rollout

    schema, _ = tools.TOOLS["Point"]
    peak, release = [threading.active_count()], threading.Event()

    def point(params, images):  # a stand-in Point: instant, except the calls marked to hang
        peak[0] = max(peak[0], threading.active_count())
        if params["description"].startswith("hang"):
            time.sleep(0.4)
        if params["description"].startswith("stuck"):
            release.wait(30)
        return tools.ToolResult("success", data={"points": [[1, 2]]})

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def calls(n, every, how):
        def one(i):
            call = {"name": "Point",
                    "parameters": {"image": "img_1", "description": (how if i % every == 7 % every else "") + str(i)}}
            name, result, _ = rollout.run_tool(call, images, 0.2, ["Point"], None)
            return i, tools.observation(name, result)
        with ThreadPoolExecutor(max_workers=8) as pool:
            return dict(pool.map(one, range(n)))

    monkeypatch.setitem(tools.TOOLS, "Point", (schema, point))
    for _ in range(tools.MAX_TOOL_THREADS):  # tool threads that earlier tests left running end first
        assert tools.TOOL_SLOTS.acquire(timeout=30)
    for _ in range(tools.MAX_TOOL_THREADS):
        tools.TOOL_SLOTS.release()
    images = [Image.new("RGB", (32, 32))]
    base_threads, base_rss = threading.active_count(), rss_mb()
    bound = base_threads + 8 + tools.MAX_TOOL_THREADS  # the engine's pool plus the tool threads

    # a full garbage collection in a process that earlier tests filled can pause every thread past the 0.2 s limit;
    # what is tested here is the tool path, so the collector waits until the end
    gc.collect()
    gc.disable()
    try:
        out = calls(10_000, 100, "hang ")
    finally:
        gc.enable()
    hung = [i for i in out if i % 100 == 7]
    assert len(out) == 10_000 and len(hung) == 100
    assert all("timed out after 0.2 s" in out[i] and '"status": "error"' in out[i] for i in hung)
    bad = [out[i] for i in out if i % 100 != 7 and "\"status\": \"success\"" not in out[i]]
    assert not bad, (len(bad), bad[:3])
    assert peak[0] <= bound and rss_mb() - base_rss < 100

    out = calls(200, 4, "stuck ")  # 50 calls that would hold 50 threads forever
    assert all("timed out after 0.2 s" in out[i] for i in out if i % 4 == 7 % 4)
    assert peak[0] <= bound
    release.set()
    time.sleep(0.5)  # the stuck calls return: their threads end and give their slots back
    assert threading.active_count() <= base_threads + 1
    assert '"status": "success"' in calls(1, 100, "")[0]
