"""
Reproduce AdaReasoner's findings on the tiny default, from nothing, with one command.

    python reproduce.py                      # the full run: 1 h 39 min on a 2-core AMD EPYC with AVX-512, 86 min
                                             # of steps on an Intel one, about 4 h on an AVX2-only AMD one
    nohup python reproduce.py > runs/repro.log 2>&1 &
    python reproduce.py --quick              # every step at its smallest: a smoke check of the whole pipeline

Every step is a plain stage command (python coldstart.py / grpo.py / evaluate.py ...), run in a process of its own
(on Linux forked from this one, which has imported torch and the stages once) with its output in OUT/logs/STEP.log,
so any step can be rerun by hand from the command printed in the summary.
A finished step is recorded in OUT/steps.json and skipped on the next call: an interrupted run continues
where it stopped (a training step resumes from its last checkpoint). A step whose command changed runs again from
its start, and so does every later step that reads its outputs. At the end the outputs are read back
and summarized in OUT/summary.md and OUT/report.html (the per-experiment evaluate.py reports hold the
browsable trajectories and the training curves).

Experiments (the paper's, at the tiny scale):
  1. main table: accuracy per task, with its 95% Wilson interval, of Base (the pretrained tiny base with the
     tools offered, no TC: the paper's starting point), Direct-SFT (coldstart --no-tools), TC, TG (Tool-GRPO
     from the base with the tools offered, no TC) and TC+TG.
  2. adopt: TC data without AStar (vsp_nav, vsp_verify); RL on both tasks with all seven tools: AStar calls per
     vsp_nav sample over the RL steps (a curve in the report), vsp_nav accuracy before and after.
  3. discard: the same two models on vsp_verify with AStar offered (RL offered it there too, where it is of no
     use) against the same models without AStar: accuracy and AStar calls per sample, before and after RL.
  4. modulate: Point calls per sample on vsp_nav against vsp_verify after TC+TG.
  5. ADL: TC with and without --adl on the same data, evaluated with canonical and randomized tool names;
     transfer: TC data from jigsaw only, RL on jigsaw + vsp_verify + guiqa, with and without ADL, accuracy on
     the two tasks unseen in TC.
  6. tool statistics: calls per sample and tool success rate per task (main-table models).
Experiments 2, 3 and 5-transfer use smaller configurations than the stage defaults (see SMALL below). The targets
table reads the accuracies with their 95% intervals: a threshold is met when the whole interval clears it; in the
main table two models differ when their intervals do not overlap (the issue's reading) and "Base lowest" compares the
mean accuracies; a gain or a loss (adopt, discard, ADL, transfer) is read with the interval of the difference, paired
over the test examples, the same on both sides (Newcombe's square-and-add method, from the two Wilson intervals and
the outcomes' correlation). Calls per sample (adopt, discard, modulate) are read as measured; a discard met by a
model that calls no tool at all is marked as met only by the letter.
"""
import argparse
import datetime
import html
import json
import math
import os
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback

import torch
# the model class and the stages the forked steps run (run_stage): imported once here, not once per step
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl  # noqa: F401

import coldstart  # noqa: F401
import grpo  # noqa: F401
import rollout
from evaluate import CHART_CSS, html_table, md_table, svg_lines
from rollout import mean
from tasks import TASKS as TASK_NAMES, read_jsonl
from tools import TOOLS

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default="runs/repro", help="output directory (one subdirectory per step)")
parser.add_argument("--eval-n", type=int, default=100, help="test examples per task in every evaluation (100 gives a "
                    "95%% interval about 10-20 points wide)")
rollout.add_device_flag(parser, "every stage runs")
parser.add_argument("--seed", type=int, default=0, help="passed to every stage")
parser.add_argument("--reward", default="accuracy", choices=["adaptive", "accuracy", "additive"],
                    help="the reward of every RL step (grpo.py --reward). accuracy: measured on the tiny base over "
                    "three seeds each (README, Rewards), where the paper's adaptive reward lets RL farm its tool term")
parser.add_argument("--quick", action="store_true", help="every stage with its own --quick: minutes, for tests")
parser.add_argument("--report-only", action="store_true", help="rewrite summary.md and report.html from the finished "
                    "steps (a run still going or stopped gets the sections whose steps are done)")

