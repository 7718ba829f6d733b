"""torchrun: two CPU processes (gloo) train what one process trains on the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import coldstart
import grpo
from tasks import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, timeout=600):
    """`torchrun --nproc_per_node 2 args`: two CPU processes (gloo) of one thread each."""
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(29500 + os.getpid() % 1000)]
    proc = subprocess.run(head + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]


def run_here(main, argv):
    """A one-process run in this process (no interpreter to start), on one thread as the torchrun workers run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def weights(d):
    return load_file(os.path.join(d, "model.safetensors"))


def assert_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, (a[k] - b[k]).abs().max())


# 3 records (one a task), 3 epochs of 2 micro-batches: one of 2 sequences (one a rank) and one of 1 (the other rank
# holds none: its gradients join the sum as zeros, and under --fsdp it runs an idle pass); 3 micro-batches a step, so
# step 1 ends one micro-batch into the second epoch and the resumed step 2 crosses into the third. A small lr: Adam's
# first steps move every weight by about lr * sign(gradient), so a gradient that is float noise in both runs (summed
# in another order over two ranks) may move its weight by up to lr either way; at 1e-4 the test allows a few of those
TC = ["coldstart.py", "--quick", "--device", "cpu", "--tasks", "vsp_nav,jigsaw,vsp_verify", "--n-per-task", "1",
      "--batch-size", "2", "--grad-accum", "3", "--epochs", "3", "--lr", "1e-4", "--eval-n", "2", "--adl"]


@pytest.fixture(scope="module")
def tc_runs(tmp_path_factory):
    """The same TC (curated data shared) on one process, uninterrupted, and on two, stopped after step 1 of 2 and
    resumed with the same command (its checkpoint holds the model, the optimizer state, the data order and the RNG
    streams): (one, two) output folders."""
    tmp = tmp_path_factory.mktemp("tc")
    one, two = str(tmp / "one"), str(tmp / "two")
    run_here(coldstart.main, TC[1:] + ["--out", one])
    os.makedirs(two)
    os.symlink(os.path.join(one, "data"), os.path.join(two, "data"))  # the same curated data
    run(TC + ["--out", two, "--stop-after", "1"])
    assert not os.path.exists(os.path.join(two, "model"))  # it stopped before the end
    run(TC + ["--out", two, "--resume"])
    return one, two


def assert_same_tc(one, two):
    """Two TC runs on the same global batch: the same weights (to float noise), log and evaluation."""
    a, b = weights(os.path.join(one, "model")), weights(os.path.join(two, "model"))
    assert a.keys() == b.keys()
    # within 1e-5 everywhere but at a handful of weights whose gradient is float noise in both runs: Adam moves each
    # of those by up to lr a step whichever way the noise falls (measured with the run-5 base: 1 of 3.7M weights, by
    # 6e-5), so two runs stay within twice the sum of the steps' lr (warm-up: 0.5e-4 + 1e-4, doubled: 3e-4). A resume
    # that got the optimizer state, the schedule or the data order wrong moves every weight by about lr, or changes
    # the logged losses and token counts
    far = sum(int(((a[k] - b[k]).abs() > 1e-5).sum()) for k in a)
    assert far <= 10 and all(float((a[k] - b[k]).abs().max()) <= 3e-4 for k in a), far
    log1 = [json.loads(x) for x in open(os.path.join(one, "log.jsonl"))]
    log2 = [json.loads(x) for x in open(os.path.join(two, "log.jsonl"))]
    assert [r["step"] for r in log2] == [r["step"] for r in log1]  # one log, one line per step
    assert [(r["tokens"], r["loss_tokens"]) for r in log2] == [(r["tokens"], r["loss_tokens"]) for r in log1]
    assert [r["loss"] for r in log2] == pytest.approx([r["loss"] for r in log1], rel=1e-5)
    # the norm sums ~3.7M squared gradients in another order on each side: 1.1e-5 apart (relative) with the run-6 base
    assert [r["grad_norm"] for r in log2] == pytest.approx([r["grad_norm"] for r in log1], rel=5e-5)
    e1, e2 = (json.load(open(os.path.join(d, "eval.json")))["results"] for d in (one, two))
    assert e1 == e2  # the evaluation split over the ranks and gathered gives the same metrics
    assert not [f for f in os.listdir(two) if f.startswith("log.jsonl.")]


def test_tc_on_two_processes_stopped_and_resumed_equals_one(tc_runs):
    assert_same_tc(*tc_runs)


@pytest.fixture(scope="module")
def tc_fsdp(tc_runs, tmp_path_factory):
    """The two-process TC again with --fsdp (the curated data shared), stopped after step 1 (the optimizer state
    gathered and saved whole) and resumed (sharded again) -> (its output folder, the error that resuming its checkpoint
    without --fsdp raised)."""
    out = str(tmp_path_factory.mktemp("tc_fsdp") / "fsdp")
    os.makedirs(out)
    os.symlink(os.path.join(tc_runs[0], "data"), os.path.join(out, "data"))
    run(TC + ["--out", out, "--stop-after", "1", "--fsdp"])
    with pytest.raises(InputError) as wrong:  # here, not in a process of its own: it stops before any training
        coldstart.main(TC[1:] + ["--out", out, "--resume"])
    run(TC + ["--out", out, "--resume", "--fsdp"])
    return out, str(wrong.value)


