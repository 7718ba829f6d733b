"""
Tool-GRPO (TG): multi-turn GRPO where rollouts call the real tools.

Each step samples --prompts-per-step RL prompts (mixed over --tasks) and --group-size trajectories per
prompt through rollout.rollout. Every trajectory gets a reward (adaptive by default: an invalid format
earns 0, a correct answer 1, a wrong one lambda times the mean quality of its tool calls), rewards are
normalized within each group, and the policy takes a clipped-surrogate step on the tokens it sampled
(prompt and tool observations are masked out). At the end the policy is saved as a Hugging Face directory
and evaluated greedily on the test split.

    python grpo.py                                  # runs/tc/model -> runs/tg/model (run coldstart.py first)
    python grpo.py --quick                          # smoke run on the tiny default, < 1 minute on CPU
    python grpo.py --tools Point,Draw2DPath,AStar --tasks vsp_nav --adl --reward accuracy
"""
import argparse
import copy
import json
import os
import random
import time
from dataclasses import replace
from contextlib import nullcontext

import torch
from tqdm import tqdm

import adl
import rollout
import tasks
from tools import schemas, tool_list


# --quick: tiny sizes; a small KL and two PPO epochs so the reference copy and the old-log-prob recompute run
# even when the untrained tiny model earns equal rewards everywhere (equal groups train only through the KL)
QUICK = dict(init="tiny", steps=2, prompts_per_step=2, group_size=2, max_turns=2, max_new_tokens=16,
             max_total_tokens=1024,
             eval_n=1, eval_before=True, ckpt_every=1, tasks="vsp_nav,jigsaw", kl_coef=0.01, ppo_epochs=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--init", default=None, help="starting policy: a model directory, 'tiny' (the pretrained base) or "
                   "'scratch' (default runs/tc/model, the output of coldstart.py; 'tiny' under --quick)")
    g.add_argument("--out", default="runs/tg", help="output directory: log.jsonl, eval.json, ckpt/, model/")
    g.add_argument("--data", default=None, help="RL prompts from the authors' parquet (path_nav, path_ver and jigsaw* "
                   "rows; other sources are skipped and counted) instead of generated ones; needs pyarrow")
    g.add_argument("--tasks", default=",".join(tasks.TASKS),
                   help="comma-separated tasks the RL prompts mix over (round-robin)")
    g.add_argument("--tools", default="all", help="tools offered in RL and evaluation: 'all', 'none' (direct-answer "
                   "prompt) or a comma-separated subset, e.g. to offer a tool only in RL")
    g.add_argument("--adl", action="store_true", help="Adaptive Learning: a fresh random tool/parameter naming and "
                   "paraphrased descriptions per prompt, shared by its group")
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=80, help="RL steps (one rollout batch each)")
    g.add_argument("--prompts-per-step", type=int, default=10, help="prompts per step")
    g.add_argument("--group-size", type=int, default=4, help="trajectories sampled per prompt (the GRPO group)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; the loss uses the same one")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    rollout.add_limit_flags(g)  # of the RL rollouts and the evaluation alike
    g = p.add_argument_group("reward and advantage")
    g.add_argument("--reward", default="adaptive", choices=["adaptive", "accuracy", "additive"],
                   help="adaptive: 0 if format invalid, 1 if correct, else lambda*T; accuracy: 1 iff format valid and "
                   "correct; additive: 0 if format invalid, else correct + lambda*T")
    g.add_argument("--tool-reward-weight", type=float, default=0.5, help="lambda, the weight of tool-call quality T")
    g.add_argument("--no-std", action="store_true", help="advantage = r - group mean (no division by the group std)")
    g = p.add_argument_group("loss and optimization")
    g.add_argument("--clip-low", type=float, default=0.2, help="ratio clipped below at 1 - clip_low")
    g.add_argument("--clip-high", type=float, default=0.28, help="ratio clipped above at 1 + clip_high")
    g.add_argument("--loss-agg", default="token-mean", choices=["token-mean", "seq-mean"],
                   help="token-mean: every sampled token of the minibatch weighs the same; seq-mean: every trajectory")
    # 0.1, not the paper's 0: on the tiny default, RL without it lost TC's vsp_nav plan at 1 seed of 3 (and with
    # mean-only advantages at 1 of 2): a branch point other tasks share; with it at none of 3 (results/HISTORY.md,
    # "TG from TC over seeds, the group std and a KL term")
    g.add_argument("--kl-coef", type=float, default=0.1, help="weight of a k3 KL penalty to the initial policy, "
                   "which holds what TC taught (0, as in the paper, keeps no reference copy: 33 GB less at 7B)")
    g.add_argument("--ppo-epochs", type=int, default=1, help="passes over each rollout batch")
    g.add_argument("--minibatches", type=int, default=1, help="optimizer steps per pass (the batch is split)")
    g.add_argument("--micro-batch", type=int, default=2,
                   help="trajectories per forward/backward (gradient accumulation); on the 2-core CPU 2 is the fastest "
                   "and leanest (14 default steps: update 59 s at 2, 64 s at 4, 76 s at 8; peak RSS 1.39, 1.77, "
                   "2.69 GiB)")
    g.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (AdamW; for the tiny default, a tenth of "
                   "TC's 5e-4: 2e-4 broke that TC model's vsp_nav; ~1e-6 for a 7B model)")
    g.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    g.add_argument("--schedule", default="constant", choices=["constant", "cosine"], help="LR after warmup")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    g = p.add_argument_group("run")
    g.add_argument("--eval-n", type=int, default=20,
                   help="held-out test examples per task for the final greedy evaluation (0: skip)")
    g.add_argument("--eval-before", action="store_true", help="also evaluate the initial policy before training")
    g.add_argument("--eval-batch", type=int, default=rollout.EVAL_BATCH, help="examples per greedy evaluation batch")
    g.add_argument("--ckpt-every", type=int, default=5, help="save a resumable checkpoint every N steps (0: never)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt (same flags)")
    rollout.add_device_flag(g)
    rollout.add_protocol_flag(g)
    rollout.add_grad_checkpointing_flag(g)
    rollout.add_fsdp_flag(g)
    g.add_argument("--seed", type=int, default=0, help="seeds data order, sampling, ADL and torch")
    g.add_argument("--quick", action="store_true",
                   help="smallest run that exercises every code path (< 1 minute on CPU)")
    args = rollout.parse_flags(p, argv, QUICK)
    args.init = args.init or "runs/tc/model"  # TC's output (--quick: tiny)
    if args.temperature <= 0:
        p.error("--temperature must be > 0 (GRPO samples; the loss uses the sampling temperature)")
    try:
        tool_list(args.tools)  # a bad name is a usage error now, not a crash mid-run
    except ValueError as e:
        p.error(f"--tools: {e}")
    unknown = [t for t in args.tasks.split(",") if t not in tasks.TASKS]
    if unknown:
        p.error(f"--tasks: unknown tasks {unknown}; tasks are {list(tasks.TASKS)}")
    return args


