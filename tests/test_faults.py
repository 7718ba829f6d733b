"""Kills at every write of a checkpoint: --resume always finds the newest complete checkpoint, finishes with the
uninterrupted run's weights, and the log holds every step exactly once; a fresh run never erases an old log.
Bad input (a model directory, TC data, a checkpoint) is one line naming the file, exit status 2, and no output
written over."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

import coldstart
import rollout
from tasks import InputError
from test_distributed import toy_reward  # a reward that varies between the untrained model's samples

TC = ["--quick", "--tasks", "guiqa", "--n-per-task", "4", "--batch-size", "1", "--grad-accum", "2", "--epochs", "2",
      "--ckpt-every", "1", "--device", "cpu", "--eval-n", "0"]


class Killed(BaseException):
    """Stands for the process dying: nothing after it runs (BaseException, so no `except Exception` swallows it)."""


def tc(out, *extra):
    return coldstart.main(TC + ["--out", str(out), *extra])


def steps(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))]


# Each write a checkpoint makes, in order: (object, attribute, which call inside the save dies).
WRITES = {
    "model weights": (PreTrainedModel, "save_pretrained", 1),
    "tokenizer and image processor": (rollout.Processor, "save_pretrained", 1),
    "optimizer state": (torch, "save", 1),
    "old checkpoint moved aside": (os, "rename", 1),
    "new checkpoint moved in": (os, "rename", 2),
    "old checkpoint removed": (shutil, "rmtree", 3),
}


def killed_inside_third_save(monkeypatch, owner, name, nth, run):
    """Run a training stage until the nth call of owner.name inside its third checkpoint save, where it dies."""
    real_save, real_fn = rollout.save_checkpoint, getattr(owner, name)
    saves = calls = 0

    def dying(*a, **kw):  # the nth call of this write inside the third checkpoint save never happens
        nonlocal calls
        calls += saves == 3
        if saves == 3 and calls == nth:
            raise Killed
        return real_fn(*a, **kw)

    def counting_save(*a, **kw):
        nonlocal saves
        saves += 1
        return real_save(*a, **kw)

    monkeypatch.setattr(owner, name, dying)
    monkeypatch.setattr(rollout, "save_checkpoint", counting_save)
    with pytest.raises(Killed):
        run()
    monkeypatch.setattr(owner, name, real_fn)
    monkeypatch.setattr(rollout, "save_checkpoint", real_save)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    tc(out)
    return out


@pytest.mark.parametrize("write", list(WRITES))
def test_a_kill_at_any_write_resumes_to_the_same_weights(whole, tmp_path, monkeypatch, write):
    owner, name, nth = WRITES[write]
    out = tmp_path / "cut"
    os.makedirs(out)
    os.symlink(whole / "data", out / "data")  # the same curated data; only training is interrupted
    killed_inside_third_save(monkeypatch, owner, name, nth, lambda: tc(out))
    found = rollout.find_checkpoint(str(out / "ckpt"))
    step = torch.load(os.path.join(found, "trainer.pt"), weights_only=False)["state"]["step"]
    # killed before the new checkpoint was complete: step 2's is the newest; after its COMPLETE: step 3's
    assert step == (3 if write.startswith(("old checkpoint", "new checkpoint")) else 2), (write, found)
    tc(out, "--resume")
    a, b = load_file(str(whole / "model" / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert steps(out) == steps(whole) == [1, 2, 3, 4]


TG = ["--quick", "--steps", "4", "--ckpt-every", "1", "--eval-n", "0", "--tasks", "vsp_verify", "--tools", "Point",
      "--max-new-tokens", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def tg_whole(scratch_dir, tmp_path_factory):
    """An uninterrupted --quick-sized Tool-GRPO run (toy reward) to compare the killed ones with."""
    import grpo
    out = tmp_path_factory.mktemp("tg_whole")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grpo, "reward", toy_reward)
        grpo.main(TG + ["--init", scratch_dir, "--out", str(out)])
    return out


# the two sides of the moment a checkpoint becomes complete: the last write before its COMPLETE file, and the first
# after it (the new checkpoint whole in CKPT.tmp, CKPT being moved aside). The writes are rollout.save_checkpoint's,
# killed at every one of them with TC above; what TG adds is its own loop state, which either side resumes from
@pytest.mark.parametrize("write", ["optimizer state", "old checkpoint moved aside"])
def test_tg_killed_around_a_complete_checkpoint_resumes_to_the_same_weights(scratch_dir, tg_whole, tmp_path,
                                                                           monkeypatch, write):
    """The same guarantee for Tool-GRPO: killed just before and just after its third checkpoint is complete, --resume
    takes the newest complete checkpoint and ends with the uninterrupted run's weights, each RL step logged once."""
    import grpo
    monkeypatch.setattr(grpo, "reward", toy_reward)
    owner, name, nth = WRITES[write]
    killed_inside_third_save(monkeypatch, owner, name, nth,
                             lambda: grpo.main(TG + ["--init", scratch_dir, "--out", str(tmp_path / "cut")]))
    found = rollout.find_checkpoint(str(tmp_path / "cut" / "ckpt"))
    step = torch.load(os.path.join(found, "trainer.pt"), weights_only=False)["state"]["step"]
    assert step == (3 if write.startswith(("old checkpoint", "new checkpoint")) else 2), (write, found)
    grpo.main(TG + ["--init", scratch_dir, "--out", str(tmp_path / "cut"), "--resume"])
    a = load_file(str(tg_whole / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(line)["step"] for line in open(tmp_path / "cut" / "log.jsonl")] == [0, 1, 2, 3]
    assert any(not torch.equal(a[k], w) for k, w in load_file(os.path.join(scratch_dir, "model.safetensors")).items()
               if k in a)  # it did train


def test_a_torn_log_line_is_dropped_and_a_fresh_run_keeps_the_old_log(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    rollout.open_log(str(log), 2).close()  # resumed after 2 steps
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    with rollout.open_log(str(log), 0) as f:  # a fresh run in the same directory
        f.write('{"step": 1}\n')
    assert log.read_text() == '{"step": 1}\n' and (tmp_path / "log.jsonl.1").read_text() == '{"step": 1}\n{"step": 2}\n'
    rollout.open_log(str(log), 0).close()
    assert (tmp_path / "log.jsonl.2").read_text() == '{"step": 1}\n' and log.read_text() == ""


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    assert rollout.resume_from(str(tmp_path / "ckpt"), True) is None
    assert "no complete checkpoint" in capsys.readouterr().out
    os.makedirs(tmp_path / "ckpt.tmp")  # a save killed halfway: no COMPLETE, not a checkpoint
    torch.save({}, tmp_path / "ckpt.tmp" / "trainer.pt")
    assert rollout.find_checkpoint(str(tmp_path / "ckpt")) is None


# -----------------------------------------------------------------------------
# bad input: one line, exit status 2, nothing written over


def files(d):
    """{relative path: bytes} of everything under d: what must come out of a failed run untouched."""
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(d) for f in fs}


def fails_cleanly(main, argv, monkeypatch, capsys):
    """Run a stage as its __main__ does -> the one line it printed; asserts exit status 2."""
    monkeypatch.setattr(sys, "argv", ["stage.py", *argv])
    with pytest.raises(SystemExit) as e:
        rollout.cli(main)
    err = [line for line in capsys.readouterr().err.split("\n") if "error" in line]  # not the loaders' progress bars
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("stage.py: error: "), err
    return err[0]


def test_bad_model_directories_name_the_file(scratch_dir, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        rollout.load_policy(str(tmp_path / "missing"))
    broken = {
        "config.json": (lambda p: open(p, "w").write("{"), r"config\.json: unreadable model config"),
        "model.safetensors": (lambda p: os.truncate(p, os.path.getsize(p) // 2), "cannot load the model weights"),
    }
    for name, (damage, message) in broken.items():
        d = tmp_path / name
        shutil.copytree(scratch_dir, d)
        damage(str(d / name))
        with pytest.raises(InputError, match=message) as e:
            rollout.load_policy(str(d))
        assert str(d) in str(e.value)
    d = tmp_path / "tokenizer"  # a tokenizer with more tokens than the model has embeddings
    shutil.copytree(scratch_dir, d)
    processor = rollout.Processor.from_pretrained(str(d))
    processor.tokenizer.add_tokens([f"<extra_{i}>" for i in range(10)])
    processor.tokenizer.save_pretrained(str(d))
    with pytest.raises(InputError, match=r"the tokenizer has 6154 tokens but the model's embedding table 6144 rows"):
        rollout.load_policy(str(d))


def test_a_missing_tc_image_stops_before_training(whole, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tc"
    shutil.copytree(whole, out)
    before = files(out / "model")
    first = sorted(os.listdir(out / "data" / "images"))[0]
    os.remove(out / "data" / "images" / first)
    err = fails_cleanly(coldstart.main, TC + ["--out", str(out)], monkeypatch, capsys)
    assert "train.jsonl, line " in err and f"missing image images/{first}" in err
    assert files(out / "model") == before


def test_an_unreadable_checkpoint_stops_the_resume(whole, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tc"
    shutil.copytree(whole, out)
    os.truncate(out / "ckpt" / "trainer.pt", 100)
    before = files(out)
    err = fails_cleanly(coldstart.main, TC + ["--out", str(out), "--resume"], monkeypatch, capsys)
    assert f"{out / 'ckpt' / 'trainer.pt'}: unreadable checkpoint" in err
    assert files(out) == before  # neither the log nor the model was touched


def test_the_command_line_exits_2_with_one_line(tmp_path):
    out = tmp_path / "tg"
    r = subprocess.run([sys.executable, "grpo.py", "--init", str(tmp_path / "nowhere"), "--out", str(out)],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2 and r.stderr.startswith("grpo.py: error: the initial policy") and r.stderr.count("\n") == 1
    assert not out.exists()