# experiments 2, 3 and 5-transfer: smaller than the stage defaults, so that the whole run fits in the 3 hours it is
# meant to on 2 cores (99 min on an AVX-512 AMD EPYC, 86 on an Intel CPU; about 4 h on an AVX2-only AMD one)
SMALL_TC = ["--n-per-task", "300", "--epochs", "2"]
# adopt and transfer RL must learn what their TC model never did (AStar, unseen tasks): no KL pull back to it, as in
# the paper, and the rate these experiments were measured at (the main rows keep grpo.py's KL and lr defaults, which
# hold what TC taught)
SMALL_RL = ["--steps", "30", "--kl-coef", "0", "--lr", "2e-4"]
NO_ASTAR = ",".join(t for t in TOOLS if t != "AStar")  # every tool but AStar, as a --tools list
TRANSFER_RL = "jigsaw,vsp_verify,guiqa"  # jigsaw as in TC, then two tasks TC never showed
TASKS = list(TASK_NAMES)
UNSEEN = ["vsp_verify", "guiqa"]  # the transfer tasks unseen in TC: the ones evaluated
# (the model's label in eval_main, its name in the tables)
MAIN = [("base", "Base"), ("direct", "Direct-SFT"), ("tc", "TC"), ("tg", "TG"), ("tctg", "TC+TG")]
ADOPT_RL = "vsp_nav,vsp_verify"  # AStar helps on vsp_nav, not on vsp_verify: adopt and discard from one RL run

# -----------------------------------------------------------------------------
# the steps


def steps(out, device, seed, quick, reward, eval_n):
    """[(name, argv)] in run order; every path is under out."""
    # every stage gets the same device and seed, and --quick when this run has it
    common = ["--device", device, "--seed", str(seed)] + (["--quick"] if quick else [])
    small_tc, small_rl = ([], []) if quick else (SMALL_TC, SMALL_RL)  # --quick sizes win over SMALL

    def o(*parts):
        return os.path.join(out, *parts)

    def model(step):  # a stage's final model directory
        return o(step, "model")

    # --eval-n 0: the training stages skip their own final evaluation; the eval_* steps measure every model alike
    def coldstart(name, *a):
        return name, ["coldstart.py", "--out", o(name), "--eval-n", "0", *a, *common]

    def grpo(name, init, *a):  # init: a step whose model starts the RL, or "tiny" (the pretrained base)
        start = init if init == "tiny" else model(init)
        return name, ["grpo.py", "--init", start, "--out", o(name), "--eval-n", "0", "--reward", reward, *a,
                      *common]

    def evaluate(name, models, *a):  # --quick keeps evaluate.py's own quick size (an explicit --n would win over it)
        n = [] if quick else ["--n", str(eval_n)]
        return name, ["evaluate.py", "--models", ",".join(f"{k}={v}" for k, v in models), "--out", o(name), *n, *a,
                      *common]

    return [
        # 1. main table (stage defaults, but --reward: reproduce's own flag) and 4. modulate, 6. tool statistics
        coldstart("direct", "--no-tools"),
        coldstart("tc"),
        grpo("tg", "tiny", "--tools", "all"),  # TG: RL from the base, no TC
        grpo("tctg", "tc"),  # TC+TG: RL from the TC model
        # Base: the pretrained tiny with the tools offered; Direct-SFT answers with the direct-answer prompt (:none)
        evaluate("eval_main", [("base", "tiny"), ("direct", model("direct") + ":none"), ("tc", model("tc")),
                               ("tg", model("tg")), ("tctg", model("tctg"))],
                 "--curves", ",".join(f"{s}={o(s, 'log.jsonl')}" for s in ("tc", "tg", "tctg"))),
        # 2. adopt and 3. discard: AStar first offered in RL, on the task it helps and on one it does not
        coldstart("tc_noastar", "--tasks", ADOPT_RL, "--tools", NO_ASTAR, *small_tc),
        grpo("tg_adopt", "tc_noastar", "--tasks", ADOPT_RL, "--tools", "all", *small_rl),
        evaluate("eval_adopt", [("before", model("tc_noastar")), ("after", model("tg_adopt"))],
                 "--tasks", ADOPT_RL, "--tools", "all", "--curves", f"adopt={o('tg_adopt', 'log.jsonl')}"),
        # discard: vsp_verify without AStar, against eval_adopt's vsp_verify with it
        evaluate("eval_discard", [("before", model("tc_noastar")), ("after", model("tg_adopt"))],
                 "--tasks", "vsp_verify", "--tools", NO_ASTAR),
        # 5. ADL: the same data as tc, a fresh mapping per trajectory
        coldstart("tc_adl", "--adl"),
        evaluate("eval_adl_canonical", [("tc", model("tc")), ("tc_adl", model("tc_adl"))], "--adl", "off"),
        evaluate("eval_adl_randomized", [("tc", model("tc")), ("tc_adl", model("tc_adl"))], "--adl", "per-sample"),
        # 5. transfer: TC on jigsaw only, RL on three tasks
        coldstart("tc_jigsaw", "--tasks", "jigsaw", *small_tc),
        coldstart("tc_jigsaw_adl", "--tasks", "jigsaw", "--adl", *small_tc),
        grpo("tg_transfer", "tc_jigsaw", "--tasks", TRANSFER_RL, *small_rl),
        grpo("tg_transfer_adl", "tc_jigsaw_adl", "--tasks", TRANSFER_RL, "--adl", *small_rl),
        # only the tasks unseen in TC, for all four transfer models
        evaluate("eval_transfer", [("tc", model("tc_jigsaw")), ("tc_adl", model("tc_jigsaw_adl")),
                                   ("tctg", model("tg_transfer")), ("tctg_adl", model("tg_transfer_adl"))],
                 "--tasks", ",".join(UNSEEN)),
    ]


