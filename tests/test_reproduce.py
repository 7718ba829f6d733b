"""reproduce.py --quick: every stage and experiment runs from nothing, the summary holds every table, and a
second call skips the finished steps."""
import json
import re
import subprocess
import sys

import pytest

import reproduce

ROOT = reproduce.os.path.dirname(reproduce.os.path.abspath(reproduce.__file__))


def test_quick_runs_every_step_and_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "repro"
    cmd = [sys.executable, "reproduce.py", "--quick", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # the plan of that very command line: its flags read by reproduce's parser, the others at their defaults
    flags = reproduce.parser.parse_args(cmd[2:])
    plan = dict(reproduce.steps(flags.out, flags.device, flags.seed, flags.quick, flags.reward, flags.eval_n))
    names = list(plan)
    done = json.load(open(out / "steps.json"))
    assert list(done) == names
    summary = (out / "summary.md").read_text()
    for title in ["1. Main table", "2. Adopt", "3. Discard", "4. Modulate", "5. ADL", "5. ADL transfer",
                  "6. Tool statistics", "Targets", "Steps"]:
        assert f"### {title}" in summary, title
    for label in ["| Base |", "| Direct-SFT |", "| TC |", "| TG |", "| TC+TG |"]:
        assert label in summary
    # every accuracy of the main table carries its 95% Wilson interval, and the targets are read with it
    base_row = next(line for line in summary.splitlines() if line.startswith("| Base |"))
    assert re.search(r"\| \d+% \[\d+-\d+\] \|", base_row), base_row
    assert "| TC+TG's interval above both TC's and TG's on >= 3 tasks |" in summary
    report = (out / "report.html").read_text()
    assert "<table>" in report and "AStar calls per vsp_nav sample during RL</text>" in report  # the adopt curve
    # TG starts from the pretrained base, and the discard run without AStar offers every other tool
    assert plan["tg"][plan["tg"].index("--init") + 1] == "tiny"
    # every RL step gets reproduce's --reward (accuracy by default), no other step does
    assert [n for n, a in plan.items() if "--reward" in a] == ["tg", "tctg", "tg_adopt", "tg_transfer",
                                                               "tg_transfer_adl"]
    assert all(plan[n][plan[n].index("--reward") + 1] == "accuracy" for n in ("tg", "tctg", "tg_adopt"))
    assert plan["eval_discard"][plan["eval_discard"].index("--tools") + 1] == reproduce.NO_ASTAR
    # the calls below run here (this process has run torch work: run_stage must not fork from it, and no step runs)
    monkeypatch.setattr(reproduce, "run_stage", lambda *a: pytest.fail(f"a finished step ran again: {a}"))
    capsys.readouterr()
    reproduce.main(cmd[2:])
    assert capsys.readouterr().out.count("skipped") == len(names)
    assert json.load(open(out / "steps.json")) == done
    # a run stopped after the main table: --report-only writes the sections it can and names the steps to come
    first = names[:names.index("eval_main") + 1]
    (out / "steps.json").write_text(json.dumps({k: done[k] for k in first}))
    reproduce.main(cmd[2:] + ["--report-only"])
    summary = (out / "summary.md").read_text()
    assert "### 1. Main table" in summary and "### 6. Tool statistics" in summary and "| TC+TG >= 95% on vsp_nav |" \
        in summary
    assert "### 2. Adopt" not in summary and "### 5. ADL" not in summary and "ADL transfer:" not in summary
    assert f"Not finished yet: {', '.join(names[len(first):])} (run `python reproduce.py` again" in summary
    # the first line names the command that ran the steps (not the --report-only call) and the test size it used
    head = summary.splitlines()[2]
    assert head.startswith(f"`python reproduce.py --quick --device cpu --out {out}` on "), head
    assert "evaluations on 2 test examples per task" in head, head


def scores(right, n=100, task="vsp_nav"):
    """One model's outcomes on n test examples of a task: the examples in `right` (a range or a set) answered."""
    return {(task, f"{task}-test-{i}"): float(i in right) for i in range(n)}


def test_a_paired_difference_matches_the_published_interval():
    # Fagerland, Lydersen and Laake, The Paired 2x2 Table (Cavo et al. 2012): 59 both, 6 and 16 one side only, 80
    # neither -> -0.0621 [-0.1186, -0.0046] by Newcombe's square-and-add
    x, y = scores(range(65), 161), scores(set(range(59)) | set(range(65, 81)), 161)
    d, ci = reproduce.paired_difference(x, y)
    assert d == pytest.approx(-0.0621, abs=1e-4) and ci == pytest.approx((-0.1186, -0.0046), abs=1e-4)
    # the same accuracies on disjoint examples (never both right: outcomes that go against each other) give a wider one
    _, wide = reproduce.paired_difference(scores(range(65), 161), scores(range(86, 161), 161))
    assert wide[1] - wide[0] > 1.5 * (ci[1] - ci[0])
    with pytest.raises(ValueError, match="the same examples"):
        reproduce.paired_difference(x, scores(range(3), 160))
    assert reproduce.all_met("yes", "inside the interval") == "inside the interval"
    assert reproduce.all_met("yes", "inside the interval", "no") == "no"


@pytest.mark.parametrize("after, met", [(range(70), "yes"), (range(5, 45), "inside the interval"),
                                        (range(15), "no")])
def test_adopt_and_discard_read_their_differences_with_paired_intervals(after, met):
    """vsp_nav 10% -> 70%; 10% -> 40% with half the earlier successes lost (30 points up, the interval reaching below
    30); 10% -> 15%."""
    nav = lambda right: scores(right)  # noqa: E731
    verify = lambda right: scores(right, task="vsp_verify")  # noqa: E731
    a = {"before": {"vsp_nav": {"calls_per_sample_per_tool": {}}},
         "after": {"vsp_nav": {"calls_per_sample_per_tool": {"AStar": 1.0}},
                   "vsp_verify": {"calls_per_sample_per_tool": {"Point": 1.0}, "cps": 1.0}}}
    oa = {"before": nav(range(10)), "after": {**nav(after), **verify(range(41))}}
    calls, gain, discard = reproduce.adopt_targets(a, oa, {"after": verify(range(42))})
    assert calls[2] == "yes" and gain[2] == met
    # one example apart of 100, the others answered alike: [-4, +2] lies inside +-5 points (unpaired: [-14, +12])
    assert discard[2] == "yes" and "41% [32-51] vs 42% [33-52]: -1 points [-4, +2]" in discard[1], discard[1]
    assert discard[1].startswith("0.00 calls (1.00 of any tool); "), discard[1]
    # the same figures from a policy that calls no tool at all: met only by the letter, and the verdict says so
    a["after"]["vsp_verify"].update(calls_per_sample_per_tool={}, cps=0.0)
    assert reproduce.adopt_targets(a, oa, {"after": verify(range(42))})[2][2] == \
        "yes, by the letter: no tool is called at all"
    a["after"]["vsp_verify"].update(calls_per_sample_per_tool={"Point": 1.0}, cps=1.0)
    oa["after"].update(verify(range(20, 61)))  # the same 41%, but on other examples: 39 disagreements
    assert reproduce.adopt_targets(a, oa, {"after": verify(range(42))})[2][2] == "inside the interval"
    for offered in (range(10), range(60)):  # far below and far above the run without AStar
        oa["after"].update(verify(offered))
        assert reproduce.adopt_targets(a, oa, {"after": verify(range(42))})[2][2] == "no", offered


def test_adl_and_transfer_read_losses_and_gains_with_paired_intervals():
    def every(right):  # the same examples answered on each of the five tasks: 100 x 5
        return {k: v for t in reproduce.TASKS for k, v in scores(right, task=t).items()}
    # ADL loses 2 points (48 of 50 kept on every task), non-ADL 30 (20 of 50 kept)
    row = reproduce.adl_target({"tc": every(range(50)), "tc_adl": every(range(50))},
                               {"tc": every(range(20)), "tc_adl": every(range(48))})
    assert row[2] == "yes" and "ADL 50% [46-54] vs 48% [44-52]: +2 points" in row[1], row[1]
    row = reproduce.adl_target({"tc": every(range(50)), "tc_adl": every(range(50))},
                               {"tc": every(range(40, 72)), "tc_adl": every(range(48))})
    assert row[2] == "inside the interval", row[1]  # 18 points down, other examples right: cannot tell it from 20
    row = reproduce.adl_target({"tc": every(range(50)), "tc_adl": every(range(50))},
                               {"tc": every(range(20)), "tc_adl": every(range(20))})
    assert row[2] == "no", row[1]  # the ADL model loses 30 points too

    def unseen(right):
        return {k: v for t in reproduce.UNSEEN for k, v in scores(right, task=t).items()}
    transfer = lambda adl, plain: reproduce.transfer_target({"tctg_adl": unseen(adl), "tctg": unseen(plain)})[2]  # noqa
    assert transfer(range(60), range(30)) == "yes"
    assert transfer(range(5, 37), range(30)) == "inside the interval"  # 7 won, 5 lost
    assert transfer(range(10), range(30)) == "no"


def test_a_failing_step_stops_the_run_and_names_its_log(tmp_path):
    plan = [("broken", ["coldstart.py", "--tools", "NoSuchTool", "--out", str(tmp_path / "broken")])]
    try:
        reproduce.run_steps(str(tmp_path), plan)
    except SystemExit as e:
        message = str(e)
    else:
        raise AssertionError("the failing step did not stop the run")
    assert "step broken failed" in message and "logs/broken.log" in message
    assert "unknown tools ['NoSuchTool']" in (tmp_path / "logs" / "broken.log").read_text()


def test_a_changed_step_runs_again_with_every_step_that_reads_it_and_starts_afresh(tmp_path):
    """Steps are skipped by command; a step run again (new command) starts without --resume (its old checkpoint is
    removed) and the later steps that read its outputs run again, while a step that does not read them stays skipped."""
    script = tmp_path / "stage.py"  # a stand-in stage: appends its arguments to calls.txt, makes OUT/ckpt
    script.write_text("import os, sys\nout = sys.argv[sys.argv.index('--out') + 1]\n"
                      "os.makedirs(os.path.join(out, 'ckpt'), exist_ok=True)\n"
                      f"open({str(tmp_path / 'calls.txt')!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n")
    out = tmp_path / "repro"

    def plan(flag):
        return [("a", [str(script), "--out", str(out / "a"), "--lr", flag]),
                ("b", [str(script), "--init", str(out / "a" / "model"), "--out", str(out / "b")]),
                ("c", [str(script), "--init", "tiny", "--out", str(out / "c")]),
                ("ab", [str(script), "--out", str(out / "ab")])]  # 'ab' must not read as a reader of 'a'

    def calls():
        lines = (tmp_path / "calls.txt").read_text().splitlines() if (tmp_path / "calls.txt").exists() else []
        return [line.split("--out ")[1].split()[0].rsplit("/", 1)[1] + (" resumed" if "--resume" in line else "")
                for line in lines]

    reproduce.run_steps(str(out), plan("1"))
    assert calls() == ["a", "b", "c", "ab"]
    reproduce.run_steps(str(out), plan("1"))
    assert calls() == ["a", "b", "c", "ab"]  # all skipped
    (out / "a" / "ckpt" / "old").write_text("from the first run")
    done = reproduce.run_steps(str(out), plan("2"))
    # a ran afresh (no --resume, its old checkpoint gone), b read it and ran again; c and ab did not
    assert calls()[4:] == ["a", "b"]
    assert not (out / "a" / "ckpt" / "old").exists()
    assert list(done) == ["a", "b", "c", "ab"] and "--lr 2" in done["a"]["command"]
    # interrupted: a step not recorded as done with a checkpoint on disk resumes
    del done["b"]
    (out / "steps.json").write_text(json.dumps(done))
    reproduce.run_steps(str(out), plan("2"))
    assert calls()[6:] == ["b resumed"]


@pytest.mark.parametrize("body, code, logged", [
    ("print('hello', sys.argv[1:], os.path.basename(sys.path[0]))", 0, "hello ['--x', '1'] stand"),
    ("sys.exit('bad flag value')", 1, "bad flag value"),
    ("sys.exit(3)", 3, ""),
    ("raise RuntimeError('kernel failed')", 1, "RuntimeError: kernel failed"),
    ("os.write(2, b'from C level')", 0, "from C level"),
])
def test_a_forked_step_behaves_as_a_fresh_interpreter(tmp_path, monkeypatch, body, code, logged):
    """run_stage forks on Linux and starts `python script` elsewhere: the same exit status and the same log."""
    (tmp_path / "stand").mkdir()
    script = tmp_path / "stand" / "stage.py"
    script.write_text(f"import os, sys\n{body}\n")
    logs = {}
    for platform in ("linux", "other"):
        monkeypatch.setattr(sys, "platform", platform)
        log = tmp_path / f"{platform}.log"
        assert reproduce.run_stage(str(script), ["--x", "1"], str(log)) == code, platform
        logs[platform] = log.read_text()
        assert logged in logs[platform], (platform, logs[platform])
    if "RuntimeError" not in body:  # a traceback names the runner's frames only when forked
        assert logs["linux"].strip() == logs["other"].strip()


def test_the_main_targets_read_intervals_apart_and_show_the_paired_difference():
    # right answers per model and task (100 test examples each): TC+TG clears both on three tasks, is above TC by 7
    # points with overlapping intervals on guiqa (every one of the 7 examples apart goes its way), below on vstar
    right = {"base": {t: range(0) for t in reproduce.TASKS},
             "direct": {"vsp_nav": range(10), "vsp_verify": range(10), "jigsaw": range(10), "guiqa": range(50),
                        "vstar": range(50)},
             "tc": {"vsp_nav": range(50), "vsp_verify": range(50), "jigsaw": range(50), "guiqa": range(50),
                    "vstar": range(40)},
             "tg": {t: range(20) for t in reproduce.TASKS},
             "tctg": {"vsp_nav": range(90), "vsp_verify": range(90), "jigsaw": range(90), "guiqa": range(57),
                      "vstar": range(30)}}
    o = {m: {k: v for t, rr in tasks.items() for k, v in scores(rr, task=t).items()} for m, tasks in right.items()}
    r = {m: {t: reproduce.rate(reproduce.of_task(o[m], t)) for t in reproduce.TASKS} for m in right}
    rows = {target: (measured, met) for target, measured, met in reproduce.main_targets(r, o)}
    assert rows["TC+TG above TC and TG on vsp_nav"][1] == "yes, intervals apart"
    measured, met = rows["TC+TG above TC and TG on guiqa"]
    assert met == "above, intervals overlap"
    # unpaired the intervals overlap; paired, 7 examples won and none lost put the difference above 0
    assert "57% [47-66] vs 50% [40-60] / 20% [13-29]; paired +7 points [+2, +12] / +37" in measured, measured
    assert rows["TC+TG above TC and TG on vstar"][1] == "no"
    assert rows["TC+TG's interval above both TC's and TG's on >= 3 tasks"] == (
        "3 of 5 (paired: both differences above 0 on 4)", "yes")
    assert rows["Base lowest (mean accuracy)"][1] == "yes"
    assert rows["Direct-SFT clearly below TC+TG on vsp_nav (intervals apart)"][1] == "yes"
    measured, met = rows["Direct-SFT clearly below TC+TG on guiqa (intervals apart)"]
    assert met == "no" and measured == "50% [40-60] vs 57% [47-66]: -7 points [-12, -2]", measured
    assert rows["Direct-SFT clearly below TC+TG on vstar (intervals apart)"][1] == "no"
