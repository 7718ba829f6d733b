"""
Reproduce AdaReasoner's findings on the tiny default, from nothing, with one command.

    python reproduce.py                      # the full run: about 2 hours on a 2-core CPU
    nohup python reproduce.py > runs/repro.log 2>&1 &
    python reproduce.py --quick              # every step at its smallest: a smoke check of the whole pipeline

Every step is a plain stage command (python coldstart.py / grpo.py / evaluate.py ...), run as a subprocess with
its output in OUT/logs/STEP.log, so any step can be rerun by hand from the command printed in the summary.
A finished step is recorded in OUT/steps.json and skipped on the next call: an interrupted run continues
where it stopped (a training step resumes from its last checkpoint). At the end the outputs are read back
and summarized in OUT/summary.md and OUT/report.html (the per-experiment evaluate.py reports hold the
browsable trajectories and the training curves).

Experiments (the paper's, at the tiny scale):
  1. main table: accuracy per task of Direct-SFT (coldstart --no-tools, the stand-in for an instruction-tuned
     base), TC, TG (Tool-GRPO from the Direct-SFT base, no TC) and TC+TG, tools offered.
  2. adopt: TC data without AStar (vsp_nav, vsp_verify), AStar offered only in RL on vsp_nav: AStar calls per
     vsp_nav sample over the RL steps, vsp_nav accuracy before and after.
  3. discard: the same two models on vsp_verify with AStar offered at inference only (it never was in training
     on that task): accuracy and AStar calls per sample, before and after RL.
  4. modulate: Point calls per sample on vsp_nav against vsp_verify after TC+TG.
  5. ADL: TC with and without --adl on the same data, evaluated with canonical and randomized tool names;
     transfer: TC data from jigsaw only, RL on jigsaw + vsp_verify + guiqa, with and without ADL, accuracy on
     the two tasks unseen in TC.
  6. tool statistics: calls per sample and tool success rate per task (main-table models).
Experiments 2, 3 and 5-transfer use smaller configurations than the stage defaults (see SMALL below).
"""
import argparse
import html
import json
import os
import shlex
import subprocess
import sys
import time

import rollout
from evaluate import html_table, md_table
from rollout import mean
from tasks import TASKS as TASK_NAMES
from tools import TOOLS

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default="runs/repro", help="output directory (one subdirectory per step)")
parser.add_argument("--eval-n", type=int, default=20, help="test examples per task in every evaluation")
rollout.add_device_flag(parser, "every stage runs")
parser.add_argument("--seed", type=int, default=0, help="passed to every stage")
parser.add_argument("--quick", action="store_true", help="every stage with its own --quick: minutes, for tests")
parser.add_argument("--report-only", action="store_true", help="rewrite summary.md and report.html from finished steps")

# experiments 2, 3 and 5-transfer: smaller than the stage defaults so the whole run fits in ~2 h on 2 cores
SMALL_TC = ["--n-per-task", "300", "--epochs", "2"]
SMALL_RL = ["--steps", "30"]
NO_ASTAR = ",".join(t for t in TOOLS if t != "AStar")
TRANSFER_RL = "jigsaw,vsp_verify,guiqa"
TASKS = list(TASK_NAMES)
UNSEEN = ["vsp_verify", "guiqa"]
MAIN = [("direct", "Direct-SFT"), ("tc", "TC"), ("tg", "TG"), ("tctg", "TC+TG")]

# -----------------------------------------------------------------------------
# the steps


