"""
Tool Cold Start (TC): curate multi-turn tool trajectories by calling the real tools, then SFT on them.

1. Curation. For every task an expert plays the protocol on a train example: it calls the real tools
   (tools.call_tool) on the example's own images and records what they return, verbatim. It may read the
   example's ground truth (meta) to decide what to do next, never to invent an observation. Kinds:
   direct (the efficient plan), reflect (try, see it is wrong, undo, retry), tool_failure (a call fails or
   finds nothing; read the error, fix the arguments and call again), no_tool (3x3 lakes answered by eye: the one
   easy case the model can see).
   Every trajectory is checked: format-valid and its answer scores 1. Output: OUT/data/train.jsonl + images/.
2. SFT. Loss only on assistant tokens (rollout.encode_conversation's mask), AdamW, warmup + cosine,
   gradient clipping and accumulation, length-grouped batches, bf16 autocast on CUDA (rollout.train_autocast),
   atomic checkpoints
   with the data position (--resume continues the same data order), OUT/log.jsonl, OUT/model.
3. A greedy evaluation through rollout.rollout on held-out test examples: OUT/eval.json.

    python coldstart.py                        # tiny model, all five tasks, CPU friendly
    python coldstart.py --no-tools --out runs/tc_direct
    python coldstart.py --model /path/to/Qwen2.5-VL-3B --device cuda --n-per-task 2000
    python coldstart.py --export-sharegpt runs/tc_sharegpt   # the TC data for LLaMA-Factory
    python coldstart.py --data runs/tc_sharegpt/adareasoner_tc.json --out runs/tc2   # sharegpt in
"""
import argparse
import io
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext

import torch
from PIL import Image
from tqdm import tqdm

import adl
import rollout
import tasks
import tiny
import tools

parser = argparse.ArgumentParser(description=__doc__, formatter_class=type(
    "Formatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))
parser.add_argument("--out", default="runs/tc", help="output directory (data/, ckpt/, model/, log.jsonl, eval.json)")
parser.add_argument("--model", default="tiny", help="'tiny': the shipped pretrained base (tiny.py); 'scratch': the "
                    "same model randomly initialised (ablation); otherwise a local Qwen2.5-VL model directory to "
                    "fine-tune")
parser.add_argument("--tasks", default=",".join(tasks.TASKS), help="comma-separated tasks to curate and evaluate")
parser.add_argument("--n-per-task", type=int, default=300, help="trajectories curated per task (train split)")
parser.add_argument("--kinds", default="direct=0.6,reflect=0.15,tool_failure=0.15,no_tool=0.1",
                    help="share of each trajectory kind, per task (normalized to sum to 1)")
parser.add_argument("--tools", default="all", help="tools the TC data offers and uses: 'all' or comma-separated "
                    "canonical names; a plan that needs a tool left out is skipped, except vsp_nav without AStar, "
                    "whose expert plans the route itself (the adopt experiment's TC data); a task no plan can fill "
                    "stops curation")
parser.add_argument("--no-tools", action="store_true", help="ablation: the same examples as one-turn direct-answer SFT "
                    "(system prompt without tools); evaluation offers no tools")
parser.add_argument("--adl", action="store_true", help="rewrite each trajectory through adl.py with a fresh random "
                    "mapping every time it is used; evaluation draws one mapping per example")
parser.add_argument("--adl-share", type=float, default=1.0, help="with --adl: the share of uses rewritten, the rest "
                    "keeping the canonical names (ablation; DESIGN's ADL rewrites every use, 1.0)")
parser.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=None,
                    help="freeze the vision tower (default: on for a --model PATH, off for tiny and scratch, whose "
                    "tower is small)")
parser.add_argument("--data", default=None, help="train on this TC data instead of curating: a directory holding "
                    "train.jsonl (ours) or a sharegpt .json file (LLaMA-Factory's layout; image paths relative to it)")
parser.add_argument("--export-sharegpt", default=None, metavar="DIR", help="write the TC data (curated, or --data) to "
                    "DIR in sharegpt with a dataset_info.json entry for LLaMA-Factory, then stop")
parser.add_argument("--epochs", type=float, default=2.0,
                    help="passes over the data (sets the number of optimizer steps)")
parser.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate: 5e-4 for the tiny base, the rate "
                    "it was pretrained at (2e-3 measured 3-17 points lower: results/HISTORY.md, TC from the shipped "
                    "base); ~1e-5 for a 3B/7B model")
parser.add_argument("--warmup", type=int, default=30, help="warmup steps (linear), then cosine decay to 10%%")
parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
parser.add_argument("--clip", type=float, default=1.0, help="gradient clipping (global norm)")
parser.add_argument("--replay", type=int, default=0, help="pretraining items (tiny.py's copy drills and synthetic "
                    "text tool use) added to every micro-batch, so TC does not wash out the base's generic copying")
parser.add_argument("--max-len", type=int, default=2048, help="drop training sequences longer than this many tokens")
parser.add_argument("--ckpt-every", type=int, default=100,
                    help="checkpoint every N optimizer steps (0: never, except before a --stop-after stop)")
parser.add_argument("--resume", action="store_true", help="continue from OUT/ckpt (same data order, optimizer, RNG)")
parser.add_argument("--stop-after", type=int, default=0, help="stop after this many optimizer steps, checkpointing "
                    "first (simulates a killed run; 0: run to the end)")
parser.add_argument("--eval-n", type=int, default=100,
                    help="held-out test examples per task for the final evaluation (0: skip)")
parser.add_argument("--eval-batch", type=int, default=rollout.EVAL_BATCH, help="examples per rollout batch in the "
                    "evaluation")
rollout.add_limit_flags(parser, "eval-")  # of the evaluation trajectories
rollout.add_device_flag(parser)
rollout.add_grad_checkpointing_flag(parser)
rollout.add_fsdp_flag(parser)
rollout.add_protocol_flag(parser)  # of the evaluation and the saved model; curation writes ours (see main)
parser.add_argument("--seed", type=int, default=0, help="seed of curation, data order, and the evaluation's ADL "
                    "draws (its test examples are seed 0's in every run; scratch weights always use seed 0)")
parser.add_argument("--quick", action="store_true",
                    help="smallest configuration that exercises every code path (tests)")

QUICK = dict(n_per_task=6, epochs=0.34, batch_size=2, warmup=2, ckpt_every=2, eval_n=1, eval_max_new_tokens=16,
             eval_max_turns=2)
KINDS = ("direct", "reflect", "tool_failure", "no_tool")
# tasks with an easy case the model can see (a 3x3 lake: the only grid the tiny processor does not shrink); elsewhere
# a no-tool answer would follow no visible cue, and TC would teach a branch taken at random (measured: a model that
# answers guiqa without OCR), so their no_tool share goes to direct
NO_TOOL_TASKS = ("vsp_nav", "vsp_verify")
REPLAY_MIX = (("copy", 0.25), ("tools", 0.75))  # --replay: the generic skills TC builds on, without pictures

# -----------------------------------------------------------------------------
# thinking templates: several per step, so the model learns the step, not one sentence