def run_stage(script, argv, log_path):
    """`python script argv`, its output appended to log_path (a rerun's output follows the failed attempt's)
    -> exit status. Every step gets a process of its own (its memory is returned when it ends, a crash ends only the
    step). On Linux that process is forked from this one after torch, transformers and the stages are imported, which
    is most of a --quick step (about 7 s a process on a slow 2-core CPU); elsewhere it is a fresh interpreter.
    This process runs no torch work of its own, and must not: a child forked after the CPU thread pool has started
    hangs in its first parallel operation (tried: a matrix product before the fork, then one in the child)."""
    if sys.platform != "linux" or torch.cuda.is_initialized():  # fork is safe only before any CUDA work
        with open(log_path, "a", encoding="utf-8") as log:
            return subprocess.call([sys.executable, script] + argv, stdout=log, stderr=subprocess.STDOUT)
    sys.stdout.flush(), sys.stderr.flush()  # else the child would write this process's buffered text again
    pid = os.fork()
    if pid == 0:  # the child: becomes `python script argv`, then exits without returning into this loop
        code = 1
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1), os.dup2(fd, 2)  # C-level output (warnings from torch's kernels) goes there too
            os.close(fd)
            # and Python's, through streams of its own, as a fresh interpreter has them (this process's sys.stdout may
            # not write to fd 1: pytest replaces it)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
            sys.argv, sys.path[0] = [script] + argv, os.path.dirname(script)  # what `python script` would see
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:  # as the interpreter does: None is 0, an int the status, anything else printed and 1
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    try:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    except BaseException:  # Ctrl-C (the child got it too) or any error here: the step does not outlive this run
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise


def run_steps(out, plan):
    """Run every step not yet recorded as done; stop at the first failure (its log names the cause). A step whose
    inputs (another step's outputs, named in its command) finished after it did runs again."""
    done_path = os.path.join(out, "steps.json")
    # step name -> {command, seconds, finished} of the steps that completed
    done = rollout.read_json(done_path) if os.path.exists(done_path) else {}
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)

    order = [n for n, _ in plan]

    def in_order():  # the done steps in plan order (a step run again is not moved to the end)
        return {n: done[n] for n in sorted(done, key=lambda n: order.index(n) if n in order else len(order))}

    def save_done():  # atomic: a kill never leaves a half-written steps.json
        rollout.write_json_atomic(done_path, in_order(), indent=1)

    for i, (name, argv) in enumerate(plan, 1):
        command = shlex.join(["python"] + argv)
        # the earlier steps whose outputs this one reads ('runs/repro/tc/' in runs/repro/tc/model)
        inputs = [n for n, _ in plan[:i - 1] if any(os.path.join(out, n, "") in a for a in argv[1:])]
        # done only with the very same command (a changed flag, say --eval-n, runs the step again) and inputs no
        # newer than it (the "finished" strings sort as time does): an evaluation of a retrained model runs again
        if done.get(name, {}).get("command") == command and all(done[n]["finished"] <= done[name]["finished"]
                                                                  for n in inputs):
            print(f"[{i}/{len(plan)}] {name}: done ({done[name]['seconds']:.0f} s), skipped")
            continue
        # a kill can leave only ckpt.tmp or ckpt.old (rollout.find_checkpoint)
        ckpt = [os.path.join(out, name, "ckpt" + s) for s in ("", ".tmp", ".old")]
        # it finished once, with another command or older inputs: start afresh, not from its checkpoint
        if name in done:
            for path in ckpt:
                shutil.rmtree(path, ignore_errors=True)
            del done[name]  # until it finishes again; a kill before that leaves a checkpoint of this run to resume
            save_done()
        # evaluate.py has no --resume: an evaluation simply runs again
        resume = ["--resume"] if argv[0] != "evaluate.py" and any(os.path.isdir(path) for path in ckpt) else []
        print(f"[{i}/{len(plan)}] {name}: {command}{' --resume' if resume else ''}", flush=True)
        log_path = os.path.join(out, "logs", f"{name}.log")
        t0 = time.perf_counter()
        # the stage scripts sit next to this file; paths in argv stay relative to the caller's directory
        rc = run_stage(os.path.join(os.path.dirname(os.path.abspath(__file__)), argv[0]), argv[1:] + resume, log_path)
        seconds = time.perf_counter() - t0
        if rc != 0:
            sys.exit(f"step {name} failed (exit {rc}) after {seconds:.0f} s; see {log_path}. "
                     "Rerunning reproduce.py continues from this step.")
        # to the microsecond, so that a step rerun within a second of its reader's finish still counts as newer
        done[name] = {"command": command, "seconds": seconds,
                      "finished": datetime.datetime.now().isoformat(" ", timespec="microseconds")}
        save_done()  # recorded only after success
        print(f"    {seconds:.0f} s", flush=True)
    return in_order()

