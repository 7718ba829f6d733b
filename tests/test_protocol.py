"""--protocol official: the authors' prompt, tool names, result fields, observations and nudge, over our tools."""
import ast
import json
import os
import subprocess
import sys

import pytest

import rollout
import tasks
import tiny
import tools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def policy():
    model, processor = rollout.load_policy("tiny", device="cpu")
    return model.eval(), processor


def forced(processor, turns):
    """A forcer that writes turns[k] as assistant turn k of every row, then <|im_end|>."""
    encoded = [processor.encode_text(t) for t in turns]

    def forcer(row, turn, toks):
        seq = encoded[min(turn, len(encoded) - 1)]
        return seq[len(toks)] if len(toks) < len(seq) else processor.im_end
    return forcer


def call(name, **params):
    return f'<think>t</think><tool_call>{json.dumps({"name": name, "parameters": params})}</tool_call>'


def observed(traj):
    """The observation turns as the model reads them (text parts of the user turns after the question)."""
    return ["".join(p["text"] for p in m["content"] if p["type"] == "text")
            for m in traj.messages[2:] if m["role"] == "user"]


def test_the_official_prompt_lists_tools_as_dict_reprs(policy):
    _, processor = policy
    ex = tasks.generate("vsp_nav", 1, split="test", seed=0)[0]
    t = rollout.rollout(*policy, [ex], tools=["Point", "AStar"], max_turns=1, max_new_tokens=2, temperature=0,
                        protocol=rollout.OFFICIAL)[0]
    prompt = t.messages[0]["content"]
    lines = prompt.split("you can use the following tools:  \n")[1].split("\n\nSteps for Each Turn")[0].split("\n")
    assert [ast.literal_eval(line)["function"]["name"] for line in lines] == ["Point", "AStarWithPixelCoordinate"]
    assert lines[0].startswith("{'type': 'function', 'function': {'name': 'Point'") and "<tools>" not in prompt
    assert processor.decode(t.token_ids).startswith("<|im_start|>system\n\nYou are a visual assistant capable")
    assert "grid_size" not in prompt and "inside \\boxed{}, and wrap the entire final output" in prompt


def test_official_calls_and_observations_on_a_maze(policy):
    _, processor = policy
    ex = tasks.generate("vsp_nav", 1, split="test", seed=3)[0]
    turns = [call("Point", image="img_1", description="elf"),
             call("AStarWithPixelCoordinate", start=[32, 32], goal=[96, 32], obstacles=[]),
             call("AStar", start=[32, 32], goal=[96, 32], obstacles=[]),  # our name is not the official one
             call("Draw2DPath", image="img_1", start_point=[1, 1], directions="rr", pixel_coordinate=False),
             call("Point", image="img_9", description="elf"),
             "<think>stuck</think>",  # neither call nor answer: the nudge, and the trajectory goes on
             "<think>done</think><response>\\boxed{R}</response>"]
    t = rollout.rollout(*policy, [ex], tools=["Point", "AStar", "Draw2DPath"], max_turns=10, max_new_tokens=200,
                        temperature=0, forcer=forced(processor, turns), protocol=rollout.OFFICIAL)[0]
    obs = observed(t)
    assert t.finish_reason == "response" and len(obs) == 6
    point = ast.literal_eval(obs[0].strip())  # a Python dict repr after a newline
    assert obs[0].startswith("\n{'tool_response_from': 'Point', 'status': 'success', 'points': [{'x': ")
    assert point["image_dimensions_pixels"] == {"width": ex["images"][0].width, "height": ex["images"][0].height}
    assert point["error_code"] == 0 and all(set(p) == {"x", "y"} for p in point["points"]) and point["points"]
    assert ast.literal_eval(obs[1].strip()) == {"tool_response_from": "AStarWithPixelCoordinate",
                                                "status": "success", "path": "R", "error_code": 0}
    assert "'status': 'failed'" in obs[2] and "AStar" in obs[2]
    drawn = obs[3].split("\nNew image generated and saved as: ")
    assert ast.literal_eval(drawn[0].strip())["message"] == "Path drawn successfully" and drawn[1] == "img_2\n"
    assert [p["type"] for p in t.messages[2:][2 * 3 + 1]["content"]] == ["text", "image"]
    failed = ast.literal_eval(obs[4].strip())
    assert failed["status"] == "failed" and failed["error_code"] == 201 and "img_9" in failed["message"]
    assert obs[5] == rollout.OFFICIAL.nudge == "\n Please continue with your response or call a tool.\n"
    assert "<|im_start|>user\n\n Please continue with your response or call a tool.\n<|im_end|>" in \
        processor.decode(t.token_ids)
    assert t.answer == "R" and not t.format_valid  # the nudged turn breaks the format, as the official gate says


