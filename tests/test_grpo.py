"""Tool-GRPO: advantages, the clipped loss and its gradient, every branch of the adaptive reward, a learning
signal on a toy, and resume."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import grpo
import rollout
import tasks
from rollout import Trajectory


# -----------------------------------------------------------------------------
# 1. loss math


def test_group_advantages_by_hand():
    rewards = [1.0, 0.0, 0.5, 0.5,   0.2, 0.2, 0.2, 0.2,   0.0, 0.0, 0.0, 1.0]
    adv = grpo.group_advantages(rewards, 4)
    # group 1: mean 0.5, unbiased std sqrt((0.25 + 0.25 + 0 + 0) / 3)
    std = (0.5 / 3) ** 0.5
    expect = [0.5 / std, -0.5 / std, 0.0, 0.0]
    # group 3: mean 0.25, std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5
    expect += [0.0] * 4 + [-0.5, -0.5, -0.5, 1.5]
    assert torch.allclose(adv, torch.tensor(expect), atol=1e-4)
    assert (adv[4:8] == 0).all()  # an equal group is exactly zero, not 0/eps noise
    mean_only = grpo.group_advantages(rewards, 4, use_std=False)
    assert torch.allclose(mean_only, torch.tensor([0.5, -0.5, 0, 0, 0, 0, 0, 0, -0.25, -0.25, -0.25, 0.75]))


def reference_loss(logp, old, adv, mask, lo, hi, agg):
    """Per-token loops, straight from the PPO formula."""
    per_seq, total, count = [], 0.0, 0
    for b in range(logp.shape[0]):
        s, n = 0.0, 0
        for t in range(logp.shape[1]):
            if mask[b, t]:
                r = torch.exp(logp[b, t] - old[b, t])
                s = s - torch.min(r * adv[b], torch.clamp(r, 1 - lo, 1 + hi) * adv[b])
                n += 1
        per_seq.append(s / max(n, 1))
        total, count = total + s, count + n
    return total / count if agg == "token-mean" else sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_clipped_surrogate_and_gradient_match_reference(agg):
    g = torch.Generator().manual_seed(0)
    B, L = 3, 7
    old = -torch.rand(B, L, generator=g) * 3
    logp = (old + torch.randn(B, L, generator=g) * 0.4).requires_grad_()  # some ratios leave [0.8, 1.28]
    adv = torch.tensor([1.5, -0.7, 0.3])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 1, 0]])
    loss, stats = grpo.policy_loss(logp, old, adv, mask, 0.2, 0.28, agg)
    (grad,) = torch.autograd.grad(loss, logp)
    logp2 = logp.detach().clone().requires_grad_()
    ref = reference_loss(logp2, old, adv, mask, 0.2, 0.28, agg)
    (ref_grad,) = torch.autograd.grad(ref, logp2)
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-6)
    assert (grad[mask == 0] == 0).all()  # prompt and observation tokens: exactly zero gradient
    assert 0 < stats["clipped"] < stats["tokens"]  # the test does reach the clipped branch


def test_one_update_per_batch_is_reinforce():
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(2, 5, generator=g)).requires_grad_()
    adv = torch.tensor([0.8, -1.2])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    loss, stats = grpo.policy_loss(logp, logp.detach(), adv, mask, 0.2, 0.28)
    assert stats["clipped"] == 0 and stats["kl_old"] == 0  # ratio exactly 1
    reinforce = -(adv[:, None] * logp * mask).sum() / mask.sum()
    (g1,) = torch.autograd.grad(loss, logp, retain_graph=True)
    (g2,) = torch.autograd.grad(reinforce, logp)
    assert torch.allclose(loss, -(adv[:, None] * mask).sum() / mask.sum())
    assert torch.allclose(g1, g2)


def point_then_answer(processor, free=3):
    """A forcer: turn 1 calls Point, turn 2 answers; each turn then writes `free` tokens of the model's own before
    <|im_end|>, so the trajectory holds sampled tokens, an observation and forced text."""
    script = [processor.encode_text(s) for s in (
        '<think>find the elf</think><tool_call>{"name": "Point", "parameters": {"image": "img_1", "description": '
        '"the elf"}}</tool_call>', "<think>done</think><response>\\boxed{Yes}</response>")]

    def forcer(row, turn, toks):
        seq = script[min(turn, 1)]
        if len(toks) < len(seq):
            return seq[len(toks)]
        return None if len(toks) < len(seq) + free else processor.im_end
    return forcer


def has_observation(traj):
    """A tool ran and its observation's tokens (loss mask 0) lie between the sampled tokens."""
    first, last = traj.loss_mask.index(1), len(traj.loss_mask) - 1 - traj.loss_mask[::-1].index(1)
    return len(traj.calls) == 1 and 0 in traj.loss_mask[first:last]


