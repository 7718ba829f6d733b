import json
import os
import re
import subprocess

import pytest
from PIL import Image, ImageDraw

import adl
import evaluate
import rollout
import tasks
import tools
from rollout import Trajectory

EXTERNAL = re.compile(r"""(?:src|href|action|poster|data)\s*=\s*["']?\s*(?:https?:)?//"""
                      r"""|url\(\s*["']?\s*(?:https?:)?//|@import""",
                      re.I)


def example(i, level, answer="A"):
    img = Image.new("RGB", (224, 224), (40 * i, 120, 200))
    ImageDraw.Draw(img).rectangle([112, 0, 224, 112], fill=(0, 0, 0))
    return {"id": f"jig-{i}", "task": "jigsaw", "question": "Which piece fills the hole? A: img_2. B: img_3.",
            "images": [img, Image.new("RGB", (112, 112), (200, 50, 50)), Image.new("RGB", (112, 112), (50, 200, 50))],
            "answer": answer, "meta": {"level": level}}


def traj(ex, calls, answer, tokens, turns, reason="response", valid=True):
    """A trajectory as the engine would record it: one assistant turn per call, then the answer turn."""
    t = Trajectory(ex["id"], ex["task"], images=list(ex["images"]), finish_reason=reason, format_valid=valid,
                   answer=answer)
    t.token_ids = list(range(20 + tokens))
    t.loss_mask = [0] * 20 + [1] * tokens
    t.messages = [{"role": "system", "content": "You are a visual reasoning assistant."},
                  {"role": "user", "content": [{"type": "image", "image": f"img_{k + 1}"} for k in range(3)]
                   + [{"type": "text", "text": ex["question"]}]}]
    for name, status in calls:
        t.messages.append({"role": "assistant", "content": f'<think>try {name}</think><tool_call>{{"name": "{name}", '
                                                           '"parameters": {"image": "img_1"}}</tool_call>'})
        t.calls.append({"name": name, "params": {"image": "img_1"}, "status": status,
                        "error": None if status == "success" else "bad box", "seconds": 0.01})
        obs = [{"type": "text", "text": json.dumps({"name": name, "status": status})}]
        if status == "success" and name == "InsertImage":
            t.images.append(Image.new("RGB", (224, 224), (250, 200, 0)))
            obs.append({"type": "image", "image": f"img_{len(t.images)}"})
        t.messages.append({"role": "user", "content": obs})
    while len(t.assistant_turns) < turns:
        t.messages.append({"role": "assistant",
                           "content": f"<think>so</think><response>\\boxed{{{answer}}}</response>"})
    return t


def hand_built():
    exs = [example(0, 2), example(1, 2), example(2, 3), example(3, 3, answer="B")]
    trajs = [traj(exs[0], [("DetectBlackArea", "success"), ("InsertImage", "success")], "A", 10, 3),
             traj(exs[1], [("InsertImage", "error")], "B", 6, 2),
             traj(exs[2], [], None, 4, 1, reason="max_new_tokens", valid=False),
             traj(exs[3], [("Crop", "success")], "B", 8, 2)]
    return exs, trajs

# -----------------------------------------------------------------------------
# 1. metrics against a hand computation


def test_metrics_match_hand_computation():
    exs, trajs = hand_built()
    m = rollout.metrics(exs, trajs)
    assert m["n"] == 4
    assert m["accuracy"] == 0.5                    # trajectories 0 and 3 are right
    assert m["accuracy_ci"] == rollout.wilson(2, 4)
    assert m["cps"] == 1.0                         # 4 calls over 4 samples
    assert m["tool_success_rate"] == 0.75          # 3 of the 4 calls ran
    assert m["calls_per_sample_per_tool"] == {"Crop": 0.25, "DetectBlackArea": 0.25, "InsertImage": 0.5}
    assert m["tool_success_rate_per_tool"] == {"Crop": 1.0, "DetectBlackArea": 1.0, "InsertImage": 0.5}
    assert m["mean_turns"] == 2.0                  # (3 + 2 + 1 + 2) / 4
    assert m["mean_generated_tokens"] == 7.0       # (10 + 6 + 4 + 8) / 4
    assert m["format_valid_rate"] == 0.75
    assert m["answered_rate"] == 0.75
    assert m["finish_reasons"] == {"max_new_tokens": 1, "response": 3}
    lv2, lv3 = m["by_level"]["2"], m["by_level"]["3"]
    assert (lv2["n"], lv2["accuracy"], lv2["cps"], lv2["tool_success_rate"]) == (2, 0.5, 1.5, 2 / 3)
    assert (lv3["n"], lv3["accuracy"], lv3["cps"], lv3["tool_success_rate"]) == (2, 0.5, 0.5, 1.0)