# -----------------------------------------------------------------------------
# reading the outputs back into tables: (title, note, header, rows)


def results(out, step):
    # {model label: {task: rollout.metrics}}
    return rollout.read_json(os.path.join(out, step, "results.json"))["results"]


def examples_per_task(r):
    """Test examples per task of an evaluation's results, as evaluate.py recorded them (--quick: its own size)."""
    return next(m["n"] for per_task in r.values() for m in per_task.values())


def pct(v):
    return "n/a" if v is None else f"{100 * v:.0f}%"  # whole points: the intervals are 10-20 wide at n = 100


def num(v):
    return "n/a" if v is None else f"{v:.2f}"


def calls(r, tool):
    return r["calls_per_sample_per_tool"].get(tool, 0.0)  # a tool never called is absent: 0


def with_ci(m):
    """'64% [54-73]': an accuracy and its 95% Wilson interval (rollout.metrics' accuracy_ci)."""
    lo, hi = m["accuracy_ci"]
    return f"{pct(m['accuracy'])} [{100 * lo:.0f}-{100 * hi:.0f}]"


def main_table(out):
    r = results(out, "eval_main")
    # per MAIN model: accuracy [95% interval] per task, then the macro mean
    rows = [[label] + [with_ci(r[key][t]) for t in TASKS] + [pct(mean(r[key][t]["accuracy"] for t in TASKS))]
            for key, label in MAIN]
    return ("1. Main table: accuracy, tools offered", f"{examples_per_task(r)} test examples per task, greedy; each "
            "cell the accuracy and its 95% Wilson interval. Base: the pretrained tiny base, no TC; TG: RL from the "
            "base.",
            ["model"] + TASKS + ["mean"], rows)


def adopt_curve(out):
    """[(RL step, AStar calls per vsp_nav sample)] from the adopt run's log (sampled rollouts, per task)."""
    # one record per RL step; by_task: that step's sampled rollouts, per task (a step without vsp_nav is skipped)
    log = [json.loads(line) for line in open(os.path.join(out, "tg_adopt", "log.jsonl"), encoding="utf-8")]
    return [(rec["step"], calls(rec["by_task"]["vsp_nav"], "AStar")) for rec in log
            if "vsp_nav" in rec.get("by_task", {})]


ADOPT_CURVE = "2. Adopt: AStar calls per vsp_nav sample during RL"  # the table the report draws the curve under