def test_model_gradient_is_zero_on_prompt_and_observation_tokens(scratch_dir):
    """Through the real model's log-probs of a real multi-turn trajectory: tokens of the prompt and of the tool
    observation get exactly zero gradient, every sampled token a non-zero one."""
    model, processor = rollout.load_policy(scratch_dir, "cpu")
    ex = tasks.generate("vsp_verify", 1, split="rl")[0]
    traj = rollout.rollout(model, processor, [ex], tools=["Point"], max_turns=2, seed=3,
                           forcer=point_then_answer(processor))[0]
    assert has_observation(traj), traj.messages
    seqs, images = grpo.batch_inputs([traj], processor)
    logits = rollout.sequence_logits(model, processor, seqs, images)
    logp = rollout.token_logprobs(logits, seqs)
    logp.retain_grad()
    mask = torch.tensor([traj.loss_mask])
    old = torch.tensor([traj.logprobs])
    loss, _ = grpo.policy_loss(logp, old, torch.tensor([1.0]), mask, 0.2, 0.28)
    loss.backward()
    assert (logp.grad[mask == 0] == 0).all() and (logp.grad[mask == 1] != 0).all()
    # the sampling-time log-probs are what the loss starts from: ratio 1 up to float error
    assert torch.allclose(logp.detach()[mask == 1], old[mask == 1], atol=1e-3)


def test_masked_head_equals_the_full_forward_values_and_gradients(scratch_dir):
    """The update's log-probs (LM head only on sampled tokens, rollout.masked_logprobs) equal those of one full
    forward (sequence_logits + token_logprobs) on every sampled token, and the policy loss built on each gives the
    same gradient for every weight; prompt and observation positions hold 0."""
    model, processor = rollout.load_policy(scratch_dir, "cpu")
    exs = tasks.generate("vsp_verify", 2, split="rl")
    trajs = rollout.rollout(model, processor, exs, tools=["Point"], max_turns=2, seed=5,
                            forcer=point_then_answer(processor))
    assert all(has_observation(t) for t in trajs)
    seqs, images = grpo.batch_inputs(trajs, processor)
    mask = grpo.padded([t.loss_mask for t in trajs])
    old, adv = grpo.padded([t.logprobs for t in trajs]), torch.tensor([1.0, -0.5])
    grads = []
    for fast in (False, True):
        model.zero_grad(set_to_none=True)
        if fast:
            logp, entropy = grpo.forward_logprobs(model, processor, trajs, 0.7, grpo.nullcontext())
        else:
            logp = rollout.token_logprobs(rollout.sequence_logits(model, processor, seqs, images), seqs, 0.7)
        grpo.policy_loss(logp, old, adv, mask, 0.2, 0.28)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if fast:
            assert (logp[mask == 0] == 0).all() and (entropy[mask == 0] == 0).all() and (entropy[mask == 1] > 0).all()
            assert torch.allclose(logp[mask == 1], full[mask == 1], atol=1e-5)
        else:
            full = logp.detach()
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4), n


# -----------------------------------------------------------------------------
# 2. the adaptive reward, branch by branch


def traj_with(answer_text, calls, valid=True):
    t = Trajectory("x", "vsp_verify", calls=calls, format_valid=valid)
    t.answer = tasks.extract_answer(answer_text)
    return t


GOOD = {"name": "Point", "params": {"image": "img_1", "description": "hole"}, "status": "success", "error": None,
        "seconds": 0.01}
UNPARSED = {"name": "tool_call", "params": None, "status": "error", "error": "the tool call is not valid JSON",
            "seconds": 0.0}
UNKNOWN = {"name": "Zoom", "params": {}, "status": "error", "error": "unknown tool 'Zoom'; available: 'Point'",
           "seconds": 0.0}
BAD_ARGS = {"name": "Point", "params": {"image": "img_9"}, "status": "error",
            "error": "argument 'image' must name an image (img_1 to img_1); got 'img_9'", "seconds": 0.0}
CRASHED = {"name": "Point", "params": {"image": "img_1", "description": "x"}, "status": "error",
           "error": "tool 'Point' timed out after 5.0 s", "seconds": 5.0}


@pytest.fixture(scope="module")
def example():
    return tasks.generate("vsp_verify", 1, split="rl")[0]


def test_reward_invalid_format_is_zero(example):
    right = f"<response>\\boxed{{{example['answer']}}}</response>"
    r = grpo.reward(traj_with(right, [GOOD], valid=False), example)
    assert r["reward"] == 0.0 and r["correct"] == 1.0 and r["format"] == 0.0


def test_reward_correct_is_one_whatever_the_tools(example):
    right = f"<response>\\boxed{{{example['answer']}}}</response>"
    for calls in ([], [GOOD], [UNPARSED, CRASHED]):
        assert grpo.reward(traj_with(right, calls), example)["reward"] == 1.0


def test_reward_wrong_with_good_calls(example):
    wrong = "<response>\\boxed{" + ("no" if example["answer"].lower() == "yes" else "yes") + "}</response>"
    r = grpo.reward(traj_with(wrong, [GOOD, GOOD]), example, lam=0.5)
    assert r["reward"] == 0.5 and r["tool_quality"] == 1.0 and r["correct"] == 0.0
    assert (r["reward_from_correct"], r["reward_from_tools"]) == (0.0, 0.5)  # all of it is tool credit