def test_official_boxes_are_strings_and_ocr_detections_carry_pixel_boxes(policy):
    _, processor = policy
    jig = tasks.generate("jigsaw", 1, split="test", seed=0)[0]
    gui = tasks.generate("guiqa", 1, split="test", seed=0)[0]
    t1, t2 = rollout.rollout(*policy, [jig, gui], tools=None, max_turns=2, max_new_tokens=200, temperature=0,
                             protocol=rollout.OFFICIAL, forcer=lambda r, turn, toks: forced(processor, [
                                 [call("DetectBlackArea", image="img_1")], [call("OCR", image="img_1")]][r]
                                 + ["<response>\\boxed{A}</response>"])(r, turn, toks))
    boxes = ast.literal_eval(observed(t1)[0].strip())
    assert boxes["bounding_boxes"] and all(isinstance(b, str) and b.startswith("[") for b in boxes["bounding_boxes"])
    assert boxes["message"] == f"Found {len(boxes['bounding_boxes'])} black areas"
    x1, y1, x2, y2 = json.loads(boxes["bounding_boxes"][0])
    crop = tools.official_call("Crop", {"image": "img_1", "coordinates": boxes["bounding_boxes"][0]}, jig["images"])
    assert crop.status == "success" and crop.data["image_dimensions_pixels"]["width"] >= x2 - x1
    ocr = ast.literal_eval(observed(t2)[0].strip())
    d = ocr["detections"][0]
    assert set(d) == {"label", "confidence", "pixel_bbox"} and set(d["pixel_bbox"]) == {"x_min", "y_min", "x_max",
                                                                                          "y_max"}


def test_a_checkpoint_declares_its_protocol(tmp_path):
    assert rollout.protocol_of(None, "tiny") is rollout.OURS
    (tmp_path / "protocol.json").write_text('{"protocol": "official"}')
    assert rollout.protocol_of(None, str(tmp_path)) is rollout.OFFICIAL
    assert rollout.protocol_of("ours", str(tmp_path)) is rollout.OURS  # the flag wins
    (tmp_path / "protocol.json").write_text('{"protocol": "theirs"}')
    with pytest.raises(rollout.InputError, match="protocol.json: expected"):
        rollout.protocol_of(None, str(tmp_path))


def test_evaluate_official_quick_runs_every_task(tmp_path):
    proc = subprocess.run([sys.executable, "evaluate.py", "--protocol", "official", "--models", "tiny", "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(tmp_path / "results.json"))
    assert set(results["results"]["tiny"]) >= set(tasks.TASKS) and results["models"]["tiny"]["protocol"] == "official"
    for line in open(tmp_path / "trajectories.jsonl"):  # every trajectory read the official prompt
        system = json.loads(line)["messages"][0]["content"]
        assert system.startswith("\nYou are a visual assistant") and "tools:  \n{'type': 'function'" in system


def test_tg_under_the_official_protocol_declares_it_in_its_model(tmp_path):
    import grpo
    out = tmp_path / "tg"
    grpo.main(["--quick", "--init", "tiny", "--protocol", "official", "--steps", "1", "--eval-n", "0",
               "--tasks", "vsp_nav", "--out", str(out)])
    assert json.load(open(out / "model" / "protocol.json")) == {"protocol": "official"}
    assert rollout.protocol_of(None, str(out / "model")) is rollout.OFFICIAL
    with pytest.raises(rollout.InputError, match="does not combine with --protocol official"):
        grpo.main(["--quick", "--init", str(out / "model"), "--adl", "--out", str(tmp_path / "tg2")])