def adopt_tables(out):
    curve = adopt_curve(out)
    chunks = max(1, min(5, len(curve)))  # at most 5 blocks of steps: the table stays short
    size = -(-len(curve) // chunks)  # steps per block, rounded up
    # 'first-last step' and the block's mean AStar calls per sample
    rows = [[f"{part[0][0]}-{part[-1][0]}", num(mean(c for _, c in part))]
            for part in (curve[k:k + size] for k in range(0, len(curve), size))]
    r, d = results(out, "eval_adopt"), results(out, "eval_discard")  # d: vsp_verify without AStar
    before_after = [[label, with_ci(r[label]["vsp_nav"]), num(calls(r[label]["vsp_nav"], "AStar")),
                     pct(r[label]["vsp_nav"]["format_valid_rate"])] for label in ("before", "after")]
    # vsp_verify with AStar offered (eval_adopt), then without it (eval_discard)
    discard = [[label, with_ci(r[label]["vsp_verify"]), num(calls(r[label]["vsp_verify"], "AStar")),
                with_ci(d[label]["vsp_verify"])] for label in ("before", "after")]
    return [
        (ADOPT_CURVE, "TC data without AStar (vsp_nav, vsp_verify; "
         f"{' '.join(SMALL_TC)}); RL on {ADOPT_RL} with all seven tools ({' '.join(SMALL_RL)}). Sampled rollouts, "
         "mean over each block of steps (the report draws every step).", ["RL steps", "AStar calls / sample"], rows),
        ("2. Adopt: vsp_nav before and after RL", "Greedy evaluation, all seven tools offered.",
         ["model", "vsp_nav accuracy", "AStar calls / sample", "format valid"], before_after),
        ("3. Discard: AStar offered on vsp_verify", "Same two models, evaluated with all seven tools and with every "
         "tool but AStar (which cannot help there).", ["model", "vsp_verify accuracy, AStar offered",
                                                       "AStar calls / sample", "accuracy without AStar"], discard),
    ]


def modulate_table(out):
    r = results(out, "eval_main")
    # Direct-SFT has no tools and is left out
    rows = [[label, num(calls(r[key]["vsp_nav"], "Point")), num(calls(r[key]["vsp_verify"], "Point"))]
            for key, label in MAIN if key != "direct"]
    return ("4. Modulate: Point calls per sample", "The paper: after RL the model calls Point more on the task "
            "where locating objects matters (vsp_nav: elf, gift and holes) than where one location suffices.",
            ["model", "vsp_nav", "vsp_verify"], rows)


def adl_table(out):
    canonical, randomized = results(out, "eval_adl_canonical"), results(out, "eval_adl_randomized")
    rows = []
    # each model under each naming: canonical, then randomized
    for key, label in (("tc", "TC"), ("tc_adl", "TC + ADL")):
        for cond, r in (("canonical", canonical), ("randomized", randomized)):
            rows.append([label, cond] + [with_ci(r[key][t]) for t in TASKS]
                        + [pct(mean(r[key][t]["accuracy"] for t in TASKS))])
    return ("5. ADL: canonical against randomized tool names", "Same TC data and budget; randomized: a fresh mapping "
            "(names, parameter names, paraphrased descriptions) per test example.", ["model", "names"] + TASKS
            + ["mean"], rows)


def transfer_table(out):
    tr = results(out, "eval_transfer")
    labels = [("tc", "TC jigsaw"), ("tc_adl", "TC jigsaw + ADL"), ("tctg", "TC jigsaw, TG 3 tasks"),
              ("tctg_adl", "TC jigsaw + ADL, TG 3 tasks + ADL")]
    # accuracy, then CPS, on the tasks TC never showed
    rows = [[label] + [with_ci(tr[key][t]) for t in UNSEEN] + [num(tr[key][t]["cps"]) for t in UNSEEN]
            for key, label in labels]
    return ("5. ADL transfer: tasks unseen in TC", f"TC data from jigsaw only ({' '.join(SMALL_TC)}); RL on "
            f"{TRANSFER_RL} ({' '.join(SMALL_RL)}).", ["model"] + [f"{t} accuracy" for t in UNSEEN]
            + [f"{t} calls / sample" for t in UNSEEN], rows)


def tool_table(out):
    r = results(out, "eval_main")
    # every main model but Direct-SFT (no tools), one row per task
    rows = [[label, t, pct(r[key][t]["accuracy"]), num(r[key][t]["cps"]), pct(r[key][t]["tool_success_rate"]),
             pct(r[key][t]["format_valid_rate"])] for key, label in MAIN if key != "direct" for t in TASKS]
    return ("6. Tool statistics", "CPS: tool calls per sample; success: share of calls that returned success.",
            ["model", "task", "accuracy", "CPS", "tool success", "format valid"], rows)


def at_least(interval, target):
    """A threshold read with a 95% interval (lo, hi): met when the whole interval clears it, not met when none of
    it does; otherwise the sample cannot tell."""
    lo, hi = interval
    return "yes" if lo >= target else "no" if hi < target else "inside the interval"


def all_met(*verdicts):
    """Several conditions of one target: not met if any is not, met if all are, else the sample cannot tell."""
    return "no" if "no" in verdicts else "yes" if all(v == "yes" for v in verdicts) else "inside the interval"


def points(interval, d):
    """'+34 points [+21, +46]': a difference of accuracies and its 95% interval."""
    return f"{100 * d:+.0f} points [{100 * interval[0]:+.0f}, {100 * interval[1]:+.0f}]"


def outcomes(out, step):
    """{model label: {(task, example id): score}} of an evaluation, from its trajectories: one score per test
    example. Every evaluation of a run draws the same test examples (one --seed and --n), so two models, or one
    model under two conditions, are compared example by example."""
    per = {}
    rows = read_jsonl(os.path.join(out, step, "trajectories.jsonl"), ("model", "task", "example_id", "score"),
                      lambda t: (t["model"], (t["task"], t["example_id"]), t["score"]))
    for model, example, score in rows:
        per.setdefault(model, {})[example] = score
    return per


def of_task(scores, task):
    return {k: v for k, v in scores.items() if k[0] == task}


def rate(scores):
    """{example: score} -> an accuracy and its Wilson interval, as rollout.metrics gives them."""
    k, n = sum(scores.values()), len(scores)
    return {"accuracy": k / n, "accuracy_ci": rollout.wilson(k, n)}


def paired_difference(x, y):
    """x, y: {example: score 0 or 1} on the same examples -> (x's accuracy minus y's, its 95% interval).
    Newcombe's square-and-add interval for paired data (Statistics in Medicine 1998, 17:2635): the two Wilson
    intervals, combined with how the two outcomes go together over the examples. Two runs that agree on most
    examples differ by little, and the interval says so: at 100 examples and 50% each, two independent samples'
    difference spans about +-14 points, two runs that disagree on 4 examples about +-4."""
    if not x or x.keys() != y.keys():
        raise ValueError("a paired difference needs the same examples on both sides, at least one")
    n = len(x)
    both = sum(x[k] * y[k] for k in x)
    only_x, only_y = sum(x.values()) - both, sum(y.values()) - both
    neither = n - both - only_x - only_y
    p1, p2 = (both + only_x) / n, (both + only_y) / n
    (l1, u1), (l2, u2) = rollout.wilson(both + only_x, n), rollout.wilson(both + only_y, n)
    # phi: the correlation of the two outcomes over the examples; a positive one shrunk by n/2 (Newcombe's correction)
    margins = (both + only_x) * (only_y + neither) * (both + only_y) * (only_x + neither)
    cross = both * neither - only_x * only_y
    phi = (max(0.0, cross - n / 2) if cross > 0 else cross) / math.sqrt(margins) if margins else 0.0
    d = p1 - p2
    return d, (d - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2),
               d + math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))