def steps(args):
    """[(name, argv)] in run order; every path is under args.out."""
    common = ["--device", args.device, "--seed", str(args.seed)] + (["--quick"] if args.quick else [])
    small_tc, small_rl = ([], []) if args.quick else (SMALL_TC, SMALL_RL)  # --quick sizes win over SMALL

    def o(*parts):
        return os.path.join(args.out, *parts)

    def model(step):
        return o(step, "model")

    def coldstart(name, *a):
        return name, ["coldstart.py", "--out", o(name), "--eval-n", "0", *a, *common]

    def grpo(name, init, *a):
        return name, ["grpo.py", "--init", model(init), "--out", o(name), "--eval-n", "0", *a, *common]

    def evaluate(name, models, *a):
        return name, ["evaluate.py", "--models", ",".join(f"{k}={v}" for k, v in models), "--out", o(name),
                      "--n", str(args.eval_n), *a, *common]

    return [
        # 1. main table (stage defaults) and 4. modulate, 6. tool statistics
        coldstart("direct", "--no-tools"),
        coldstart("tc"),
        grpo("tg", "direct", "--tools", "all"),
        grpo("tctg", "tc"),
        evaluate("eval_main", [("direct", model("direct") + ":none"), ("tc", model("tc")), ("tg", model("tg")),
                               ("tctg", model("tctg"))],
                 "--curves", ",".join(f"{s}={o(s, 'log.jsonl')}" for s in ("tc", "tg", "tctg"))),
        # 2. adopt and 3. discard
        coldstart("tc_noastar", "--tasks", "vsp_nav,vsp_verify", "--tools", NO_ASTAR, *small_tc),
        grpo("tg_adopt", "tc_noastar", "--tasks", "vsp_nav", "--tools", "all", *small_rl),
        evaluate("eval_adopt", [("before", model("tc_noastar")), ("after", model("tg_adopt"))],
                 "--tasks", "vsp_nav,vsp_verify", "--tools", "all", "--curves", f"adopt={o('tg_adopt', 'log.jsonl')}"),
        # 5. ADL: the same data as tc, a fresh mapping per trajectory
        coldstart("tc_adl", "--adl"),
        evaluate("eval_adl_canonical", [("tc", model("tc")), ("tc_adl", model("tc_adl"))], "--adl", "off"),
        evaluate("eval_adl_randomized", [("tc", model("tc")), ("tc_adl", model("tc_adl"))], "--adl", "per-sample"),
        # 5. transfer: TC on jigsaw only, RL on three tasks
        coldstart("tc_jigsaw", "--tasks", "jigsaw", *small_tc),
        coldstart("tc_jigsaw_adl", "--tasks", "jigsaw", "--adl", *small_tc),
        grpo("tg_transfer", "tc_jigsaw", "--tasks", TRANSFER_RL, *small_rl),
        grpo("tg_transfer_adl", "tc_jigsaw_adl", "--tasks", TRANSFER_RL, "--adl", *small_rl),
        evaluate("eval_transfer", [("tc", model("tc_jigsaw")), ("tc_adl", model("tc_jigsaw_adl")),
                                   ("tctg", model("tg_transfer")), ("tctg_adl", model("tg_transfer_adl"))],
                 "--tasks", ",".join(UNSEEN)),
    ]


