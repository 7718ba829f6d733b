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
    assert [n for n, a in plan.items() if "--reward" in a] == ["tg", "tctg", "tg_adopt", "tg_transfer", "tg_transfer_adl"]
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


def rate(k, n=100, **calls):
    """An evaluation's metrics for one task: k of n right, calls per sample per tool."""
    return {"n": n, "accuracy": k / n, "accuracy_ci": reproduce.rollout.wilson(k, n), "calls_per_sample_per_tool": calls}


def test_a_difference_is_read_with_its_own_interval():
    # Newcombe (1998), Statistics in Medicine 17:873, example (a), method 10: 56/70 - 48/80 -> [0.0524, 0.3339]
    assert reproduce.difference_ci(rate(56, 70), rate(48, 80)) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert reproduce.all_met("yes", "inside the interval") == "inside the interval"
    assert reproduce.all_met("yes", "inside the interval", "no") == "no"


@pytest.mark.parametrize("after, met", [(70, "yes"), (45, "inside the interval"), (15, "no")])
def test_adopt_reads_the_gain_with_its_interval(after, met):
    """10% -> 45%: 35 points up, but the gain's interval [+23, +46] reaches below the 30 the target asks for."""
    a = {"before": {"vsp_nav": rate(10), "vsp_verify": rate(90)},
         "after": {"vsp_nav": rate(after, AStar=1.0), "vsp_verify": rate(90)}}
    calls, gain, discard = reproduce.adopt_targets(a, {"after": {"vsp_verify": rate(91)}})
    assert calls[2] == "yes" and gain[2] == met
    # 1 point apart at n = 100: the gap's interval [-10, +8] does not fit inside +-5 points, nor lies outside it
    assert discard[2] == "inside the interval" and "-1 points [-10, +8]" in discard[1]
    a["after"]["vsp_verify"] = rate(60)
    assert reproduce.adopt_targets(a, {"after": {"vsp_verify": rate(91)}})[2][2] == "no"


def test_adl_and_transfer_read_losses_and_gains_with_their_intervals():
    every = lambda k: {t: rate(k) for t in reproduce.TASKS}  # noqa: E731
    # over 5 x 100 examples: ADL loses 2 points [-4, +8] (<= 10), non-ADL 30 [+24, +35] (>= 20)
    row = reproduce.adl_target({"tc": every(50), "tc_adl": every(50)}, {"tc": every(20), "tc_adl": every(48)})
    assert row[2] == "yes" and "ADL loses +2 points [-4, +8]" in row[1]
    row = reproduce.adl_target({"tc": every(50), "tc_adl": every(50)}, {"tc": every(32), "tc_adl": every(48)})
    assert row[2] == "inside the interval"  # 18 points [+12, +24]: the sample cannot tell it from 20
    unseen = lambda k: {t: rate(k) for t in reproduce.UNSEEN}  # noqa: E731
    assert reproduce.transfer_target({"tctg_adl": unseen(60), "tctg": unseen(30)})[2] == "yes"
    assert reproduce.transfer_target({"tctg_adl": unseen(35), "tctg": unseen(30)})[2] == "inside the interval"
    assert reproduce.transfer_target({"tctg_adl": unseen(10), "tctg": unseen(30)})[2] == "no"


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