def compared(x, y):
    """'41% [32-51] vs 42% [33-52]: -1 points [-4, +2]' for the cell, and the difference's interval."""
    d, ci = paired_difference(x, y)
    return f"{with_ci(rate(x))} vs {with_ci(rate(y))}: {points(ci, d)}", ci


def separated(a, b):
    """a's interval entirely above b's: the two accuracies differ at this sample size."""
    return a["accuracy_ci"][0] > b["accuracy_ci"][1]


def targets(out, have):
    """The reproduction issue's targets (the paper's shape at the tiny scale), each with the measured figure; `have`:
    the finished steps (a target whose evaluations have not run yet is left out)."""
    checks = []
    r = results(out, "eval_main") if "eval_main" in have else None
    if r:
        checks += main_targets(r, outcomes(out, "eval_main"))
    if {"eval_adopt", "eval_discard"} <= have:
        checks += adopt_targets(results(out, "eval_adopt"), outcomes(out, "eval_adopt"),
                                outcomes(out, "eval_discard"))
    if r:
        nav, verify = calls(r["tctg"]["vsp_nav"], "Point"), calls(r["tctg"]["vsp_verify"], "Point")
        checks.append(("modulate: TC+TG's Point calls per sample on vsp_nav >= 2x vsp_verify",
                       f"{num(nav)} vs {num(verify)}", "yes" if nav >= 2 * verify else "no"))
    if {"eval_adl_canonical", "eval_adl_randomized"} <= have:
        checks.append(adl_target(outcomes(out, "eval_adl_canonical"), outcomes(out, "eval_adl_randomized")))
    if "eval_transfer" in have:
        checks.append(transfer_target(outcomes(out, "eval_transfer")))
    return ("Targets", "From the reproduction issue. A threshold is read with the accuracy's 95% Wilson interval, a "
            "gain or a loss with the 95% interval of the difference, paired over the same test examples: 'yes': the "
            "whole interval meets the target; 'no': none of it does; 'inside the interval': the sample cannot tell. "
            "The main table's comparisons ask for intervals apart, as the issue words them ('no' when they overlap), "
            "and show the paired difference beside them; 'Base lowest' compares the means, and calls per sample are "
            "read as measured.", ["target", "measured", "met"],
            [list(c) for c in checks])