def run_steps(args, plan):
    """Run every step not yet recorded as done; stop at the first failure (its log names the cause)."""
    done_path = os.path.join(args.out, "steps.json")
    done = json.load(open(done_path)) if os.path.exists(done_path) else {}
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    for i, (name, argv) in enumerate(plan, 1):
        command = " ".join(shlex.quote(a) for a in ["python"] + argv)
        if done.get(name, {}).get("command") == command:
            print(f"[{i}/{len(plan)}] {name}: done ({done[name]['seconds']:.0f} s), skipped")
            continue
        # a kill can leave only ckpt.tmp or ckpt.old (rollout.find_checkpoint)
        ckpt = os.path.join(args.out, name, "ckpt")
        resume = ["--resume"] if argv[0] != "evaluate.py" and any(os.path.isdir(ckpt + s)
                                                                  for s in ("", ".tmp", ".old")) else []
        print(f"[{i}/{len(plan)}] {name}: {command}{' --resume' if resume else ''}", flush=True)
        log_path = os.path.join(args.out, "logs", f"{name}.log")
        t0 = time.perf_counter()
        with open(log_path, "a") as log:
            # the stage scripts sit next to this file; paths in argv stay relative to the caller's directory
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), argv[0])
            rc = subprocess.call([sys.executable, script] + argv[1:] + resume, stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t0
        if rc != 0:
            sys.exit(f"step {name} failed (exit {rc}) after {seconds:.0f} s; see {log_path}. "
                     "Rerunning reproduce.py continues from this step.")
        done[name] = {"command": command, "seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(done_path + ".tmp", "w") as f:
            json.dump(done, f, indent=1)
        os.replace(done_path + ".tmp", done_path)
        print(f"    {seconds:.0f} s", flush=True)
    return done

# -----------------------------------------------------------------------------
# reading the outputs back into tables: (title, note, header, rows)


def results(args, step):
    return json.load(open(os.path.join(args.out, step, "results.json")))["results"]


def pct(v):
    return "n/a" if v is None else f"{100 * v:.0f}%"


def num(v):
    return "n/a" if v is None else f"{v:.2f}"


def calls(r, tool):
    return r["calls_per_sample_per_tool"].get(tool, 0.0)


def main_table(args):
    r = results(args, "eval_main")
    rows = [[label] + [pct(r[key][t]["accuracy"]) for t in TASKS] + [pct(mean(r[key][t]["accuracy"] for t in TASKS))]
            for key, label in MAIN]
    return ("1. Main table: accuracy, tools offered", f"{args.eval_n} test examples per task, greedy.",
            ["model"] + TASKS + ["mean"], rows)


def adopt_tables(args):
    log = [json.loads(line) for line in open(os.path.join(args.out, "tg_adopt", "log.jsonl"))]
    log = [rec for rec in log if "by_task" in rec]
    chunks = max(1, min(5, len(log)))
    size = -(-len(log) // chunks)
    rows = []
    for k in range(0, len(log), size):
        part = log[k:k + size]
        rows.append([f"{part[0]['step']}-{part[-1]['step']}",
                     num(mean(calls(rec["by_task"]["vsp_nav"], "AStar") for rec in part)),
                     pct(mean(rec["accuracy"] for rec in part))])
    r = results(args, "eval_adopt")
    before_after = [[label, pct(r[label]["vsp_nav"]["accuracy"]), num(calls(r[label]["vsp_nav"], "AStar")),
                     pct(r[label]["vsp_nav"]["format_valid_rate"])] for label in ("before", "after")]
    discard = [[label, pct(r[label]["vsp_verify"]["accuracy"]), num(calls(r[label]["vsp_verify"], "AStar")),
                num(r[label]["vsp_verify"]["cps"])] for label in ("before", "after")]
    return [
        ("2. Adopt: AStar calls per vsp_nav sample during RL", "TC data without AStar (vsp_nav, vsp_verify; "
         f"{' '.join(SMALL_TC)}); RL on vsp_nav with all seven tools ({' '.join(SMALL_RL)}). Sampled rollouts, "
         "mean over each block of steps.", ["RL steps", "AStar calls / sample", "training accuracy"], rows),
        ("2. Adopt: vsp_nav before and after RL", "Greedy evaluation, all seven tools offered.",
         ["model", "vsp_nav accuracy", "AStar calls / sample", "format valid"], before_after),
        ("3. Discard: AStar offered on vsp_verify at inference only", "Same two models; AStar was never offered on "
         "vsp_verify in training.", ["model", "vsp_verify accuracy", "AStar calls / sample", "all calls / sample"],
         discard),
    ]


def modulate_table(args):
    r = results(args, "eval_main")
    rows = [[label, num(calls(r[key]["vsp_nav"], "Point")), num(calls(r[key]["vsp_verify"], "Point"))]
            for key, label in MAIN[1:]]
    return ("4. Modulate: Point calls per sample", "The paper: after RL the model calls Point more on the task "
            "where locating objects matters (vsp_nav: elf, gift and holes) than where one location suffices.",
            ["model", "vsp_nav", "vsp_verify"], rows)


def adl_tables(args):
    canonical, randomized = results(args, "eval_adl_canonical"), results(args, "eval_adl_randomized")
    rows = []
    for key, label in (("tc", "TC"), ("tc_adl", "TC + ADL")):
        for cond, r in (("canonical", canonical), ("randomized", randomized)):
            rows.append([label, cond] + [pct(r[key][t]["accuracy"]) for t in TASKS]
                        + [pct(mean(r[key][t]["accuracy"] for t in TASKS))])
    tr = results(args, "eval_transfer")
    labels = [("tc", "TC jigsaw"), ("tc_adl", "TC jigsaw + ADL"), ("tctg", "TC jigsaw, TG 3 tasks"),
              ("tctg_adl", "TC jigsaw + ADL, TG 3 tasks + ADL")]
    transfer = [[label] + [pct(tr[key][t]["accuracy"]) for t in UNSEEN] + [num(tr[key][t]["cps"]) for t in UNSEEN]
                for key, label in labels]
    return [
        ("5. ADL: canonical against randomized tool names", "Same TC data and budget; randomized: a fresh mapping "
         "(names, parameter names, paraphrased descriptions) per test example.", ["model", "names"] + TASKS + ["mean"],
         rows),
        ("5. ADL transfer: tasks unseen in TC", f"TC data from jigsaw only ({' '.join(SMALL_TC)}); RL on "
         f"{TRANSFER_RL} ({' '.join(SMALL_RL)}).", ["model"] + [f"{t} accuracy" for t in UNSEEN]
         + [f"{t} calls / sample" for t in UNSEEN], transfer),
    ]


def tool_table(args):
    r = results(args, "eval_main")
    rows = [[label, t, pct(r[key][t]["accuracy"]), num(r[key][t]["cps"]), pct(r[key][t]["tool_success_rate"]),
             pct(r[key][t]["format_valid_rate"])] for key, label in MAIN[1:] for t in TASKS]
    return ("6. Tool statistics", "CPS: tool calls per sample; success: share of calls that returned success.",
            ["model", "task", "accuracy", "CPS", "tool success", "format valid"], rows)


def targets(args):
    """The issue's targets that carry the paper's shape to the tiny scale, each with the measured figure."""
    r, a = results(args, "eval_main"), results(args, "eval_adopt")

    def acc(key, t):
        return r[key][t]["accuracy"]

    checks = [("TC+TG >= 95% on vsp_nav", pct(acc("tctg", "vsp_nav")), acc("tctg", "vsp_nav") >= 0.95)]
    for t in ("jigsaw", "guiqa", "vsp_verify"):
        checks.append((f"TC+TG >= 90% on {t}", pct(acc("tctg", t)), acc("tctg", t) >= 0.90))
    for t in TASKS:
        ok = acc("tctg", t) > max(acc("tc", t), acc("tg", t))
        checks.append((f"TC+TG above TC and TG on {t}",
                       f"{pct(acc('tctg', t))} vs {pct(acc('tc', t))} / {pct(acc('tg', t))}", ok))
    for t in ("vsp_nav", "vstar"):
        ok = acc("direct", t) + 0.10 <= acc("tctg", t)
        checks.append((f"Direct-SFT clearly below TC+TG on {t} (10 points)",
                       f"{pct(acc('direct', t))} vs {pct(acc('tctg', t))}", ok))
    adopt = calls(a["after"]["vsp_nav"], "AStar")
    checks.append(("adopt: AStar calls per vsp_nav sample >= 1 after RL",
                   f"{num(calls(a['before']['vsp_nav'], 'AStar'))} -> {num(adopt)}", adopt >= 1))
    discard = calls(a["after"]["vsp_verify"], "AStar")
    checks.append(("discard: AStar calls per vsp_verify sample < 0.2 after RL", num(discard), discard < 0.2))
    return ("Targets", "From the issue; met means the paper's shape holds at this scale.",
            ["target", "measured", "met"],
            [[name, value, "yes" if ok else "no"] for name, value, ok in checks])


def timing_table(done):
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


def report_html(sections, head, links):
    h = ["<!doctype html><meta charset='utf-8'><title>AdaReasoner tiny reproduction</title><style>"
         "body{font:14px sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:.5em 0 1.5em}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
         "code{font-size:12px}</style>", f"<h1>AdaReasoner: tiny reproduction</h1><p>{html.escape(head)}</p>"]
    for title, note, header, rows in sections:
        h.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(note)}</p>"
                 + html_table(header, [[str(c).strip("`") for c in row] for row in rows]))
    h.append("<h2>Per-experiment reports</h2><p>Trajectories with their images, training curves:</p><ul>")
    h += [f"<li><a href='{name}/report.html'>{name}</a></li>" for name in links]
    return "\n".join(h) + "</ul>\n"


def write_report(args, done):
    sections = [main_table(args), *adopt_tables(args), modulate_table(args), *adl_tables(args), tool_table(args),
                targets(args), timing_table(done)]
    total = sum(d["seconds"] for d in done.values()) / 60
    head = (f"`python reproduce.py{' --quick' if args.quick else ''}` on {os.cpu_count()} CPU cores"
            f"{', --device ' + args.device if args.device != 'auto' else ''}: {total:.0f} min of steps, "
            f"evaluations on {args.eval_n if not args.quick else 2} test examples per task.")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(markdown(sections, "## Reproduction summary\n\n" + head))
    evals = [name for name in done if name.startswith("eval_")]
    with open(os.path.join(args.out, "report.html"), "w") as f:
        f.write(report_html(sections, head.replace("`", ""), evals))
    print(markdown(sections[:-1], head))
    print(f"wrote {args.out}/summary.md and {args.out}/report.html")


def main(argv=None):
    args = parser.parse_args(argv)
    plan = steps(args)
    if args.report_only:
        done = json.load(open(os.path.join(args.out, "steps.json")))
    else:
        done = run_steps(args, plan)
    write_report(args, {name: done[name] for name, _ in plan if name in done})


if __name__ == "__main__":
    rollout.cli(main)