def test_wilson_interval_by_hand():
    # p = 6/100: centre (0.06 + 1.96^2/200) / (1 + 1.96^2/100), half-width 1.96 sqrt(.06*.94/100 + 1.96^2/40000) / same
    lo, hi = rollout.wilson(6, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.0278, 0.1248)
    assert rollout.wilson(0, 20)[0] == 0.0 and round(rollout.wilson(0, 20)[1], 4) == 0.1611
    assert rollout.wilson(20, 20)[1] == pytest.approx(1.0) and rollout.wilson(0, 0) == [0.0, 1.0]


def test_model_without_tool_calls_is_not_applicable():
    exs, _ = hand_built()
    trajs = [traj(ex, [], ex["answer"], 5, 1) for ex in exs]
    m = rollout.metrics(exs, trajs)
    assert m["cps"] == 0 and m["calls_per_sample_per_tool"] == {}
    assert m["tool_success_rate"] is None and evaluate.fmt(m["tool_success_rate"], True) == "n/a"
    assert m["accuracy"] == 1.0
    table = evaluate.markdown_table({"direct": {"jigsaw": m}}, ["jigsaw"])
    assert "| direct | 100.0 / 0.00 | 100.0 / 0.00 |" in table


def test_model_specs_tool_modes_and_adl_plans():
    models = evaluate.parse_models("tc=runs/tc/model,runs/tg/model,direct=runs/d/model:none,x=m:Point+AStar,tiny",
                                   "all")
    assert models == [("tc", "runs/tc/model", "all"), ("tg", "runs/tg/model", "all"),
                      ("direct", "runs/d/model", "none"),
                      ("x", "m", "Point+AStar"), ("tiny", "tiny", "all")]
    with pytest.raises(ValueError):
        evaluate.parse_models("a=x,a=y", "all")
    assert evaluate.tool_names("none") == [] and evaluate.tool_names("all") == list(evaluate.TOOLS)
    assert evaluate.tool_names("Point,Draw2DPath", ["AStar"]) == ["Point", "Draw2DPath", "AStar"]
    with pytest.raises(ValueError):
        evaluate.tool_names("Pointy")
    exs = tasks.generate("vsp_verify", 3)
    two = tools.schemas(["Point", "AStar"])
    assert adl.plan(exs, tools.schemas(["Point"]), "off", 0) is None and adl.plan(exs, [], "per-sample", 0) is None
    run = adl.plan(exs, two, "per-run", 0)
    assert len({json.dumps(m.to_json()) for _, m in run}) == 1
    per = adl.plan(exs, two, "per-sample", 0)
    assert len({json.dumps(m.to_json()) for _, m in per}) == 3
    again = adl.plan(exs, two, "per-sample", 0)
    assert [m.to_json() for _, m in per] == [m.to_json() for _, m in again]
    assert {s["function"]["name"] for s in per[0][0]} == set(per[0][1].names.values())


def test_curves_read_defensively(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0, "reward": 0.1, "accuracy": 0.0, "calls_per_sample_per_tool": {"Point": 1.0}}\n'
                   'not json\n'
                   '{"step": 1, "reward": null, "loss": 2.0}\n[1, 2]\n'
                   '{"step": 2, "reward": 0.5, "calls_per_sample_per_tool": {"Point": 2.0, "AStar": 0.5}}\n')
    runs = evaluate.read_curves(f"tg={log},gone={tmp_path / 'missing.jsonl'}")
    assert list(runs) == ["tg"] and len(runs["tg"]) == 3
    charts = dict(evaluate.curve_charts(runs))
    assert charts["reward"] == {"tg": [(0, 0.1), (2, 0.5)]}
    assert charts["loss"] == {"tg": [(1, 2.0)]}
    assert charts["calls per sample per tool: tg"] == {"Point": [(0, 1.0), (2, 2.0)], "AStar": [(0, 0), (2, 0.5)]}
    # rollout.metrics' keys, as grpo.py logs them: tool_success_rate is None before any call
    grpo = tmp_path / "grpo.jsonl"
    grpo.write_text('{"step": 0, "reward": 0.0, "cps": 0, "calls_per_sample_per_tool": {}, "tool_success_rate": null, '
                    '"format_valid_rate": 0.5}\n{"step": 1, "reward": 0.4, "cps": 1.5, "calls_per_sample_per_tool": '
                    '{"Point": 1.5}, "tool_success_rate": 0.9}\n')
    charts = dict(evaluate.curve_charts(evaluate.read_curves(f"g={grpo}")))
    assert charts["tool_success_rate"] == {"g": [(1, 0.9)]} and charts["format_valid_rate"] == {"g": [(0, 0.5)]}
    assert charts["calls per sample per tool: g"] == {"Point": [(0, 0), (1, 1.5)]}

# -----------------------------------------------------------------------------
# 2. end to end on the tiny default


def check_self_contained(page):
    assert not EXTERNAL.search(page), EXTERNAL.search(page)
    assert "http://" not in page and "https://" not in page