# -----------------------------------------------------------------------------
# rewards (DESIGN section 9)

# substrings of tools.call_tool's errors when the run itself failed: a timeout, a crash inside the tool, no result
RUN_FAILURES = ("timed out after", "failed on these arguments", "returned no result")


def call_quality(call):
    """One tool call's quality in [0, 1]: a quarter each for parsing, naming an offered tool, passing
    argument validation and running successfully (each step presupposes the previous ones)."""
    if call["params"] is None:  # did not parse: rollout.tool_observation records no params
        return 0.0
    if call["status"] == "success":
        return 1.0
    error = call["error"] or ""
    if error.startswith("unknown tool"):  # parsed, but names no offered tool (under ADL: a real name)
        return 0.25
    # 0.75: the run itself failed (a timeout, a crash); 0.5: the tool rejected the arguments
    return 0.75 if any(s in error for s in RUN_FAILURES) else 0.5


def reward(traj, example, kind="adaptive", lam=0.5):
    """-> dict with the reward and every component it is made of."""
    correct = tasks.score(example, traj.answer)
    fmt = float(traj.format_valid)  # 1 iff every turn follows the protocol and the last one answers
    # T: the mean quality of the trajectory's calls; 0 without calls, so a wrong answer without tools earns 0
    quality = sum(map(call_quality, traj.calls)) / len(traj.calls) if traj.calls else 0.0
    if kind == "adaptive":  # score is 0/1: right earns 1 whatever the tools did, wrong earns lambda*T < 1
        r = fmt * max(correct, lam * quality)
    elif kind == "accuracy":
        r = fmt * correct  # the sparse baseline: no tool credit
    else:  # additive: tool credit on a right answer too, up to 1 + lambda
        r = fmt * (correct + lam * quality)
    # the reward split: what the answer earned and what the tool calls earned on top (under the adaptive reward only a
    # wrong answer earns tool credit), so the log shows when a policy collects tool credit instead of answering
    from_correct = min(r, fmt * correct)
    return {"reward": r, "correct": correct, "format": fmt, "tool_quality": quality, "tool_term": lam * quality,
            "reward_from_correct": from_correct, "reward_from_tools": r - from_correct}