def test_reward_wrong_with_failing_calls(example):
    wrong = "<response>\\boxed{maybe}</response>"
    calls = [UNPARSED, UNKNOWN, BAD_ARGS, CRASHED, GOOD]
    assert [grpo.call_quality(c) for c in calls] == [0.0, 0.25, 0.5, 0.75, 1.0]
    r = grpo.reward(traj_with(wrong, calls), example, lam=0.5)
    assert r["tool_quality"] == pytest.approx(0.5) and r["reward"] == pytest.approx(0.25)
    assert grpo.reward(traj_with(wrong, [UNPARSED]), example)["reward"] == 0.0


def test_reward_wrong_with_no_calls(example):
    r = grpo.reward(traj_with("<response>\\boxed{maybe}</response>", []), example)
    assert r["reward"] == 0.0 and r["format"] == 1.0


def test_ablation_rewards(example):
    wrong = traj_with("<response>\\boxed{maybe}</response>", [GOOD])
    right = traj_with(f"<response>\\boxed{{{example['answer']}}}</response>", [GOOD])
    assert grpo.reward(wrong, example, "accuracy")["reward"] == 0.0
    assert grpo.reward(right, example, "accuracy")["reward"] == 1.0
    assert grpo.reward(right, example, "additive", lam=0.5)["reward"] == 1.5
    # the split adds up to the reward: the answer's share, then the tools' share on top
    for kind, traj, split in [("adaptive", right, (1.0, 0.0)), ("additive", right, (1.0, 0.5)),
                              ("adaptive", wrong, (0.0, 0.5)), ("accuracy", wrong, (0.0, 0.0))]:
        r = grpo.reward(traj, example, kind, lam=0.5)
        assert (r["reward_from_correct"], r["reward_from_tools"]) == split, kind


# -----------------------------------------------------------------------------
# 3. learning signal on a toy


def test_grpo_raises_reward_on_a_toy(scratch_dir):
    """One prompt, three sampled tokens, reward = share of them in a fixed quarter of the vocabulary
    (the 'correct answer'). The untrained tiny model starts near 1/4; GRPO must push it clearly up."""
    torch.manual_seed(0)
    model, processor = rollout.load_policy(scratch_dir, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    prompt = {"id": "toy", "task": "toy", "question": "Answer.", "images": [], "answer": None, "meta": {}}
    target = lambda x: x % 4 == 0 and x != processor.im_end

    curve = []
    for step in range(16):
        model.eval()
        trajs = rollout.rollout(model, processor, [prompt] * 2, tools=[], group_size=8, max_new_tokens=3,
                                max_turns=1, seed=step)
        rewards = [sum(target(x) for x, m in zip(t.token_ids, t.loss_mask) if m) / 3 for t in trajs]
        model.train()
        grpo.update(model, processor, trajs, grpo.group_advantages(rewards, 8), opt, temperature=1.0, micro_batch=16,
                    seed=step)
        curve.append(sum(rewards) / len(rewards))
    start, end = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert start < 0.4 and end > start + 0.4, curve


# -----------------------------------------------------------------------------
# 4. resume


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def test_resume_continues_same_step_data_and_weights(scratch_dir, tmp_path, monkeypatch):
    # the untrained model's real rewards are all zero; a toy reward (as above) makes the updates non-trivial
    def toy_reward(traj, example, kind, lam):
        r = sum(x % 4 == 0 for x, m in zip(traj.token_ids, traj.loss_mask) if m) / max(1, sum(traj.loss_mask))
        return {"reward": r, "correct": 0.0, "format": 0.0, "tool_quality": 0.0, "tool_term": 0.0,
                "reward_from_correct": 0.0, "reward_from_tools": r}

    monkeypatch.setattr(grpo, "reward", toy_reward)
    flags = ["--quick", "--init", scratch_dir, "--steps", "3", "--ckpt-every", "2", "--eval-n", "0", "--adl",
             "--tasks", "vsp_verify", "--tools", "Point", "--ppo-epochs", "1", "--max-new-tokens", "8"]
    grpo.main(flags + ["--out", str(tmp_path / "full")])

    class Killed(Exception):
        pass

    save = rollout.save_checkpoint

    def save_then_die(*a, **kw):
        save(*a, **kw)
        raise Killed

    monkeypatch.setattr(rollout, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        grpo.main(flags + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(rollout, "save_checkpoint", save)
    assert json.loads(open(tmp_path / "cut" / "log.jsonl").read().splitlines()[-1])["step"] == 1
    grpo.main(flags + ["--out", str(tmp_path / "cut"), "--resume"])

    full = [json.loads(l) for l in open(tmp_path / "full" / "log.jsonl")]
    cut = [json.loads(l) for l in open(tmp_path / "cut" / "log.jsonl")]
    assert [r["step"] for r in cut] == [0, 1, 2]
    assert [r["examples"] for r in cut] == [r["examples"] for r in full]
    assert [r["reward"] for r in cut] == [r["reward"] for r in full]
    a, b = weights(tmp_path / "full" / "model"), weights(tmp_path / "cut" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], w) for k, w in weights(scratch_dir).items() if k in a)  # it did train