def test_quick_end_to_end(scratch_dir, tmp_path):
    out = str(tmp_path / "eval")
    res = evaluate.main(["--quick", "--models", f"base={scratch_dir},direct={scratch_dir}:none",
                         "--tasks", "vsp_nav,jigsaw",
                         "--adl", "per-sample", "--device", "cpu", "--out", out])
    for f in ("results.json", "trajectories.jsonl", "report.html", "log.jsonl"):
        assert os.path.isfile(os.path.join(out, f))
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["tasks"] == ["vsp_nav", "jigsaw"] and saved["settings"]["adl"] == "per-sample"
    assert saved["command"].startswith("python ") and "--quick" in saved["command"]
    assert saved["models"]["base"]["path"] == scratch_dir and saved["models"]["direct"]["tools"] == []
    assert saved["models"]["base"]["tools"] == list(evaluate.TOOLS)
    assert saved["results"] == json.loads(json.dumps(res["results"]))
    for label in ("base", "direct"):
        for t in ("vsp_nav", "jigsaw"):
            r = saved["results"][label][t]
            assert r["n"] == 2 and 0 <= r["accuracy"] <= 1 and sum(r["finish_reasons"].values()) == 2
    assert saved["results"]["direct"]["jigsaw"]["cps"] == 0
    lines = [json.loads(line) for line in open(os.path.join(out, "trajectories.jsonl"))]
    assert len(lines) == 8
    for r in lines:
        assert {"model", "task", "messages", "calls", "answer", "score", "images"} <= set(r)
        assert all(os.path.isfile(os.path.join(out, p)) for p in r["images"])
        assert (r["adl_mapping"] is None) == (r["model"] == "direct")
    page = open(os.path.join(out, "report.html")).read()
    check_self_contained(page)
    assert "data:image/jpeg;base64," in page and "<svg" in page


def test_saved_dataset_tool_list_and_per_run_adl(scratch_dir, tmp_path):
    data = str(tmp_path / "data")
    tasks.save(tasks.generate("vsp_verify", 3, seed=7), data)
    out = str(tmp_path / "eval")
    res = evaluate.main(["--quick", "--models", f"b={scratch_dir}", "--data", data, "--tools", "Point",
                         "--add-tools", "AStar",
                         "--adl", "per-run", "--device", "cpu", "--out", out])
    assert res["tasks"] == ["vsp_verify"] and res["results"]["b"]["vsp_verify"]["n"] == 2  # --quick: 2 per task
    assert res["models"]["b"]["tools"] == ["Point", "AStar"]
    lines = [json.loads(line) for line in open(os.path.join(out, "trajectories.jsonl"))]
    assert [r["example_id"] for r in lines] == ["vsp_verify-test-7-0", "vsp_verify-test-7-1"]
    assert (lines[0]["adl_mapping"] == lines[1]["adl_mapping"]
            and set(lines[0]["adl_mapping"]["names"]) == {"Point", "AStar"})


def hand_report(out):
    exs, trajs = hand_built()
    none = [traj(ex, [], "A", 5, 1) for ex in exs]
    runs = {"tg": {"path": "runs/tg/model", "tool_mode": "all", "tools": list(evaluate.TOOLS), "examples": exs,
                   "trajectories": trajs, "seconds": 2.0},
            "direct": {"path": "runs/d/model", "tool_mode": "none", "tools": [], "examples": exs,
                       "trajectories": none, "seconds": 1.0}}
    log = os.path.join(out, "log_tg.jsonl")
    os.makedirs(out, exist_ok=True)
    with open(log, "w") as f:
        for s in range(12):
            f.write(json.dumps({"step": s, "reward": 0.2 + 0.05 * s, "accuracy": 0.04 * s,
                                "calls_per_sample_per_tool": {"DetectBlackArea": 1 + 0.1 * s,
                                                              "InsertImage": 2 - 0.1 * s}}) + "\n")
    settings = {**vars(evaluate.parser.parse_args([])), "command": "python evaluate.py (hand-built)", "device": "cpu"}
    evaluate.write_outputs(out, settings, runs, evaluate.read_curves(f"tg={log}"))
    return os.path.join(out, "report.html")


def test_hand_built_report_is_self_contained(tmp_path):
    page = open(hand_report(str(tmp_path))).read()
    check_self_contained(page)
    assert page.count("<svg") >= 4  # a bar chart and three curves
    assert "n/a" in page            # the direct model's tool success rate

# -----------------------------------------------------------------------------
# 3. the page in a real browser


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")
def test_report_screenshot(tmp_path):
    page = hand_report(str(tmp_path / "eval"))
    png = str(tmp_path / "shot.png")
    subprocess.run(["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1280,2000",
                    "file://" + os.path.abspath(page)], check=True, capture_output=True, timeout=120)
    with Image.open(png) as im:
        assert im.size == (1280, 2000)
        colours = im.convert("RGB").resize((64, 100)).getcolors(64 * 100)
    assert len(colours) > 20  # a rendered page, not a blank one