def test_tc_fsdp_stopped_and_resumed_equals_ddp(tc_runs, tc_fsdp):
    """Sharded parameters, gradients and optimizer state, through a stop and a resume: the same training as the
    replicated two-process run, and one whole model directory gathered from the shards (the tied LM head written
    once, as save_pretrained does)."""
    assert_same_tc(tc_runs[1], tc_fsdp[0])
    assert "lm_head.weight" not in weights(os.path.join(tc_fsdp[0], "model"))


def test_an_fsdp_checkpoint_resumes_only_with_fsdp(tc_fsdp):
    # an InputError: the command line reports it in one line with exit status 2 (tests/test_faults.py)
    assert "written by a run with --fsdp; resume it the same way" in tc_fsdp[1]


def test_fsdp_without_torchrun_is_refused_before_any_work(tmp_path):
    with pytest.raises(InputError, match="--fsdp shards over torchrun's processes"):
        coldstart.main(TC[1:] + ["--out", str(tmp_path / "x"), "--fsdp"])
    assert not os.path.exists(tmp_path / "x" / "data")  # refused before curation


def toy_reward(traj, example, kind, lam):
    """The untrained base earns no real reward, so nothing would train; this one differs between samples."""
    r = sum(x % 4 == 0 for x, m in zip(traj.token_ids, traj.loss_mask) if m) / max(1, sum(traj.loss_mask))
    return {"reward": r, "correct": 0.0, "format": 0.0, "tool_quality": 0.0, "tool_term": 0.0,
            "reward_from_correct": 0.0, "reward_from_tools": r}


# grpo.py with toy_reward, for the torchrun workers
TOY = """import sys
sys.path[:0] = [{root!r}, {tests!r}]
import grpo, rollout
from test_distributed import toy_reward

grpo.reward = toy_reward
rollout.cli(lambda: grpo.main(sys.argv[1:]))
"""
TG = ["--quick", "--device", "cpu", "--init", "tiny", "--steps", "2", "--prompts-per-step", "3", "--group-size", "2",
      "--max-new-tokens", "24", "--lr", "1e-4", "--eval-n", "1", "--tasks", "vsp_verify,jigsaw", "--kl-coef", "0"]


def test_tg_on_two_processes_equals_one(tmp_path):
    """3 prompts per step over 2 ranks (2 and 1 prompt, groups whole): the same samples, rewards and weights, with
    the parameters replicated and with --fsdp (rollouts and evaluation on the whole weights, the update sharded: a
    rank with fewer micro-batches in a minibatch makes them up with idle passes)."""
    script = tmp_path / "toy_grpo.py"
    script.write_text(TOY.format(root=ROOT, tests=os.path.join(ROOT, "tests")))
    one, two, fsdp = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "fsdp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grpo, "reward", toy_reward)
        run_here(grpo.main, TG + ["--out", one])
    run([str(script)] + TG + ["--out", two])
    run([str(script)] + TG + ["--out", fsdp, "--fsdp"])
    log1 = [json.loads(x) for x in open(os.path.join(one, "log.jsonl"))]
    assert all(r["trained"] > 0 and r["reward_std"] > 0 for r in log1)  # real updates, not empty steps
    a = weights(os.path.join(one, "model"))
    base = load_file(os.path.join(ROOT, "tiny_base", "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in a if k in base)  # it trained
    e1 = json.load(open(os.path.join(one, "eval.json")))
    for other in (two, fsdp):
        log2 = [json.loads(x) for x in open(os.path.join(other, "log.jsonl"))]
        assert [r["examples"] for r in log2] == [r["examples"] for r in log1]  # the same data, logged once per step
        for key in ("reward", "tokens", "seq_tokens", "trained"):
            assert [r[key] for r in log2] == pytest.approx([r[key] for r in log1], rel=1e-9), key
        assert [r["grad_norm"] for r in log2] == pytest.approx([r["grad_norm"] for r in log1], rel=1e-5)
        assert_close(a, weights(os.path.join(other, "model")))
        e2 = json.load(open(os.path.join(other, "eval.json")))
        for label in ("before", "after"):  # the same metrics, split over the ranks and gathered (timings aside)
            assert {k: v for k, v in e1[label].items() if k != "seconds"} == \
                {k: v for k, v in e2[label].items() if k != "seconds"}


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    import rollout
    from PIL import Image
    model, processor = rollout.load_policy("tiny", device="cpu", dtype=torch.float32)
    msgs = [{"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (112, 84), "red")},
                                         {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": "<think>red</think><response>\\\\boxed{red}</response>"}]
    batch = [rollout.encode_conversation(processor, msgs)]

    # runs of a decoder layer's MLP: once per step, twice when the backward pass recomputes the layer (counted by
    # wrapping its forward: torch runs no module hooks while it recomputes)
    calls, mlp = [], model.model.language_model.layers[0].mlp
    mlp.forward = lambda x, run=mlp.forward: calls.append(1) or run(x)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        calls.clear()
        loss, _ = rollout.masked_lm_loss(model, processor, batch, "cpu")
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train()
    plain = loss_and_grads()
    assert len(calls) == 1
    rollout.checkpoint_activations(model)
    again = loss_and_grads()
    assert len(calls) == 2  # the layer really was recomputed
    assert again[0] == pytest.approx(plain[0], rel=1e-6) and len(again[1]) == len(plain[1])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(again[1], plain[1]))