def main_targets(r, o):
    """The main table's targets -> [(target, measured, met)]; r: eval_main's results, o: its outcomes. The verdicts
    read the issue's "intervals not overlapping"; each cell adds the paired difference (the same test examples on
    both sides), which separates two models that the overlapping intervals cannot."""
    checks = []
    # the absolute accuracy targets of TC+TG, per task
    for t, target in (("vsp_nav", 0.95), ("vsp_verify", 0.90), ("jigsaw", 0.90), ("guiqa", 0.90), ("vstar", 0.80)):
        checks.append((f"TC+TG >= {pct(target)} on {t}", with_ci(r["tctg"][t]),
                       at_least(r["tctg"][t]["accuracy_ci"], target)))
    apart = paired_apart = 0
    for t in TASKS:
        tctg, others = r["tctg"][t], [r["tc"][t], r["tg"][t]]
        above = all(tctg["accuracy"] > m["accuracy"] for m in others)
        clear = above and all(separated(tctg, m) for m in others)
        apart += clear  # tasks where TC+TG's interval clears both
        # TC+TG minus TC and minus TG, example by example
        diffs = [paired_difference(of_task(o["tctg"], t), of_task(o[key], t)) for key in ("tc", "tg")]
        paired_apart += all(lo > 0 for _, (lo, _) in diffs)
        verdict = "yes, intervals apart" if clear else "above, intervals overlap" if above else "no"
        checks.append((f"TC+TG above TC and TG on {t}",
                       f"{with_ci(tctg)} vs {with_ci(r['tc'][t])} / {with_ci(r['tg'][t])}; paired "
                       + " / ".join(points(ci, d) for d, ci in diffs), verdict))
    checks.append(("TC+TG's interval above both TC's and TG's on >= 3 tasks",
                   f"{apart} of {len(TASKS)} (paired: both differences above 0 on {paired_apart})",
                   "yes" if apart >= 3 else "no"))
    means = {key: mean(r[key][t]["accuracy"] for t in TASKS) for key, _ in MAIN}
    checks.append(("Base lowest (mean accuracy)", ", ".join(f"{label} {pct(means[key])}" for key, label in MAIN),
                   "yes" if all(means["base"] < v for k, v in means.items() if k != "base") else "no"))
    for t in ("vsp_nav", "vstar", "guiqa"):
        checks.append((f"Direct-SFT clearly below TC+TG on {t} (intervals apart)",
                       compared(of_task(o["direct"], t), of_task(o["tctg"], t))[0],
                       "yes" if separated(r["tctg"][t], r["direct"][t]) else "no"))
    return checks


def adopt_targets(a, oa, od):
    """Adopt and discard -> [(target, measured, met)]; a: eval_adopt's results (all seven tools offered), oa and od:
    eval_adopt's and eval_discard's outcomes (vsp_verify without AStar); greedy evaluations before and after RL."""
    before, after = calls(a["before"]["vsp_nav"], "AStar"), calls(a["after"]["vsp_nav"], "AStar")
    gain, gain_ci = compared(of_task(oa["after"], "vsp_nav"), of_task(oa["before"], "vsp_nav"))
    discard = calls(a["after"]["vsp_verify"], "AStar")  # eval_adopt offers AStar on vsp_verify too
    # every tool's calls: a policy that RL taught to call no tool at all meets the letter of the target without
    # discarding anything, and the verdict says so
    any_tool = a["after"]["vsp_verify"]["cps"]
    # after RL, AStar offered against not: within 5 points = the gap's interval inside [-5, +5]
    gap, (lo, hi) = compared(of_task(oa["after"], "vsp_verify"), of_task(od["after"], "vsp_verify"))
    met = all_met("yes" if discard <= 0.1 else "no", at_least((lo, hi), -0.05), at_least((-hi, -lo), -0.05))
    return [("adopt: AStar calls per vsp_nav sample < 0.1 before RL, >= 0.8 after", f"{num(before)} -> {num(after)}",
             "yes" if before < 0.1 and after >= 0.8 else "no"),
            ("adopt: vsp_nav accuracy up >= 30 points over RL", f"{gain} (after vs before)",
             at_least(gain_ci, 0.30)),  # 0.30: 30 points
            ("discard: after RL <= 0.1 AStar calls per vsp_verify sample, accuracy within 5 points of the run without "
             "AStar", f"{num(discard)} calls ({num(any_tool)} of any tool); {gap} (offered vs not)",
             "yes, by the letter: no tool is called at all" if met == "yes" and any_tool < 0.1 else met)]


def adl_target(canonical, randomized):
    """The ADL target -> (target, measured, met); canonical, randomized: the two evaluations' outcomes. Each model's
    accuracy over every task together and the points it loses under random names; the cell shows both accuracies,
    since a model weak under either naming also "loses" nothing."""
    cells, loss = {}, {}
    for key in ("tc", "tc_adl"):
        cells[key], loss[key] = compared(canonical[key], randomized[key])  # canonical minus randomized
    lo, hi = loss["tc_adl"]
    # loses <= 10 points: minus the loss >= -10
    return ("ADL: the ADL model loses <= 10 points under random names, the non-ADL model >= 20",
            f"ADL {cells['tc_adl']}; non-ADL {cells['tc']} (canonical vs random names)",
            all_met(at_least((-hi, -lo), -0.10), at_least(loss["tc"], 0.20)))


def transfer_target(tr):
    """The ADL transfer target -> (target, measured, met); tr: eval_transfer's outcomes. Above: the difference's
    interval at or above 0."""
    cells = {t: compared(of_task(tr["tctg_adl"], t), of_task(tr["tctg"], t)) for t in UNSEEN}
    return ("ADL transfer: TC jigsaw + ADL, TG 3 tasks above the non-ADL run on both unseen tasks",
            "; ".join(f"{t} {cells[t][0]}" for t in UNSEEN) + " (ADL vs not)",
            all_met(*(at_least(cells[t][1], 0.0) for t in UNSEEN)))