REWARD_SPLIT = ("reward", "reward_from_correct", "reward_from_tools")  # logged over the batch and per task


def group_advantages(rewards, group_size, use_std=True, eps=1e-6):
    """(r - group mean) / (group std + eps), std unbiased; a group whose rewards are all equal gets exactly 0."""
    # [prompts, G]: rollout returns each prompt's group contiguous, and a rank holds whole groups
    r = torch.as_tensor(rewards, dtype=torch.float64).view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)  # the group mean is the baseline: no value network
    if use_std:
        adv = adv / (r.std(1, keepdim=True) + eps)
    # exactly 0, not rounding noise: without KL, update() drops adv == 0; it also covers G = 1 (unbiased std NaN)
    flat = (r.max(1, keepdim=True).values == r.min(1, keepdim=True).values)
    return adv.masked_fill(flat, 0.0).view(-1).float()  # [prompts * G]


# -----------------------------------------------------------------------------
# the loss


def policy_loss(logp, old_logp, adv, mask, clip_low, clip_high, agg="token-mean", denom=None, ref_logp=None,
                kl_coef=0.0):
    """Clipped surrogate on masked tokens. logp, old_logp, mask, ref_logp: [B, L]; adv: [B].
    denom: the minibatch's token count (token-mean) or trajectory count (seq-mean), so that micro-batches
    accumulate to the minibatch loss; defaults to this batch's. Returns (loss, stats of detached sums)."""
    mask = mask.float()
    a = adv.view(-1, 1)  # [B, 1]: one advantage for all of a trajectory's tokens
    ratio = torch.exp(logp - old_logp)  # [B, L]; 1 where both are 0 (prompt, padding)
    # PPO's pessimistic bound: past 1 - clip_low or 1 + clip_high (in the advantage's direction) the clipped term wins
    # and the token's gradient is 0; clip_high > clip_low leaves more room to raise unlikely tokens (clip-higher)
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)
    if kl_coef:
        d = ref_logp - logp  # log(pi_ref / pi) per token
        kl_ref = torch.exp(d) - d - 1  # k3: unbiased, always >= 0
        per_token = per_token + kl_coef * kl_ref
    # token-mean: each sampled token weighs the same (long trajectories weigh more); seq-mean: each trajectory does
    if agg == "token-mean":
        loss = (per_token * mask).sum() / (denom or mask.sum().clamp(min=1))
    else:
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / (denom or mask.shape[0])
    with torch.no_grad():
        # the tokens whose gradient the clip cut off
        clipped = ((ratio < 1 - clip_low) & (a < 0)) | ((ratio > 1 + clip_high) & (a > 0))
        d_old = old_logp - logp  # how far the update has moved from the sampler
        # sums, not means: micro-batches and ranks add them up, update() divides by the tokens
        stats = {"tokens": mask.sum().item(), "clipped": (clipped.float() * mask).sum().item(),
                 "kl_old": ((torch.exp(d_old) - d_old - 1) * mask).sum().item()}
        if kl_coef:
            stats["kl_ref"] = (kl_ref * mask).sum().item()
    return loss, stats