THINK = {
    # vsp_nav: Point for the elf, the gift and the holes, then AStar (or a route the expert traces itself)
    "nav_elf": ["First I need to know where the elf stands.", "Let me locate the elf on the grid.",
                "To plan a route I start by finding the player.", "I will find the start position, the elf."],
    "nav_gift": ["Now the gift, where the elf has to go.", "Next I locate the goal, the gift.",
                 "I also need the position of the present.", "Where is the gift? Let me point at it."],
    "nav_holes": ["The route must avoid the ice holes, so I find all of them.", "Now every hole in the ice.",
                  "Let me list the holes; stepping into one fails.", "Finally the obstacles: the ice holes."],
    "nav_astar": ["I have the elf, the gift and the holes. A* search on 64-pixel cells gives a shortest safe path.",
                  "With start, goal and obstacles known, the A* tool can plan the route around the holes.",
                  "Everything is located; I let A* find the shortest path that avoids the holes."],
    # no AStar offered (--tools without it): the thought plans the route the answer then gives
    "nav_plan": ["I have the elf, the gift and the holes; counting 64-pixel cells, I trace a safe route around the "
                 "holes.",
                 "With start, goal and holes located, I plan the moves cell by cell, stepping around every hole.",
                 "Everything is located; I work out a short route that never enters a hole."],
    "nav_answer": ["A* returned a path that avoids every hole and ends on the gift.",
                   "The planner found a safe route; that is my answer.",
                   "This path reaches the gift without touching a hole."],
    # reflect: a guessed route drawn, seen to walk into a hole ({hole}: Point's pixels for it), replaced
    "nav_guess": ["Before planning properly, let me try the obvious route and draw it to check it.",
                  "I guess a route first and draw it on the grid to see whether it is safe.",
                  "Let me sketch a direct route from the elf and look at it."],
    "nav_reject": ["The drawn arrows pass through the hole at {hole}: that route fails. I undo it and plan with A* "
                   "instead.",
                   "Checking the drawing: the path steps into the ice hole at {hole}. Wrong; let me use A* around the "
                   "holes.",
                   "That guess walks into the hole at {hole}, so it is unsafe. I discard it and ask A* for a safe "
                   "path."],
    # the same rejection without AStar: the expert's own route, drawn to check
    "nav_retrace": ["The drawn arrows pass through the hole at {hole}: that route fails. I plan again around the holes "
                    "and draw it.",
                    "Checking the drawing: the path steps into the ice hole at {hole}. Wrong; I trace a route around "
                    "it.",
                    "That guess walks into the hole at {hole}, so it is unsafe. I discard it and draw a safe route."],
    "nav_check": ["Let me draw the A* path to check it.", "I draw the new path to confirm it is safe.",
                  "To be sure, I draw the planned route."],
    "nav_ok": ["The new arrows avoid every hole and end on the gift.",
               "This time the path is safe and reaches the present.",
               "Confirmed: the route goes around the holes to the gift."],
    # every grid trajectory opens by judging the lake's size, so the no-tool branch (3x3 only) follows a thought
    # the model can ground in the image (the tiny processor shrinks every grid but the 3x3 one to 224 px)
    "grid_small": ["The lake is a small 3x3 grid.", "This grid is small, only 3x3 cells.",
                   "A small lake: the grid is 3x3."],
    "grid_large": ["The lake is larger than 3x3.", "This grid is bigger than 3x3 cells.",
                   "The lake has more than 3x3 cells."],
    "nav_small": ["The route is easy to see, so no tool is needed.", "I can trace the way to the gift by eye.",
                  "It needs no tools; the path is obvious."],
    # vsp_verify: the elf located, the given moves drawn from it, the drawing judged
    "verify_elf": ["To check the path I first find where the elf starts.",
                   "The moves start at the elf; let me locate it.",
                   "I need the elf's position to draw the path from it."],
    "verify_draw": ["Now I draw the given moves from the elf and look where they lead.",
                    "Let me draw the path {moves} on the grid.",
                    "Drawing the moves as arrows shows whether they are safe."],
    "verify_small": ["It is small enough to follow the moves by eye.", "I can trace the path without tools.",
                     "No tool needed; I follow the moves on the small grid."],
    # reflect: a draw from a wrong start, then the elf located and the moves redrawn
    "verify_wrongstart": ["Let me draw the path from the {corner} corner.",
                          "I draw the moves starting at the {corner} cell.",
                          "Let me just draw the moves from the corner."],
    "verify_restart": ["The arrows start at {start}, but the elf is not there. I must locate the elf and draw again.",
                       "Wrong start: the drawing does not begin at the elf. Let me find the elf first.",
                       "That drawing starts in the wrong cell, so it proves nothing. I find the elf and redraw."],
    # jigsaw: the black hole detected, candidates pasted into it, the seams judged
    "jig_detect": ["First I find the missing piece: the black square.", "Let me locate the black hole in the picture.",
                   "The gap is a black area; I detect it to get its box."],
    "jig_insert": ["I paste candidate {letter} into the gap to see whether it fits.",
                   "Let me try piece {letter} in the black square.",
                   "Insert candidate {letter} into the hole and compare the edges."],
    "jig_reject": ["Candidate {letter} does not fit: its colours break at the edges of the gap. I remove it and try "
                   "another.",
                   "The edges do not line up with piece {letter}; wrong piece. Next candidate.",
                   "Piece {letter} leaves visible seams, so it is not the one."],
    "jig_accept": ["Piece {letter} continues the colours and shapes across every edge.",
                   "With {letter} inserted the picture looks seamless.",
                   "Candidate {letter} fits: no seams at the borders."],
    # vstar: Point finds the small object, Crop zooms in (reflect: too wide a crop first)
    # every opening names the object as the question does, so the description Point gets repeats a word just written
    "vstar_point": ["First I find the {what} in the large image.", "I locate the {what} in the large image.",
                    "The target is small, so I search for the {what} with Point."],
    "vstar_crop": ["Found it. I zoom in on the object to see it clearly.", "Let me crop around it and look closer.",
                   "I crop the region around that point to read the details."],
    "vstar_toobig": ["Let me zoom into a large region around it first.", "I crop a wide area around the point.",
                     "A broad crop around the point first."],
    "vstar_closer": ["The object is still too small in this wide crop; I zoom in closer.",
                     "Too far away to be sure; a tighter crop is needed.", "Still tiny here. Let me crop tighter."],
    "vstar_count": ["Point found {n} matching objects.", "There are {n} of them according to Point.",
                    "The search returned {n} points, one per object."],
    # {fact}: what the crop shows, in words ("the star is red"), before the letter that names it among the options
    "vstar_answer": ["The zoomed view shows it clearly: {fact}.", "Now I can see it well: {fact}.",
                     "In the crop the answer is plain: {fact}."],
    # guiqa: OCR on the screen, the value read off the label's row (reflect: a header crop first)
    "gui_ocr": ["The text on this screen is small; let me read it with OCR.", "I read all the fields with OCR.",
                "OCR gives me every label and value on the screen."],
    # first the label the question names, written as OCR reads it ('Date:'), then the label's detection and the
    # next one, quoted as the observation has them: the quote's first token repeats one just written, and the rest
    # is one contiguous span copied from the label on, so the value arrives by copying, not by a jump over a box
    "gui_answer": ["I need '{field}:'. The OCR reads {pair}: the value on its row.",
                   "The field is '{field}:'. In the detections: {pair}. The second text is its value.",
                   "Looking for '{field}:'. Label and value: {pair}."],
    "gui_header": ["Let me zoom into the top of the screen first.", "I crop the top bar to read it.",
                   "First a look at the top of the screen."],
    "gui_wrong": ["That is only the title bar, not the field I need. Let me read the whole screen.",
                  "The crop shows the header, not the field. I use OCR on the full screen instead.",
                  "Wrong region: no field there. OCR on everything."],
    # tool_failure: {error} is the failed call's own error text, verbatim
    "retry": ["The tool reported an error: {error} Let me fix the arguments and call it again.",
              "That call failed ({error}). I correct it and retry.", "Error from the tool: {error} I fix the call."],
    "empty": ["The tool found nothing with these settings. Let me retry with the default settings.",
              "An empty result: the threshold was wrong. I call it again with the defaults.",
              "Nothing detected, which cannot be right; I retry with default parameters."],
}
# {{{a}}}: format() leaves \boxed{...} around the answer
ANSWER = {
    "vsp_nav": ["The moves are \\boxed{{{a}}}.", "Route: \\boxed{{{a}}}", "\\boxed{{{a}}}"],
    "vsp_verify": ["\\boxed{{{a}}}", "The answer is \\boxed{{{a}}}.", "So: \\boxed{{{a}}}"],
    "jigsaw": ["The missing piece is \\boxed{{{a}}}.", "\\boxed{{{a}}}", "Answer: \\boxed{{{a}}}"],
    "vstar": ["\\boxed{{{a}}}", "The answer is \\boxed{{{a}}}.", "Option \\boxed{{{a}}}"],
    "guiqa": ["\\boxed{{{a}}}", "The value is \\boxed{{{a}}}.", "It reads \\boxed{{{a}}}"],
}
DIRECT_THINK = {  # --no-tools: one turn, the answer straight from the image
    "vsp_nav": ["I trace a safe route from the elf to the gift.", "Looking at the grid, I plan around the holes."],
    "vsp_verify": ["I follow the moves from the elf on the grid.", "Let me trace the given path by eye."],
    "jigsaw": ["I compare each candidate with the border of the gap.", "The piece that continues the picture fits."],
    "vstar": ["I look for the small object in the image.", "Let me find the object and read its attribute."],
    "guiqa": ["I read the field on the screen.", "The value is next to the field's label."],
}