def timing_table(done):
    # commands in backticks: code in summary.md; report_html strips them again
    rows = [[name, f"{d['seconds'] / 60:.1f}", f"`{d['command']}`"] for name, d in done.items()]
    rows.append(["total", f"{sum(d['seconds'] for d in done.values()) / 60:.1f}", ""])
    return ("Steps", "Wall minutes of each step; every command runs on its own.", ["step", "minutes", "command"], rows)

# -----------------------------------------------------------------------------
# writing


def markdown(sections, head):
    out = [head]
    for title, note, header, rows in sections:
        out += [f"\n### {title}\n", note + "\n", md_table(header, rows)]
    return "\n".join(out) + "\n"


def report_html(sections, head, links, figures):
    """The summary's tables as one page; figures: {section title: inline SVG} drawn under that section's table."""
    h = ["<!doctype html><meta charset='utf-8'><title>AdaReasoner tiny reproduction</title><style>"
         "body{font:14px sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:.5em 0 1.5em}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
         "code{font-size:12px}" + CHART_CSS + "</style>",
         f"<h1>AdaReasoner: tiny reproduction</h1><p>{html.escape(head)}</p>"]
    for title, note, header, rows in sections:
        # html_table escapes every cell; the backticks are Markdown only
        h.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(note)}</p>"
                 + html_table(header, [[str(c).strip("`") for c in row] for row in rows]) + figures.get(title, ""))
    h.append("<h2>Per-experiment reports</h2><p>Trajectories with their images, training curves:</p><ul>")
    # relative links: the page still works when OUT moves
    h += [f"<li><a href='{name}/report.html'>{name}</a></li>" for name in links]
    return "\n".join(h) + "</ul>\n"


# the summary's sections in order, each with the steps it reads: a run that has not finished yet (see
# --report-only) gets the sections whose steps are done
SECTIONS = [(main_table, {"eval_main"}), (adopt_tables, {"tg_adopt", "eval_adopt", "eval_discard"}),
            (modulate_table, {"eval_main"}), (adl_table, {"eval_adl_canonical", "eval_adl_randomized"}),
            (transfer_table, {"eval_transfer"}), (tool_table, {"eval_main"})]


def write_report(out, done, plan, command):
    """OUT/summary.md and OUT/report.html from the finished steps `done` of `plan`; command: the reproduce.py command
    line that ran them, for the summary's first line."""
    have = set(done)
    sections = []
    for build, needs in SECTIONS:
        if needs <= have:
            part = build(out)
            sections += part if isinstance(part, list) else [part]  # adopt_tables returns three
    sections += [targets(out, have), timing_table(done)]
    total = sum(d["seconds"] for d in done.values()) / 60
    missing = [name for name, _ in plan if name not in have]
    evals = [name for name in done if name.startswith("eval_")]  # each has its own report.html to link
    n = examples_per_task(results(out, evals[0])) if evals else None
    head = (f"`{command}` on {os.cpu_count()} CPU cores: {total:.0f} min of steps"
            + (f", evaluations on {n} test examples per task." if n else ".")
            + (f" Not finished yet: {', '.join(missing)} (run `python reproduce.py` again to continue)."
               if missing else ""))
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(markdown(sections, "## Reproduction summary\n\n" + head))
    with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as f:
        # the adopt curve, AStar calls per vsp_nav sample at every RL step, under its table
        curve = adopt_curve(out) if ADOPT_CURVE in [title for title, *_ in sections] else []
        figures = {ADOPT_CURVE: svg_lines("AStar calls per vsp_nav sample during RL", {"AStar / sample": curve})
                   } if curve else {}
        f.write(report_html(sections, head.replace("`", ""), evals, figures))
    print(markdown(sections[:-1], head))  # the console leaves out the timing table
    print(f"wrote {out}/summary.md and {out}/report.html")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    plan = steps(args.out, args.device, args.seed, args.quick, args.reward, args.eval_n)
    if args.report_only:  # no step runs: the tables come from the outputs already there (of a finished run or not)
        done = rollout.read_json(os.path.join(args.out, "steps.json"))
    else:
        done = run_steps(args.out, plan)
    # plan order, and only this plan's steps (steps.json may hold steps of an earlier plan); the summary names the
    # command that ran the steps, not the --report-only call that rewrote it
    command = shlex.join(["python", "reproduce.py"] + [a for a in argv if a != "--report-only"])
    write_report(args.out, {name: done[name] for name, _ in plan if name in done}, plan, command)


if __name__ == "__main__":
    rollout.cli(main)