def batch_inputs(trajs, processor):
    """Per trajectory: token ids and the (pixel_values, grid_thw) of the images its sequence contains
    (an image a tool made after the token budget ran out is in traj.images but not in the tokens)."""
    # the rollout's encodings, while the cache still holds them
    return ([t.token_ids for t in trajs],
            [[rollout.encode_image_cached(processor, im) for im in rollout.shown_images(t, processor)] for t in trajs])


def forward_logprobs(model, processor, trajs, temperature, autocast):
    """[B, L] log-probs of each sampled token under `model` at the sampling temperature, and the entropy of the
    distribution it was drawn from; 0 on prompt, observation and padding positions, which the loss masks anyway
    (the LM head runs only on sampled tokens: rollout.masked_logprobs)."""
    seqs, images = batch_inputs(trajs, processor)
    with autocast:
        return rollout.masked_logprobs(model, processor, seqs, images, [t.loss_mask for t in trajs], temperature)


def padded(rows):
    return torch.tensor(rollout.pad_batch([list(r) for r in rows], 0.0, left=False), dtype=torch.float32)  # [B, L]


def frozen_logprobs(model, processor, trajs, keep, micro_batch, temperature, autocast):
    """{i: per-token log-probs of trajs[i]} under a model that is not being trained at this moment (the policy
    before the update, or the reference policy), in micro-batches, without gradient."""
    out = {}
    with torch.no_grad(), rollout.unsharded(model):  # under --fsdp: each rank's own forwards, the whole weights
        for k in range(0, len(keep), micro_batch):
            idx = keep[k:k + micro_batch]
            logp, _ = forward_logprobs(model, processor, [trajs[i] for i in idx], temperature, autocast)
            # trimmed to the trajectory: padded() pads it again in whatever micro-batch the update draws
            out.update({i: logp[j, :len(trajs[i].token_ids)].tolist() for j, i in enumerate(idx)})
    return out