# -----------------------------------------------------------------------------
# curation: an expert that calls the real tools and records what they return


class Skip(Exception):
    """The tools did not behave as this plan needs on this example: try another kind or example."""


class Builder:
    """One trajectory under construction; every observation is the real tool's output."""

    def __init__(self, ex, rng, offered):
        self.ex, self.rng, self.meta, self.offered = ex, rng, ex["meta"], offered
        self.images = list(ex["images"])  # grows with every tool-made image: img_k is images[k-1]
        self.messages = rollout.build_messages(ex, tools.schemas(offered))  # canonical names: ADL renames at each use
        self.opening = ""  # a sentence the first assistant turn starts with (the grid tasks' size judgement)

    def think(self, key, **kw):
        return self.rng.choice(THINK[key]).format(**kw)  # the builder's rng: text fixed by (seed, example, kind)

    def opened(self, thought):
        """The thought of the next turn, led by the opening sentence if no turn has used it yet."""
        thought, self.opening = " ".join(t for t in (self.opening, thought) if t), ""
        return thought

    def call(self, thought, name, params, expect="success"):
        if name not in self.offered:  # a plan needs a tool --tools left out
            raise Skip(f"{name} is not offered")
        result = tools.call_tool(name, params, self.images, timeout=120.0)  # generous: a timeout is not reproducible
        if expect and result.status != expect:  # expect None: any status (a retry's bad call)
            raise Skip(f"{name} gave {result.status}: {result.error}")
        call = json.dumps({"name": name, "parameters": params}, ensure_ascii=False)
        thought = self.opened(thought)
        self.messages.append({"role": "assistant", "content": f"<think>{thought}</think><tool_call>{call}</tool_call>"})
        text, _ = rollout.add_observation(self.images, name, result)  # the engine's own rendering of a result
        self.messages.append(rollout.observation_message(text, result.image))  # the PIL image; save_records writes it
        return result

    def retry(self, name, bad, good, thought, key="retry"):
        """A call with bad arguments, then the fixed one: the error text comes from the tool."""
        err = self.call(thought, name, bad, expect=None)
        # 'retry' needs the bad call to fail; 'empty' needs it to come back empty (every data field empty)
        if (err.status == "success") if key == "retry" else any(err.data.values()):
            raise Skip("the bad call did not fail")
        # the fixed call must succeed; a 'retry' thought quotes the error the model has just read
        return self.call(self.think(key, error=err.error), name, good)

    def answer(self, thought, answer):
        text = self.rng.choice(ANSWER[self.ex["task"]]).format(a=answer)
        thought = self.opened(thought)
        self.messages.append({"role": "assistant", "content": f"<think>{thought}</think><response>{text}</response>"})
        return answer


def cell_of(point):
    return [point[0] // tasks.CELL, point[1] // tasks.CELL]  # pixel -> [col, row], 64-px cells


def centre(cell):
    # [col, row] -> the cell's centre pixel
    return [cell[0] * tasks.CELL + tasks.CELL // 2, cell[1] * tasks.CELL + tasks.CELL // 2]


def locate(b, key, description, count=1):
    r = b.call(b.think(key), "Point", {"image": "img_1", "description": description})
    if count is not None and len(r.data["points"]) != count:  # None: any number
        raise Skip(f"Point found {len(r.data['points'])} {description}, expected {count}")
    return r.data["points"]


def route(m):
    """The expert's own shortest safe route, from the example's ground truth (what a plan without A* answers)."""
    # the lake is square: m["grid"] cells a side
    return ",".join(tools.astar(tuple(m["start"]), tuple(m["goal"]), {tuple(h) for h in m["holes"]}, m["grid"],
                                m["grid"]))


def size_opening(b, kind):
    """The grid tasks' first sentence: is the lake 3x3 (the only size answered without tools) or larger."""
    if kind == "no_tool" and b.meta["grid"] != 3:
        raise Skip("no_tool is for 3x3 grids")
    b.opening = b.think("grid_small" if b.meta["grid"] == 3 else "grid_large")


def vsp_nav(b, kind):
    m = b.meta
    size_opening(b, kind)
    if kind == "no_tool":
        return b.answer(b.think("nav_small"), route(m))  # a 3x3 lake, answered by eye
    planner = "AStar" in b.offered  # without it the expert traces the route
    # tool_failure: a Point description it does not know, or an AStar call without its obstacles
    failure = b.rng.choice(["point", "astar"] if planner else ["point"]) if kind == "tool_failure" else None
    if failure == "point":  # a description Point does not know, then the right word
        elf = b.retry("Point", {"image": "img_1", "description": b.rng.choice(["little figure", "hero", "walker"])},
                      {"image": "img_1", "description": "elf"}, b.think("nav_elf")).data["points"]
        if len(elf) != 1:
            raise Skip("no elf")
        elf = elf[0]
    else:
        elf = locate(b, "nav_elf", b.rng.choice(["elf", "elf", "player"]))[0]  # 'elf' twice as often
    gift = locate(b, "nav_gift", b.rng.choice(["gift", "gift", "present"]))[0]
    # every hole, or the route could cross one Point missed
    holes = locate(b, "nav_holes", b.rng.choice(["holes", "ice holes"]), count=len(m["holes"]))
    if kind == "reflect":
        if not m["holes"]:  # nothing to walk into
            raise Skip("no hole to walk into")
        hole = tuple(m["holes"][b.rng.randrange(len(m["holes"]))])
        blocked = {tuple(h) for h in m["holes"]} - {hole}  # the guess meets only this hole
        into = tools.astar(tuple(m["start"]), hole, blocked, m["grid"], m["grid"])
        if not into:
            raise Skip("hole not reachable")
        # then on to the gift ignoring holes: the walk fails at the first hole, this one
        guess = into + (tools.astar(hole, tuple(m["goal"]), set(), m["grid"], m["grid"]) or [])
        b.call(b.think("nav_guess"), "Draw2DPath",
               {"image": "img_1", "start_point": elf, "directions": ",".join(guess)})
        # the hole as Point reported it: the thought quotes pixels the model has read
        hole_px = next(p for p in holes if cell_of(p) == list(hole))
        thought = b.think("nav_reject" if planner else "nav_retrace", hole=hole_px)
    else:
        thought = b.think("nav_astar" if planner else "nav_plan")
    if planner:  # the thought goes with the AStar call
        params = {"start": elf, "goal": gift, "obstacles": holes}
        if failure == "astar":  # a missing argument; the tool names it
            path = b.retry("AStar", {"start": elf, "goal": gift}, params, thought).data["path"]
        else:
            path = b.call(thought, "AStar", params).data["path"]
        thought = None  # spoken with the AStar call
    else:  # no A*: the model must learn to trace the route from the points; the thought goes with the next turn
        path = route(m)
    # reflect ends with a check: the final route drawn, seen safe, answered
    if kind == "reflect":
        b.call(thought or b.think("nav_check"), "Draw2DPath",
               {"image": "img_1", "start_point": elf, "directions": path})
        return b.answer(b.think("nav_ok"), path)
    return b.answer(thought or b.think("nav_answer"), path)


def verdict(meta):
    """What a careful look at the drawn path shows (the thinking text; the label itself is the example's)."""
    # off_grid="fail", as verification judges: a move off the grid ends the walk
    end, cell = tasks.walk(meta, meta["moves"].split(","), off_grid="fail")
    return {"off_grid": f"The arrows leave the grid at cell {cell}, so the path is not safe.",
            "hole": f"The arrows run into the ice hole at cell {cell}, so the path is not safe.",
            "short": f"The arrows stop at cell {cell}, short of the gift.",
            "goal": "The arrows avoid every hole and end on the gift, so the path is safe."}[end]


def vsp_verify(b, kind):
    m = b.meta
    size_opening(b, kind)
    if kind == "no_tool":
        return b.answer(b.think("verify_small") + " " + verdict(m), b.ex["answer"])  # a 3x3 lake

    def draw(start):  # Draw2DPath of the example's moves from `start`
        return {"image": "img_1", "start_point": start, "directions": m["moves"]}

    if kind == "reflect":
        # a start that is surely wrong: the top-left cell, or the bottom-right one when the elf stands top-left
        corner = "top-left" if list(m["start"]) != [0, 0] else "bottom-right"
        wrong = centre([0, 0]) if corner == "top-left" else centre([m["grid"] - 1, m["grid"] - 1])
        b.call(b.think("verify_wrongstart", corner=corner), "Draw2DPath", draw(wrong))
        # the thought names the wrong start's pixels
        elf = b.call(b.think("verify_restart", start=wrong), "Point",
                     {"image": "img_1", "description": "elf"}).data["points"]
        if len(elf) != 1:
            raise Skip("no elf")
        elf = elf[0]
    else:
        elf = locate(b, "verify_elf", b.rng.choice(["elf", "elf", "player"]))[0]
    if kind == "tool_failure":  # step 0 is out of range; the tool says so, the retry drops it
        b.retry("Draw2DPath", {**draw(elf), "step": 0}, draw(elf), b.think("verify_draw", moves=m["moves"]))
    else:
        b.call(b.think("verify_draw", moves=m["moves"]), "Draw2DPath", draw(elf))
    return b.answer(verdict(m), b.ex["answer"])  # text from the drawing, label from the example


def jigsaw(b, kind):
    # img_1 is the puzzle, img_2, img_3, ... the candidates A, B, ... in order
    m, letters = b.meta, tasks.LETTERS[:len(b.ex["images"]) - 1]
    right = b.ex["answer"]  # the right candidate's letter
    if kind == "tool_failure":  # a min_area no region can reach: an empty answer, then the defaults
        boxes = b.retry("DetectBlackArea", {"image": "img_1", "min_area": 10 ** 7}, {"image": "img_1"},
                        b.think("jig_detect"), key="empty").data["bounding_boxes"]
    else:
        boxes = b.call(b.think("jig_detect"), "DetectBlackArea", {"image": "img_1"}).data["bounding_boxes"]
    if boxes != [m["hole"]]:  # one box, exactly the hole
        raise Skip(f"DetectBlackArea found {boxes}, the hole is {m['hole']}")

    def insert(letter):  # InsertImage of candidate `letter` into the hole
        return {"base_image": "img_1", "image_to_insert": f"img_{letters.index(letter) + 2}", "coordinates": boxes[0]}

    thought = b.think("jig_insert", letter=right)
    # reflect: a wrong candidate first; the right one goes into img_1 again, not into the failed composite
    if kind == "reflect":
        wrong = b.rng.choice([c for c in letters if c != right])
        b.call(b.think("jig_insert", letter=wrong), "InsertImage", insert(wrong))
        thought = b.think("jig_reject", letter=wrong) + " " + b.think("jig_insert", letter=right)
    b.call(thought, "InsertImage", insert(right))
    return b.answer(b.think("jig_accept", letter=right), right)


def vstar(b, kind):
    m = b.meta
    # name the object by what the question does not ask: its shape for a colour question, its colour for a shape one
    what = {"color": m["shape"], "shape": m["colour"], "count": f"{m['colour']} {m['shape']}s"}[m["level"]]
    if kind == "tool_failure":  # Point with words it does not know, then the right ones
        points = b.retry("Point", {"image": "img_1", "description": b.rng.choice(["tiny thing", "the object", "item"])},
                         {"image": "img_1", "description": what}, b.think("vstar_point", what=what)).data["points"]
    else:
        points = b.call(b.think("vstar_point", what=what), "Point",
                        {"image": "img_1", "description": what}).data["points"]
    targets = sorted([round(t[0]), round(t[1])] for t in m["targets"])  # [x, y, size] centres
    # exactly the targets, each within 3 px, or the crop could miss
    if len(points) != len(targets) or any(abs(p[0] - t[0]) > 3 or abs(p[1] - t[1]) > 3
                                          for p, t in zip(sorted(points), targets)):
        raise Skip(f"Point found {points}, the targets are {targets}")
    if m["level"] == "count":  # no crop: the points are the answer
        return b.answer(b.think("vstar_count", n=len(points)), b.ex["answer"])
    w, h = b.ex["images"][0].size  # the search canvas
    (x, y) = points[0]
    # the zoom copies Point's [x, y] (Crop's point form: the 40-px square around it); a box would need x - 20 and
    # x + 20, arithmetic a small model does not learn from a few hundred examples (the tiny default never did)
    if kind == "reflect":  # a 512-px box first leaves the object small, then the point form shows it
        wide = [max(0, x - 256), max(0, y - 256), min(w, x + 256), min(h, y + 256)]
        b.call(b.think("vstar_toobig"), "Crop", {"image": "img_1", "coordinates": wide})
        b.call(b.think("vstar_closer"), "Crop", {"image": "img_1", "coordinates": [x, y]})
    else:
        b.call(b.think("vstar_crop"), "Crop", {"image": "img_1", "coordinates": [x, y]})
    fact = (f"the {m['shape']} is {m['colour']}" if m["level"] == "color"
            else f"the {m['colour']} object is a {m['shape']}")  # the label's words (the letter is the example's)
    return b.answer(b.think("vstar_answer", fact=fact), b.ex["answer"])


def guiqa(b, kind):
    field = b.meta["field"]
    if kind == "reflect":
        # reflect: the top 40 px first, the title bar, which holds no field
        b.call(b.think("gui_header"), "Crop", {"image": "img_1", "coordinates": [0, 0, b.ex["images"][0].width, 40]})
        thought = b.think("gui_wrong")
    else:
        thought = b.think("gui_ocr")
    if kind == "tool_failure":  # an image that does not exist yet, then the screen itself
        dets = b.retry("OCR", {"image": "img_2"}, {"image": "img_1"}, thought).data["detections"]
    else:
        dets = b.call(thought, "OCR", {"image": "img_1"}).data["detections"]
    label = [d for d in dets if d["text"] == field + ":"]  # OCR reads the label with its colon
    # the value: the one other detection on the label's line (tops within 2 px)
    row = [d for d in dets if label and abs(d["bbox"][1] - label[0]["bbox"][1]) <= 2 and d is not label[0]]
    if len(label) != 1 or len(row) != 1 or tasks.score(b.ex, row[0]["text"]) != 1:
        raise Skip(f"OCR did not read field {field!r} as {b.ex['answer']!r}")
    if dets.index(row[0]) != dets.index(label[0]) + 1:  # the quote must be one span of the observation
        raise Skip("the value is not the detection after its label")
    # the two detections as the observation's JSON writes them
    pair = ", ".join(json.dumps(d, ensure_ascii=False) for d in (label[0], row[0]))
    return b.answer(b.think("gui_answer", field=field, pair=pair), row[0]["text"])  # the value as OCR read it


# task -> fn(Builder, kind) -> answer
EXPERTS = {"vsp_nav": vsp_nav, "vsp_verify": vsp_verify, "jigsaw": jigsaw, "vstar": vstar, "guiqa": guiqa}


def parse_kinds(text):
    shares = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in KINDS:
            raise ValueError(f"--kinds: unknown kind {name.strip()!r}; kinds are {KINDS}")
        shares[name.strip()] = float(value)
    total = sum(shares.values())
    return {k: v / total for k, v in shares.items() if v > 0}  # normalized to sum to 1; a zero kind drops out


def quotas(shares, n):
    """Exact counts per kind summing to n (largest remainder), so the shares show in the data exactly."""
    raw = {k: shares[k] * n for k in shares}
    counts = {k: int(v) for k, v in raw.items()}  # floors first
    # the leftover units go to the largest fractional parts
    for k in sorted(raw, key=lambda k: counts[k] - raw[k])[:n - sum(counts.values())]:
        counts[k] += 1
    return counts


def task_shares(task, shares):
    """The kinds' shares for one task: those of --kinds, with no_tool folded into direct outside NO_TOOL_TASKS."""
    if task in NO_TOOL_TASKS or "no_tool" not in shares:
        return dict(shares)
    out = {k: v for k, v in shares.items() if k != "no_tool"}
    out["direct"] = out.get("direct", 0.0) + shares["no_tool"]  # the shares still sum to 1
    return out


def curate_task(task, n, shares, seed, offered=tuple(tools.TOOLS)):
    """Yields n trajectories of one task with kinds in the given shares. Each example is offered the kinds still
    owed; the first whose plan works on it is kept (no_tool on a grid task needs a 3x3 grid, for example).
    A generator, so that curation writes each record (and lets go of its full-size images) before the next."""
    rng = random.Random(f"{seed}-{task}")  # orders the kinds; each Builder has its own
    left = quotas(task_shares(task, shares), n)
    pool, i = [], 0  # i: examples drawn so far
    while sum(left.values()):
        if not pool:
            # train examples in batches of 64 seeded apart (example i is index i % 64 under seed 1000 * seed + i // 64),
            # made 8 at a time: a small curation (--quick: 6 a task) does not make 64 1024 px vstar canvases
            pool = tasks.generate(task, 8, split="train", seed=seed * 1000 + i // 64, start=i % 64)
            # a bound on tries: a tool that fails on most examples stops curation instead of looping
            if i > 200 * max(n, 10):
                raise RuntimeError(f"{task}: cannot fill the kinds {left} (the tools fail on too many examples)")
        ex = pool.pop(0)
        i += 1
        # a random order weighted by what is still owed, so every kind spreads over the whole pool
        # (keys u ** (1 / owed), largest first: weighted sampling without replacement)
        for kind in sorted([k for k, c in left.items() if c], key=lambda k: -rng.random() ** (1 / left[k])):
            # a kind's text depends on (seed, example, kind) only, not on the kinds tried before
            b = Builder(ex, random.Random(f"{seed}-{ex['id']}-{kind}"), offered)
            try:
                answer = EXPERTS[task](b, kind)
            except Skip:  # this plan does not fit this example
                continue
            turns = [m["content"] for m in b.messages if m["role"] == "assistant"]
            # an expert bug, not a tool's whim: stop rather than teach a wrong trajectory
            assert (tasks.is_format_valid(turns)
                    and tasks.score(ex, tasks.extract_answer(turns[-1])) == 1), (ex["id"], kind)
            left[kind] -= 1
            yield {"id": f"{ex['id']}-{kind}", "task": task, "kind": kind, "tools": tools.schemas(offered),
                   "adl_mapping": None, "messages": mark_inputs(b.messages, ex), "answer": answer}
            break  # one trajectory per example


def mark_inputs(messages, ex):
    """Each of the example's own images (the question's) tagged with where it comes from, "tasks:ID#K" (its K-th
    image): save_records stores that reference instead of the pixels, and tasks.open_image makes it again."""
    def part(p):
        k = next((k for k, im in enumerate(ex["images"]) if p["type"] == "image" and p["image"] is im), None)
        return p if k is None else {**p, "source": f"{tasks.SOURCE}{ex['id']}#{k}"}
    return [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m["content"], list) else m
            for m in messages]


def curate(data_dir, config):
    """Curate the TC data `config` describes into data_dir (train.jsonl, images/, config.json), unless the same
    configuration already wrote it there."""
    config_path = os.path.join(data_dir, "config.json")
    if os.path.exists(config_path) and rollout.read_json(config_path) == config:
        print(f"reusing the TC data in {data_dir}")
        return
    # streamed: a record is written (its images as PNGs) as soon as it is curated; holding all of them at full
    # size (1024 px vstar canvases) until the end set the stage's peak memory
    records = (r for task in tqdm(config["tasks"], desc="curate", dynamic_ncols=True)
               for r in curate_task(task, config["n_per_task"], config["kinds"], config["seed"], config["tools"]))
    if config["no_tools"]:
        rng = random.Random(config["seed"])
        records = (direct_record(r, rng) for r in records)
    save_records(records, data_dir)
    rollout.write_json_atomic(config_path, config)  # last: only a complete curation is ever reused


def direct_record(rec, rng):
    """--no-tools: the same example as one direct-answer turn under the tool-free system prompt."""
    user = rec["messages"][1]  # the question with its images
    think = rng.choice(DIRECT_THINK[rec["task"]])
    text = rng.choice(ANSWER[rec["task"]]).format(a=rec["answer"])
    return {**rec, "kind": "no_tool", "tools": [], "messages": [
        {"role": "system", "content": rollout.system_prompt([])}, user,
        {"role": "assistant", "content": f"<think>{think}</think><response>{text}</response>"}]}


def save_records(records, data_dir):
    """train.jsonl plus every image a tool made as a PNG under images/, paths relative; an input image tagged by
    mark_inputs is stored as its reference with a digest of its pixels (a 1024 px search canvas is 1 MB of PNG, most
    of it incompressible grain, and the generator makes it again in 10 ms). records may be a generator: each is
    written as it comes, so only one record's images are held at a time."""
    shutil.rmtree(data_dir, ignore_errors=True)  # no image of an earlier curation survives
    os.makedirs(os.path.join(data_dir, "images"))
    with open(os.path.join(data_dir, "train.jsonl"), "w", encoding="utf-8") as f:
        for rec in records:
            k, messages = 0, []  # k: the record's images so far
            for m in rec["messages"]:
                if isinstance(m["content"], list):
                    parts = []
                    for p in m["content"]:
                        if p["type"] == "image" and "source" in p:
                            p = {"type": "image", "image": p["source"], "sha256": tasks.image_digest(p["image"])}
                        elif p["type"] == "image":
                            k += 1
                            path = f"images/{rec['id']}_{k}.png"
                            tasks.save_png(p["image"], os.path.join(data_dir, path))
                            p = {"type": "image", "image": path}  # relative to data_dir
                        parts.append(p)
                    m = {**m, "content": parts}
                messages.append(m)
            f.write(json.dumps({**rec, "messages": messages}, ensure_ascii=False) + "\n")


def load_records(data_dir):
    """Records with image paths (relative to data_dir); a malformed line raises naming file and line."""
    def check(rec):
        if rec["kind"] not in KINDS or rec["task"] not in tasks.TASKS:
            raise ValueError(f"bad kind {rec['kind']!r} or task {rec['task']!r}")
        for m in rec["messages"]:
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"bad role {m['role']!r}")
            for p in m["content"] if isinstance(m["content"], list) else []:
                if p["type"] == "image" and p["image"].startswith(tasks.SOURCE):
                    tasks.parse_source(p["image"])  # a ValueError naming it
                    if "sha256" not in p:
                        raise ValueError(f"image {p['image']!r}: no sha256 of its pixels")
                elif p["type"] == "image" and not os.path.isfile(os.path.join(data_dir, p["image"])):
                    raise ValueError(f"missing image {p['image']}")
                if p["type"] not in ("image", "text"):
                    raise ValueError(f"bad content part {p['type']!r}")
        return rec
    return tasks.read_jsonl(os.path.join(data_dir, "train.jsonl"),
                            ("id", "task", "kind", "tools", "adl_mapping", "messages", "answer"), check)


# sharegpt: the layout LLaMA-Factory trains on (and the authors' TC data ships in). A record is {"conversations":
# [{"from": "system"|"human"|"gpt", "value": text}], "images": [paths]}; each image is an "<image>" placeholder in
# the text, in order (the inputs first, then each tool-returned image in its observation turn).
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
SHAREGPT_INFO = {"formatting": "sharegpt", "columns": {"messages": "conversations", "images": "images"},
                 "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                          "system_tag": "system"}}


def export_sharegpt(records, data_dir, out, name="adareasoner_tc"):
    """Write records (ours, image paths relative to data_dir) as OUT/NAME.json in sharegpt, with their images under
    OUT/images/ and the dataset_info.json entry LLaMA-Factory reads. Our fields (id, task, kind, tools, adl_mapping,
    answer) ride along as extra keys, which LLaMA-Factory ignores and read_sharegpt restores."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    rows = []
    for rec in records:
        turns, images = [], []
        for m in rec["messages"]:
            parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
            value = ""
            for p in parts:
                # a generated input: written out as a PNG
                if p["type"] == "image" and p["image"].startswith(tasks.SOURCE):
                    value += "<image>"
                    example_id, k = tasks.parse_source(p["image"])
                    images.append(os.path.join("images", f"{example_id}_{k}.png"))
                    if not os.path.exists(os.path.join(out, images[-1])):
                        tasks.save_png(tasks.open_image(p, data_dir), os.path.join(out, images[-1]))
                elif p["type"] == "image":
                    value += "<image>"
                    images.append(os.path.join("images", os.path.basename(p["image"])))
                    src, dst = os.path.join(data_dir, p["image"]), os.path.join(out, images[-1])
                    if not os.path.exists(dst):
                        try:  # a hard link costs no space; a copy where links are impossible
                            os.link(src, dst)
                        except OSError:
                            shutil.copyfile(src, dst)
                elif "<image>" in p["text"]:
                    raise ValueError(f"record {rec['id']}: its text holds a literal <image>, which sharegpt reads "
                                     "as a placeholder")
                else:
                    value += p["text"]
            turns.append({"from": SHAREGPT_ROLES[m["role"]], "value": value})
        rows.append({"conversations": turns, "images": images,
                     **{k: rec[k] for k in ("id", "task", "kind", "tools", "adl_mapping", "answer")}})
    rollout.write_json_atomic(os.path.join(out, f"{name}.json"), rows)
    rollout.write_json_atomic(os.path.join(out, "dataset_info.json"), {name: {"file_name": f"{name}.json",
                                                                              **SHAREGPT_INFO}})
    return os.path.join(out, f"{name}.json")


def read_sharegpt(path):
    """sharegpt JSON (a list of records, or JSON lines) -> our records, image paths relative to the file's folder.
    A record written elsewhere gets task 'external' and kind 'sharegpt'. Raises InputError naming the file, the
    record and what is wrong."""
    roles = {v: k for k, v in SHAREGPT_ROLES.items()}
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        # a JSON list (LLaMA-Factory's file), else JSON lines
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines()
                                                                        if x.strip()]
    except json.JSONDecodeError as e:
        raise tasks.InputError(f"{path}: not sharegpt JSON: {e}") from None
    records = []
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
                raise ValueError("no 'conversations' list")
            paths, messages = list(row.get("images") or []), []
            placeholders = sum(t["value"].count("<image>") for t in row["conversations"])
            if placeholders != len(paths):
                raise ValueError(f"{placeholders} <image> placeholders but {len(paths)} images")
            for t in row["conversations"]:
                if t.get("from") not in roles:
                    raise ValueError(f"bad role {t.get('from')!r} (system, human or gpt)")
                pieces = t["value"].split("<image>")
                # a human turn is always a list of parts, as build_messages writes the question
                if len(pieces) == 1 and t["from"] != "human":  # plain text, as our records hold it
                    messages.append({"role": roles[t["from"]], "content": t["value"]})
                    continue
                parts = []
                for k, piece in enumerate(pieces):
                    if k:
                        image = paths.pop(0)  # in placeholder order over the turns
                        if not os.path.isfile(os.path.join(folder, image)):
                            raise ValueError(f"missing image {image}")
                        parts.append({"type": "image", "image": image})
                    if piece:
                        parts.append({"type": "text", "text": piece})
                messages.append({"role": roles[t["from"]], "content": parts})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise tasks.InputError(f"{path}, record {i}: malformed sharegpt record: {e}") from None
        records.append({"id": row.get("id", f"{os.path.basename(path)}-{i}"), "task": row.get("task", "external"),
                        "kind": row.get("kind", "sharegpt"), "tools": row.get("tools"),
                        "adl_mapping": row.get("adl_mapping"), "answer": row.get("answer"), "messages": messages})
    return records, folder


def load_data(path):
    """TC data from --data: our data directory (train.jsonl) or a sharegpt file -> (records, folder images are
    relative to)."""
    if os.path.isdir(path):
        return load_records(path), path
    if not os.path.isfile(path):
        raise tasks.InputError(f"{path}: no such file or directory (TC data: a directory holding train.jsonl, "
                               "or a sharegpt .json file)")
    return read_sharegpt(path)


# -----------------------------------------------------------------------------
# SFT


def shrink(image, processor):
    """The image at the size the processor resizes it to anyway: the same pixels reach the model, but a
    1024-px search canvas costs 150 kB of memory instead of 3 MB while the data sits in RAM."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    ip = processor.image_processor
    # smart_resize: both sides multiples of patch * merge (28 px), the area within the processor's min and max pixels
    h, w = smart_resize(image.height, image.width, ip.patch_size * ip.merge_size, ip.size["shortest_edge"],
                        ip.size["longest_edge"])
    return image if (w, h) == image.size else image.resize((w, h), Image.BICUBIC)  # already that size: no copy


class Packed:
    """A training image held as PNG bytes at the size the model sees, decoded at each use. Held as pixels, the
    default TC data's 3,211 images take 378 MB for the whole run; as PNG a fraction of that, and decoding a
    224 px PNG costs about a millisecond against a training step's second."""

    def __init__(self, image):
        buf = io.BytesIO()
        tasks.save_png(image, buf)
        # the size train() counts tokens from
        self.data, self.width, self.height = buf.getvalue(), image.width, image.height

    def open(self):
        with Image.open(io.BytesIO(self.data)) as im:
            return im.convert("RGB")


def record_images(rec, data_dir, processor):
    """A record's images at the size the model sees, held as PNG bytes (Packed), in message order."""
    return [Packed(shrink(p["image"], processor)) for m in tasks.with_pil(rec["messages"], data_dir)
            if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]


def batch_plan(lengths, batch_size, epoch, seed):
    """Length-grouped batches for one epoch: shuffle, sort within windows of 32 batches, shuffle the batches.
    A pure function of (epoch, seed), so a resumed run replays the same order."""
    rng = random.Random(f"{seed}-epoch-{epoch}")
    order = list(range(len(lengths)))  # indices into `lengths`
    rng.shuffle(order)
    window = batch_size * 32  # 32 batches
    batches = []
    for s in range(0, len(order), window):
        # similar lengths in a batch pad little; the windows keep the order random
        chunk = sorted(order[s:s + window], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)  # a step's length does not follow the window order
    return batches


def encode_record(rec, processor, images, rng, adl_share):
    """-> (ids, loss_mask, [(pixel_values, grid_thw)]). ADL (adl_share > 0) draws a fresh mapping for this use of the
    record, for a share adl_share of the uses (rng is the use's own: seeded by the micro-batch and the record's place
    in it, so every rank draws the same; at 1.0 it draws nothing else, so --adl's mappings stay as they were)."""
    if adl_share and (adl_share >= 1 or rng.random() < adl_share):
        rec = adl.apply(rec, adl.randomize(rec["tools"], rng)[1])  # [1]: the Mapping
    k = iter(images)  # the record's images in message order
    # each image part gets its pixels, decoded now (Packed.open)
    messages = [{**m, "content": [{"type": "image", "image": next(k).open()} if p["type"] == "image" else p
                                  for p in m["content"]]}
                if isinstance(m["content"], list) else m for m in rec["messages"]]
    return rollout.encode_conversation(processor, messages)


def text_only(message):
    return message if isinstance(message["content"], str) else \
        {**message, "content": [p for p in message["content"] if p["type"] == "text"]}


def replay_item(processor, seed, micro, k):
    """The k-th replayed pretraining item of a micro-batch, (ids, loss mask, images), a pure function of its place."""
    return tiny.encode_item(processor, tiny.corpus_item(random.Random(f"{seed}-replay-{micro}-{k}"), REPLAY_MIX,
                                                        images=False))


def train(model, processor, records, images, device, optimizer, *, out, epochs, batch_size, grad_accum, lr, warmup,
          clip, max_len, adl_share, seed, ckpt_every, replay=0, stop_after=0, start_state=None):
    """The SFT loop; returns (final loop state, total steps). `images[i]` holds record i's images (Packed) in order.
    replay: text-only pretraining items added to each micro-batch, drawn from (seed, micro-batch), so a resumed run
    draws the same ones."""
    # sequence lengths without encoding pixels: text tokens plus each image's pad tokens (one per f x f pixels)
    f = processor.image_processor.patch_size * processor.merge  # 28 px: one LLM token's side
    # exact: shrink() made every side a multiple of f; + 2 for <|vision_start|> and <|vision_end|>
    lengths = [len(rollout.encode_conversation(processor, [text_only(m) for m in r["messages"]])[0])
               + sum((im.width // f) * (im.height // f) + 2 for im in images[i]) for i, r in enumerate(records)]
    keep = [i for i, n in enumerate(lengths) if n <= max_len]  # indices of the records that fit
    if len(keep) < len(records):
        print(f"dropping {len(records) - len(keep)} sequences longer than --max-len {max_len}")
    micro_per_epoch = math.ceil(len(keep) / batch_size)  # the last one may be short
    total = max(1, int(epochs * micro_per_epoch) // grad_accum)  # optimizer steps of the run
    state = start_state or {"step": 0, "micro": 0}  # micro: the data position, in micro-batches
    # under torchrun: every rank plans the same batches and takes every world-th sequence of each micro-batch;
    # only rank 0 writes the log and the checkpoints
    rank, world = rollout.rank_and_world()
    log = rollout.open_log(os.path.join(out, "log.jsonl"), state["step"]) if rank == 0 else open(os.devnull, "w")
    autocast = rollout.train_autocast(device)  # bf16 on CUDA, fp32 on a CPU (see rollout.bf16_autocast_fits)
    plans = {}  # {epoch: its batch plan}
    bar = tqdm(total=total, initial=state["step"], desc="sft", dynamic_ncols=True)
    model.train()
    while state["step"] < total:
        t0, loss_sum, n_tok, n_all = time.perf_counter(), 0.0, 0, 0  # n_tok: loss tokens, n_all: all tokens
        # 1. the step's micro-batches: the epoch's length-grouped plan (a pure function of epoch and seed, so a
        # resumed run continues at the same micro-batch), each record encoded now, with a fresh ADL mapping per use
        micro = []
        for _ in range(grad_accum):
            epoch, pos = divmod(state["micro"], micro_per_epoch)  # epochs > 1 replay the data in a new order
            if epoch not in plans:  # only the current epoch's plan is kept
                plans = {epoch: batch_plan([lengths[i] for i in keep], batch_size, epoch, seed)}
            batch = plans[epoch][pos]  # indices into keep
            mine = [k for k in range(len(batch) + replay) if k % world == rank]  # this rank's share, records first
            micro.append([encode_record(records[keep[batch[k]]], processor, images[keep[batch[k]]],
                                        # the use's ADL stream: the same on every rank and on resume
                                        random.Random(f"{seed}-adl-{state['micro']}-{k}"), adl_share)
                          if k < len(batch) else replay_item(processor, seed, state["micro"], k - len(batch))
                          for k in mine])
            state["micro"] += 1
        # loss tokens of the whole step, over every rank: the loss is a token-mean over the global batch
        # m[1:]: a sequence's first token is never predicted (masked_logits drops it)
        count = rollout.all_sum([sum(int(sum(m[1:])) for b in micro for _, m, _ in b)])[0]
        lr_now = rollout.lr_at(state["step"], total, lr, warmup)  # warmup, then cosine to 10%
        for g in optimizer.param_groups:
            g["lr"] = lr_now
        # 2. forward and backward per micro-batch; dividing by the step's loss tokens makes the accumulated gradient
        # that of one token-mean loss over the whole step, whatever the split
        for batch in micro:
            if not batch:  # a rank may hold none of a short last micro-batch; under --fsdp it still runs a pass
                rollout.idle_pass(model)
                continue
            with autocast:
                loss, n = rollout.masked_lm_loss(model, processor, batch, device)
            (loss / max(1, count)).backward()
            loss_sum, n_tok, n_all = loss_sum + loss.item(), n_tok + n, n_all + sum(len(ids) for ids, _, _ in batch)
        # 3. one optimizer step (only the trained parameters: the vision tower may be frozen); several ranks first
        # sum their gradients, so every rank takes the same step
        trained = [p for p in model.parameters() if p.requires_grad]
        rollout.all_reduce_grads(trained)  # a no-op at world size 1
        loss_sum, n_tok, n_all = rollout.all_sum([loss_sum, n_tok, n_all])
        n_tok, n_all = int(n_tok), int(n_all)
        grad_norm = rollout.clip_grads(trained, clip)  # the global gradient, the same on every rank
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # None, not zeros: memory freed between steps
        state["step"] += 1
        dt = time.perf_counter() - t0
        # loss per loss token of the step; tokens per second over all tokens, prompts and images included
        rec = {"step": state["step"], "loss": loss_sum / max(1, n_tok), "lr": lr_now, "grad_norm": float(grad_norm),
               "tokens": n_all, "loss_tokens": n_tok, "tokens_per_s": n_all / dt,
               "epoch": state["micro"] / micro_per_epoch,
               "cpu_s": time.process_time(),  # CPU seconds so far: wall time on a shared machine says little
               # the process's peak resident memory so far (ru_maxrss: KiB on Linux): the step where it grows
               # is the one that sets the stage's peak
               "peak_rss_mib": rollout.peak_rss_mib()}
        log.write(json.dumps(rec) + "\n")
        log.flush()  # a kill loses at most this line; open_log drops it on resume if torn
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr_now:.1e}", tok_s=f"{rec['tokens_per_s']:.0f}")
        # 4. checkpoint every ckpt_every steps, and before a requested stop (--stop-after), so --resume goes on
        stop = stop_after and state["step"] >= stop_after
        if (ckpt_every and state["step"] % ckpt_every == 0) or stop:  # every rank: rank 0 writes
            rollout.save_checkpoint(os.path.join(out, "ckpt"), model, processor, optimizer, state)
        if stop:
            break
    bar.close()
    log.close()
    model.eval()
    return state, total

# -----------------------------------------------------------------------------


def main(argv=None):
    args = rollout.parse_flags(parser, argv, QUICK)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a nohup log as they happen
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    rank, world, device = rollout.dist_setup(rollout.resolve_device(args.device), args.fsdp)
    task_names = [t for t in args.tasks.split(",") if t]
    try:
        offered = tools.tool_list(args.tools)
    except ValueError as e:
        parser.error(f"--tools: {e}")
    if not offered:
        parser.error("--tools: TC data needs at least one tool (--no-tools makes direct-answer SFT data)")
    if not 0 < args.adl_share <= 1 or (args.adl_share < 1 and not args.adl):
        parser.error(f"--adl-share {args.adl_share}: a share in (0, 1], with --adl")
    protocol = rollout.protocol_of(args.protocol, args.model)
    if protocol.name != "ours" and not args.data:
        parser.error("--protocol official: curation writes this project's protocol; train on data in the official "
                     "one with --data (e.g. the authors' sharegpt file)")
    os.makedirs(args.out, exist_ok=True)
    data_dir = os.path.join(args.out, "data")
    t_start = time.perf_counter()

    # 1. curation (reused when the same configuration already wrote it)
    config = {"tasks": task_names, "n_per_task": args.n_per_task, "kinds": parse_kinds(args.kinds), "seed": args.seed,
              "no_tools": args.no_tools, "tools": offered}
    if rank > 0:  # under torchrun rank 0 curates; the others wait for its data
        rollout.barrier()
    if args.data:  # TC data from elsewhere: ours from another run, or sharegpt
        records, data_dir = load_data(args.data)
        if args.adl and any(not r["tools"] for r in records):
            raise tasks.InputError(f"{args.data}: --adl rewrites each record's tools, and some records list none")
    else:
        curate(data_dir, config)
    if rank == 0:
        rollout.barrier()  # rank 0 is done: the others go on
    if not args.data:
        records = load_records(data_dir)  # every rank reads the same records
    print(f"{len(records)} trajectories from {args.data or data_dir} ({time.perf_counter() - t_start:.0f} s)")
    if args.export_sharegpt:
        path = export_sharegpt(records, data_dir, args.export_sharegpt)
        print(f"wrote {path} and its dataset_info.json entry (LLaMA-Factory: dataset_dir {args.export_sharegpt})")
        return {"exported": path, "trajectories": len(records)}

    # 2. model: the shipped tiny base, the same model untrained (scratch), or a real checkpoint;
    # all keep their tokenizer
    found = rollout.resume_from(os.path.join(args.out, "ckpt"), args.resume)
    model, processor = rollout.load_policy(os.path.join(found, "model") if found else args.model, device=device,
                                           dtype=torch.float32)
    freeze = args.freeze_vision if args.freeze_vision is not None else args.model not in rollout.BUILTIN_MODELS
    for p in model.model.visual.parameters():
        p.requires_grad_(not freeze)
    if args.grad_checkpointing:
        rollout.checkpoint_activations(model)
    if args.fsdp:  # before the optimizer: it must hold the shards
        rollout.shard(model)
    params = [p for p in model.parameters() if p.requires_grad]  # what AdamW and the gradient sum see
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M trained (vision tower {'frozen' if freeze else 'trained'}), "
          f"{device}")
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    state = None
    if found:
        state = rollout.load_checkpoint(found, optimizer, model)
        print(f"resumed at step {state['step']}")

    # 3. SFT
    images = [record_images(r, data_dir, processor) for r in records]
    state, total = train(model, processor, records, images, device, optimizer, out=args.out, epochs=args.epochs,
                         batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup,
                         clip=args.clip, max_len=args.max_len, adl_share=args.adl_share if args.adl else 0.0,
                         seed=args.seed, ckpt_every=args.ckpt_every, replay=args.replay, stop_after=args.stop_after,
                         start_state=state)
    if state["step"] < total:
        print(f"stopped after step {state['step']} of {total}; continue with --resume")
        rollout.barrier()  # rank 0's checkpoint is complete before any rank exits
        return None
    model_dir = os.path.join(args.out, "model")
    rollout.save_policy(model, processor, model_dir, protocol.name)  # every rank: rank 0 writes
    print(f"model saved to {model_dir} ({time.perf_counter() - t_start:.0f} s)")

    # 4. evaluation: greedy rollouts on held-out test examples, as every stage evaluates. The training images and
    # their encodings are let go first: evaluation needs neither, so the peak is the larger of the two phases
    del images
    rollout.release_memory()
    results = {}
    if args.eval_n:
        if not args.fsdp:  # training is over: the inference dtype (FSDP's shards stay fp32, under bf16 autocast)
            model.to(torch.bfloat16 if rollout.is_cuda(device) else torch.float32)
        examples = tasks.test_set(task_names, args.eval_n)  # seed 0 whatever --seed: every run scores the same
        shown = [] if args.no_tools else offered  # --no-tools: the direct-answer prompt
        # ADL: one random naming per example, seeded by its id
        plan = adl.plan(examples, protocol.schemas(shown), "per-sample" if args.adl else "off", args.seed)
        with rollout.unsharded(model), rollout.train_autocast(device) if args.fsdp else nullcontext():
            _, results = rollout.evaluate(model, processor, examples, shown, plan, args.eval_batch, seed=args.seed,
                                          protocol=protocol, **rollout.limits_of(args, "eval-"))
        for task, m in results.items():
            print(rollout.describe(task, m))
    summary = {"results": results, "steps": state["step"], "trajectories": len(records),
               "wall_s": time.perf_counter() - t_start, "cpu_s": time.process_time(), "args": vars(args)}
    if rank == 0:
        rollout.write_json_atomic(os.path.join(args.out, "eval.json"), summary, indent=1)
    rollout.barrier()
    print(f"done in {summary['wall_s']:.0f} s wall, {summary['cpu_s']:.0f} s CPU")
    return summary


if __name__ == "__main__":
    rollout.cli(main)