def update(model, processor, trajs, adv, opt, *, temperature, micro_batch, ppo_epochs=1, minibatches=1,
           loss_agg="token-mean", clip_low=0.2, clip_high=0.28, kl_coef=0.0, grad_clip=1.0, ref_model=None,
           autocast=nullcontext(), seed=0, owned=None):
    """PPO-style epochs over one rollout batch. Groups with all-equal rewards have zero advantage and (without
    KL) no gradient, so they are left out. Returns counts (trained, opt_steps, tokens, seq_tokens), per-token
    means (clip_frac, kl_old, kl_ref, entropy) and the mean grad_norm per optimizer step.
    owned: under torchrun, the indices of the trajectories this rank sampled (it holds their images); every rank
    plans the same minibatches over the whole batch, computes the loss of its own members and the ranks sum their
    gradients, so the step is that of one process."""
    device = next(model.parameters()).device
    owns = (lambda i: True) if owned is None else owned.__contains__
    keep = [i for i, t in enumerate(trajs) if (adv[i] != 0 or kl_coef)]  # no gradient from the rest
    totals = dict.fromkeys(["tokens", "seq_tokens", "clipped", "kl_old", "kl_ref", "entropy", "grad_norm", "opt_steps"],
                           0.0)
    # the ratio's denominator: the sampler's log-probs, unless later passes need the pre-update policy's own
    old = {i: trajs[i].logprobs for i in keep}
    mine = [i for i in keep if owns(i)]  # the forwards need images: our own only
    if ppo_epochs * minibatches > 1:  # more than one optimizer step on this batch
        old = frozen_logprobs(model, processor, trajs, mine, micro_batch, temperature, autocast)
    ref = {} if ref_model is None else frozen_logprobs(ref_model, processor, trajs, mine, micro_batch, temperature,
                                                       autocast)
    gen = torch.Generator().manual_seed(seed)  # the same minibatches on every rank
    for _ in range(ppo_epochs):
        order = [keep[k] for k in torch.randperm(len(keep), generator=gen).tolist()]
        for mb in [order[k::minibatches] for k in range(minibatches)]:  # strided: sizes differ by 1 at most
            if not mb:  # more minibatches than trajectories
                continue
            mb.sort(key=lambda i: len(trajs[i].token_ids))  # similar lengths share a micro-batch: less padding
            # a global count (every rank holds every loss mask): the ranks' partial losses add up to the minibatch's
            denom = sum(sum(trajs[i].loss_mask) for i in mb) if loss_agg == "token-mean" else len(mb)
            opt.zero_grad(set_to_none=True)
            own = [i for i in mb if owns(i)]
            # under --fsdp a rank with fewer micro-batches of this minibatch makes up the difference with idle passes
            for _ in range(rollout.lockstep_passes(model, -(-len(own) // micro_batch))):
                rollout.idle_pass(model)
            for k in range(0, len(own), micro_batch):  # gradient accumulation: the loss is already / denom
                idx = own[k:k + micro_batch]
                batch = [trajs[i] for i in idx]
                logp, entropy = forward_logprobs(model, processor, batch, temperature, autocast)
                mask = padded([t.loss_mask for t in batch]).to(device)  # [b, L]: the sampled tokens
                loss, st = policy_loss(logp, padded([old[i] for i in idx]).to(device), adv[idx].to(device), mask,
                                       clip_low, clip_high, loss_agg, denom,
                                       padded([ref[i] for i in idx]).to(device) if ref else None, kl_coef)
                loss.backward()
                for name, v in st.items():
                    totals[name] += v
                totals["entropy"] += (entropy * mask).sum().item()
                totals["seq_tokens"] += sum(len(t.token_ids) for t in batch)
            rollout.all_reduce_grads([p for p in model.parameters() if p.requires_grad])  # several ranks: summed
            # after the sum: every rank clips the same gradient and takes the same step
            totals["grad_norm"] += rollout.clip_grads(model.parameters(), grad_clip)
            opt.step()
            totals["opt_steps"] += 1
    summed = ["tokens", "seq_tokens", "clipped", "kl_old", "kl_ref", "entropy"]  # the others agree on every rank
    totals.update(zip(summed, rollout.all_sum([totals[k] for k in summed])))
    n = max(totals["tokens"], 1.0)  # stats per sampled token, over all epochs
    return {"trained": len(keep), "opt_steps": int(totals["opt_steps"]), "tokens": totals["tokens"],
            "seq_tokens": totals["seq_tokens"],
            "clip_frac": totals["clipped"] / n, "kl_old": totals["kl_old"] / n, "kl_ref": totals["kl_ref"] / n,
            "entropy": totals["entropy"] / n, "grad_norm": totals["grad_norm"] / max(1, totals["opt_steps"])}


# -----------------------------------------------------------------------------
# data, rollout statistics, evaluation


def rl_prompt(task_list, pos, seed, data=None):
    """The RL prompt at data position `pos`: tasks round-robin, each a fresh example of the rl split; or, with
    `data` (examples read from --data), its examples in order, cycling."""
    if data:
        return data[pos % len(data)]  # cycles: --steps may outrun the file
    task = task_list[pos % len(task_list)]
    # seed * 1_000_003 + k (the task's k-th prompt): different --seed runs draw disjoint seeds while k < 1,000,003
    return tasks.generate(task, 1, split="rl", seed=seed * 1_000_003 + pos // len(task_list))[0]


def adl_for(offered, pos, seed):
    """ADL of one prompt, (randomized schemas, Mapping) as adl.randomize returns it; a pure function of (seed, data
    position), so a resumed run redraws it."""
    return adl.randomize(schemas(offered), random.Random(f"adl-{seed}-{pos}"))


def evaluate(model, processor, task_list, eval_n, offered, use_adl, seed, batch_size, autocast, label, **limits):
    """rollout.evaluate on eval_n test examples per task -> {task: metrics, "mean_accuracy", "seconds"}."""
    t0 = time.perf_counter()
    examples = tasks.test_set(task_list, eval_n)
    plan = adl.plan(examples, schemas(offered), "per-sample" if use_adl else "off", seed)
    with autocast, rollout.unsharded(model):  # under --fsdp every rank evaluates its share on the whole weights
        _, results = rollout.evaluate(model, processor, examples, offered, plan, batch_size, f"eval {label}", **limits)
    results["mean_accuracy"] = sum(r["accuracy"] for r in results.values()) / len(results)  # unweighted over tasks
    results["seconds"] = time.perf_counter() - t0
    return results


# -----------------------------------------------------------------------------
# the loop


def whole_batch(local, infos, adv, slots, group_size):
    """Every rank learns the whole step's trajectories, rewards and advantages, in one process's order (prompt,
    then sample); the images stay on the rank that made them. -> (trajs, infos, adv, the slots of `local`).
    At world size 1 this only puts `local` in that order."""
    # global slot: the prompt's place in the step * G + the sample index (local holds whole groups, example-major)
    at = [t.example_index * group_size + j % group_size for j, t in enumerate(local)]
    trajs, infos_all, adv_all = [None] * slots, {}, {}
    for part in rollout.all_gather((at, [replace(t, images=[]) for t in local], infos, adv.tolist())):
        for i, t, info, a in zip(*part):
            trajs[i], infos_all[i], adv_all[i] = t, info, a
    for i, t in zip(at, local):
        trajs[i] = t  # our own, with their images: the update encodes them
    return (trajs, [infos_all[i] for i in range(slots)],
            torch.tensor([adv_all[i] for i in range(slots)], dtype=torch.float64), at)


def step_record(step, lr, pos, examples, trajs, infos, adv, group_size, upd, time_rollout, time_update):
    """A step's log line: the reward terms, then rollout.metrics' vocabulary over the batch and per task (each task
    with its reward split), then the update's statistics."""
    sampled = [examples[t.example_index] for t in trajs]  # the example each trajectory answers
    by_task = rollout.metrics_by_task(sampled, trajs)
    for task, m in by_task.items():
        mine = [i for i, ex in zip(infos, sampled) if ex["task"] == task]
        m.update({k: rollout.mean(i[k] for i in mine) for k in REWARD_SPLIT})
    return {"step": step, "lr": lr, "data_pos": pos, "examples": [ex["id"] for ex in examples],
            **{k: rollout.mean(i[k] for i in infos) for k in ("tool_quality", "tool_term") + REWARD_SPLIT},
            "reward_std": float(torch.tensor([i["reward"] for i in infos]).std()),
            # groups whose samples all scored alike: their advantages are zero and they teach nothing
            "flat_groups": sum(float(a) == 0.0 for a in adv.view(-1, group_size).abs().sum(1)),
            **rollout.metrics(sampled, trajs, by_level=False), "by_task": by_task,
            **upd, "time_rollout": time_rollout, "time_update": time_update,
            "tokens_per_s": upd["seq_tokens"] / max(time_update, 1e-9), "peak_rss_mib": rollout.peak_rss_mib()}


def main(argv=None):
    # 1. set-up: the policy to train (a resumed run: its checkpoint's), the frozen reference for the KL term, the
    # optimizer, the log
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    rank, world, device = rollout.dist_setup(rollout.resolve_device(args.device), args.fsdp)
    if not rollout.model_exists(args.init):
        raise tasks.InputError(f"the initial policy {args.init!r} does not exist. Run `python coldstart.py` first (it "
                               "writes runs/tc/model), or pass --init PATH to a model directory, or --init tiny (the "
                               "pretrained base, no TC).")
    os.makedirs(args.out, exist_ok=True)
    log_path, ckpt_dir = os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "ckpt")
    found = rollout.resume_from(ckpt_dir, args.resume)
    # fp32 weights (bf16 autocast on CUDA); a resumed run reads the checkpoint's weights
    model, processor = rollout.load_policy(os.path.join(found, "model") if found else args.init, device,
                                           dtype=torch.float32)
    if args.grad_checkpointing:
        rollout.checkpoint_activations(model)
    autocast = rollout.train_autocast(device)  # bf16 on CUDA; fp32 on a CPU, where the rollouts are fp32 too
    task_list = args.tasks.split(",")
    offered = tool_list(args.tools)
    protocol = rollout.protocol_of(args.protocol, args.init)  # from --init: a checkpoint's model/ has no protocol.json
    data = None
    if args.data:
        data, skipped = tasks.read_parquet(args.data)
        data = [ex for ex in data if ex["task"] in task_list]
        print(f"{len(data)} RL prompts from {args.data}; skipped (no exact scorer here): "
              f"{', '.join(f'{k} {v}' for k, v in skipped.items()) or 'none'}")
        if not data:
            raise tasks.InputError(f"{args.data}: no rows of the tasks {task_list}")
    if protocol.name != "ours" and args.adl:
        raise tasks.InputError("--adl rewrites this project's protocol only; it does not combine with --protocol "
                               "official")
    ref_model = None
    if args.kl_coef:  # the frozen initial policy
        # resumed, `model` holds trained weights: the reference is reloaded from --init
        ref_model = rollout.load_policy(args.init, device, dtype=torch.float32)[0] if found else copy.deepcopy(model)
        ref_model.eval().requires_grad_(False)
        if args.fsdp:
            rollout.shard(ref_model)
    if args.fsdp:  # before the optimizer: it must hold the shards
        rollout.shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step, pos, evals = 0, 0, {}  # pos: the data position, the next RL prompt's index
    if found:
        state = rollout.load_checkpoint(found, opt, model)
        step, pos, evals = state["step"], state["data_pos"], state["evals"]
        print(f"resumed at step {step}")
    # the log as of the state we start from (TG numbers steps from 0); only rank 0 writes it
    log = rollout.open_log(log_path, step, first=0) if rank == 0 else open(os.devnull, "w")

    # 2. the loop (its phases numbered inside), after an optional evaluation of the initial policy
    limits = dict(rollout.limits_of(args), protocol=protocol)
    if args.eval_before and args.eval_n and step == 0:
        evals["before"] = evaluate(model, processor, task_list, args.eval_n, offered, args.adl, args.seed,
                                   args.eval_batch, autocast, "before", **limits)

    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="grpo")
    for step in bar:
        t0 = time.perf_counter()
        step_seed = args.seed * 1_000_003 + step  # the step's sampling and minibatch order, whatever resumed it
        lr = rollout.lr_at(step, args.steps, args.lr, args.warmup, args.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        # 1. this step's prompts: fresh rl-split examples, tasks round-robin; a pure function of the data position,
        # so a resumed run draws the same ones (and, under ADL, the same random tool names for each group)
        examples = [rl_prompt(task_list, pos + k, args.seed, data) for k in range(args.prompts_per_step)]
        mappings = [adl_for(offered, pos + k, args.seed) for k in range(len(examples))] if args.adl else None
        pos += len(examples)
        # 2. sample group_size multi-turn trajectories per prompt with the current policy (tools run for real).
        # Under torchrun a rank samples every world-th prompt, keyed by its place in the step, so the samples are
        # those of one process
        mine = list(range(rank, len(examples), world))
        model.eval()
        with autocast, rollout.unsharded(model), \
                tqdm(total=len(mine) * args.group_size, desc="rollout", leave=False, disable=rank > 0) as rbar:
            local = rollout.rollout(model, processor, [examples[k] for k in mine], tools=offered,
                                    group_size=args.group_size, temperature=args.temperature, top_p=args.top_p,
                                    seed=step_seed,
                                    adl=[mappings[k] for k in mine] if mappings else None, progress=rbar,
                                    keys=mine, **limits)
        # 3. rewards from the checked answer, the format and the tool calls; advantages normalized within each group,
        # so only differences between samples of the same prompt push the policy (groups are whole on a rank)
        for t in local:
            t.example_index = mine[t.example_index]  # the prompt's place in the step
        infos = [reward(t, examples[t.example_index], args.reward, args.tool_reward_weight) for t in local]
        adv = group_advantages([i["reward"] for i in infos], args.group_size, not args.no_std)
        # from here every rank holds the whole step in one order (images only of its own): update() plans over it
        trajs, infos, adv, at = whole_batch(local, infos, adv, len(examples) * args.group_size, args.group_size)
        t1 = time.perf_counter()
        # 4. the clipped policy-gradient update on the sampled tokens only (observations and prompts are masked)
        model.train()
        upd = update(model, processor, trajs, adv, opt, temperature=args.temperature, micro_batch=args.micro_batch,
                     ppo_epochs=args.ppo_epochs, minibatches=args.minibatches, loss_agg=args.loss_agg,
                     clip_low=args.clip_low, clip_high=args.clip_high, kl_coef=args.kl_coef, grad_clip=args.grad_clip,
                     ref_model=ref_model, autocast=autocast, seed=step_seed,
                     owned=set(at) if world > 1 else None)  # the slots whose images this rank holds
        t2 = time.perf_counter()

        record = step_record(step, lr, pos, examples, trajs, infos, adv, args.group_size, upd, t1 - t0, t2 - t1)
        log.write(json.dumps(record) + "\n")  # one line per step, appended: a resumed run continues the same file
        log.flush()  # a kill loses at most this line; open_log drops it on resume if torn
        bar.set_postfix(step=step, reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.3f}",
                        cps=f"{record['cps']:.2f}")
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0:  # weights, optimizer, RNG, data; rank 0 writes
            # step + 1 steps are done; pos is already past this step's prompts
            rollout.save_checkpoint(ckpt_dir, model, processor, opt,
                                    {"step": step + 1, "data_pos": pos, "evals": evals})
    bar.close()
    log.close()

    # 3. the trained policy saved, then evaluated on the same test examples as before training
    model.eval()
    rollout.release_memory()  # the last update's activations and encodings: the evaluation needs none of them
    # protocol.name: a policy trained under the official protocol says so in protocol.json; every rank, rank 0 writes
    rollout.save_policy(model, processor, os.path.join(args.out, "model"), protocol.name)
    if args.eval_n:  # every rank: rollout.evaluate splits the examples over the ranks
        evals["after"] = evaluate(model, processor, task_list, args.eval_n, offered, args.adl, args.seed,
                                  args.eval_batch, autocast, "after", **limits)
    if rank == 0:
        rollout.write_json_atomic(os.path.join(args.out, "eval.json"), evals, indent=1)
    rollout.barrier()  # no rank returns before rank 0 has written eval.json
    for label, res in evals.items():
        print(f"{label}: mean accuracy {res['mean_accuracy']:.3f}")
        for task, m in res.items():
            if isinstance(m, dict):
                print(rollout.describe(task, m))
    print(f"policy saved to {os.path.join(args.out, 'model')}")
    return evals


if __name__ == "__main__":
    rollout.cli(main)
