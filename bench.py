"""
Performance benchmarks, each against a naive baseline measured in the same run.

    python bench.py rollout                 # the KV-cache engine vs rebuild-and-generate every turn
    python bench.py rollout --config 7b     # the Qwen2.5-VL-7B shape, random weights, bf16 (a GPU)
    python bench.py curve                   # wall time of both for 1, 2, 4 and 8 tool turns per trajectory
    python bench.py train                   # SFT/GRPO update throughput: tokens/s forward + backward
    python bench.py tools                   # median latency of each tool on a 512x512 scene

`rollout` scripts the tool calls (a forcer writes them; the model writes its own thinking tokens greedily in
between), so that a randomly initialised model makes 3 tool calls that return images, and checks that the
engine and the baseline emit the same tokens.

On a CPU, `rollout` and `train` also profile one more run of the engine or the optimised step and report the
seconds of its arithmetic kernels alone (matrix products, attention, the patch convolution) and the ratio those
seconds would give against the same baseline (`zero_overhead_speedup`): the most a faster engine or training loop
could reach with these kernels on this machine.
"""
import argparse
import functools
import json
import resource
import time

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import rollout
import tasks
import tiny
import tools

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("what", choices=["rollout", "curve", "train", "tools"])
# scratch: the speed of a pass depends on its shapes, not on what the weights know; the shipped base (tiny) closes its
# turns itself within the free thinking tokens, before the scripted calls, and would time short trajectories
parser.add_argument("--model", default="scratch", help="'scratch' (the tiny shape, random weights), 'tiny' (the "
                    "shipped base) or a model directory; with --config 7b: random weights of that shape")
parser.add_argument("--config", default=None, choices=[None, "7b"], help="build a random model of this real shape")
parser.add_argument("--prompts", type=int, default=8, help="distinct prompts")
parser.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO group)")
parser.add_argument("--turns", type=int, default=3, help="tool calls per trajectory (each returns an image)")
parser.add_argument("--free", type=int, default=24, help="tokens the model writes itself in each turn's thinking")
parser.add_argument("--skip-baseline", action="store_true", help="time the engine only")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
rollout.add_device_flag(parser)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default=None, help="append the result as a JSON line to this file")


def load(model_path, config, device, dtype=None):
    """-> (model, processor): model_path loaded as the stages load it, or, with config "7b", random weights of
    Qwen2.5-VL-7B's shape (bf16). dtype: None as the rollouts load it (bf16 weights on CUDA, fp32 on a CPU);
    torch.float32 as the training stages do (fp32 weights, bf16 autocast on CUDA)."""
    device = rollout.resolve_device(device)
    if config != "7b":
        return rollout.load_policy(model_path, device=device, dtype=dtype)
    # random weights of the real shape: the speed of a pass depends on its shapes, not on what the weights know
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    processor = rollout.Processor.from_pretrained(tiny.BASE_DIR)  # only its token ids matter for speed
    # text: 28 layers of width 3584, 28 query heads over 4 KV heads (GQA), head_dim 128, so mrope_section covers its
    # 64 rotary pairs (t, h, w); vision: 32 windowed blocks of width 1280, full attention in every 8th
    config = Qwen2_5_VLConfig(  # Qwen2.5-VL-7B-Instruct's shape
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, rope_parameters={
                             "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        image_token_id=processor.image_pad, vision_start_token_id=processor.vision_start,
        vision_end_token_id=processor.vision_end)
    config._attn_implementation = "sdpa"
    # the parameters are created on the device itself: ~8B of them in fp32 (~33 GB) never pass through host memory
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    # a realistic image size for the 7B: at most 16 x 16 = 256 vision tokens of 28 px per image
    processor.image_processor.max_pixels = 448 * 448
    return model.eval(), processor


def peak_rss_gib():
    """The process's peak resident memory so far, in GiB (ru_maxrss is in KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)


def bench_examples(n):
    """vstar canvases: one input image each, large enough that Crop returns a 224 px zoom."""
    return tasks.generate("vstar", n, split="test", seed=0)


def script(processor, turns, free):
    """The forcer: in each turn the model writes `free` thinking tokens itself, then a Crop call is forced."""
    # call k crops the image call k-1 returned (img_1 is the input); Crop zooms every crop to a short side of
    # at least 224 px, so the next box, `d` px narrower and shorter, always lies inside the image it names
    d = min(30, 120 // max(turns, 1))  # 30 px up to 4 turns; 15 px at 8, whose last box is still 95 x 75 px
    calls = [f'</think><tool_call>{{"name": "Crop", "parameters": {{"image": "img_{k + 1}", '
             f'"coordinates": [0, 0, {200 - d * k}, {180 - d * k}]}}}}</tool_call>' for k in range(turns)]
    calls.append("</think><response>\\boxed{A}</response>")
    think = processor.encode_text("<think>")
    forced = [processor.encode_text(c) + [processor.im_end] for c in calls]

    # turn: assistant turns already written; toks: this turn's tokens so far -> the token to force, or None for the
    # model's own greedy choice, which the engine and the baseline must then agree on (`row` goes unused)
    def forcer(row, turn, toks):
        if len(toks) < len(think):
            return think[len(toks)]
        j = len(toks) - len(think) - free  # position in the forced tail; negative while the model writes
        if j < 0:
            return None
        seq = forced[min(turn, len(forced) - 1)]
        return seq[j] if j < len(seq) else processor.im_end
    return forcer


class ForceLogits(LogitsProcessor):
    """The same forcer for model.generate: a forced token gets all the probability mass."""

    def __init__(self, forcer, rows, turn, prompt_len):
        self.forcer, self.rows, self.turn, self.prompt_len = forcer, rows, turn, prompt_len

    def __call__(self, input_ids, scores):
        # input_ids: [live rows, prompt_len + tokens written]; the prompts are left-padded to prompt_len, so every
        # row's tokens of this turn start there; scores: [live rows, vocab], row b is self.rows[b]
        for b, row in enumerate(self.rows):
            x = self.forcer(row, self.turn, input_ids[b, self.prompt_len:].tolist())
            if x is not None:
                scores[b] = float("-inf")  # greedy decoding then has no choice but x
                scores[b, x] = 0.0
        return scores


@torch.no_grad()
def baseline(model, processor, examples, group, turns, forcer):
    """What a straightforward multi-turn loop does: every turn, re-encode the whole conversation (all images
    through the vision tower again) and call model.generate from scratch, batched over the live rows."""
    device = next(model.parameters()).device
    rows = []
    for ex in examples:
        msgs = rollout.build_messages(ex, tools.schemas())
        # the prompt tokens the engine prefills (rollout.rollout's phase 1), the first assistant header included
        ids, _ = rollout.encode(processor, [p for m in msgs for p in rollout.render(m)] + ["<|im_start|>assistant\n"])
        # one row per group member, example-major like the engine's trajectories; greedy copies are identical, yet
        # the baseline computes each of them
        rows += [{"row": len(rows) + g, "ids": list(ids), "images": list(ex["images"]), "done": False}
                 for g in range(group)]
    n_generated = 0  # tokens written, each turn's <|im_end|> included (the engine's loss_mask counts the same)
    for turn in range(turns + 1):  # `turns` tool calls, then the answer
        live = [r for r in rows if not r["done"]]
        if not live:
            break
        # the whole conversation so far, left-padded so that every row's next token comes at the same position
        seqs = rollout.pad_batch([r["ids"] for r in live], processor.pad, left=True)
        input_ids = torch.tensor(seqs, device=device)
        attn = (torch.tensor(rollout.pad_batch([[1] * len(r["ids"]) for r in live], 0, left=True), device=device))
        # every image of every live row, in token order; the preprocessing is cached, the vision tower is not
        encoded = [rollout.encode_image_cached(processor, im) for r in live for im in r["images"]]
        # mm_token_type_ids (1 on image pads) is what generate computes the images' M-RoPE positions from
        out = model.generate(
            input_ids=input_ids, attention_mask=attn, mm_token_type_ids=(input_ids == processor.image_pad).int(),
            pixel_values=torch.cat([p for p, _ in encoded]).to(device, model.dtype),
            image_grid_thw=torch.stack([g for _, g in encoded]).to(device), do_sample=False, max_new_tokens=512,
            eos_token_id=processor.im_end, pad_token_id=processor.pad,
            logits_processor=LogitsProcessorList([ForceLogits(forcer, [r["row"] for r in live], turn,
                                                              input_ids.shape[1])]))
        for b, r in enumerate(live):
            new = out[b, input_ids.shape[1]:].tolist()
            # generate pads a row that stopped before the batch's longest: keep it up to its own <|im_end|>
            new = new[:new.index(processor.im_end) + 1] if processor.im_end in new else new
            n_generated += len(new)
            r["ids"] += new
            call, err = rollout.parse_tool_call(processor.decode(new))
            if call is None:  # the answer (or a turn with no call) ends the row
                r["done"] = True
                continue
            result = tools.call_tool(call["name"], call["parameters"], r["images"])
            text, _ = rollout.add_observation(r["images"], call["name"], result)
            msg = rollout.observation_message(text, result.image)
            # "\n" after the <|im_end|>, the observation, the next assistant header: what observation_chunk appends
            obs, _ = rollout.encode(processor, ["\n"] + rollout.render(msg) + ["<|im_start|>assistant\n"])
            r["ids"] += obs
    return [r["ids"] for r in rows], n_generated


def time_rollout(model, processor, examples, group, turns, free, with_baseline=True, warm_up=True):
    """The engine and (with_baseline) the baseline on the same scripted rollout: seconds, tokens/s, where the
    engine's time went, and whether both wrote the same tokens. warm_up=False skips the untimed first runs (for a
    check of the tokens only)."""
    device = next(model.parameters()).device
    forcer = script(processor, turns, free)
    # seconds spent inside the vision tower: the pre-hook starts a clock, the forward hook adds what elapsed
    vision = {"s": 0.0}
    hooks = [model.model.visual.register_forward_pre_hook(lambda m, a: vision.__setitem__("t0", time.perf_counter())),
             model.model.visual.register_forward_hook(
                 lambda m, a, o: vision.__setitem__("s", vision["s"] + time.perf_counter() - vision["t0"]))]
    # warm up both paths once on a single prompt so neither pays first-call costs in its timed run
    if warm_up:
        rollout.rollout(model, processor, examples[:1], temperature=0, forcer=forcer)
        if with_baseline:
            baseline(model, processor, examples[:1], 1, turns, forcer)
    if device.type == "cuda":
        # the warm-up's kernels finish before the clock starts, and the peak below is the timed run's own
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    vision["s"], timings = 0.0, {}  # timings: the engine's seconds in prefill, decode and waiting on tools
    t0 = time.perf_counter()
    # turns calls and the answer: turns + 1 assistant turns, as the baseline writes them
    trajs = rollout.rollout(model, processor, examples, group_size=group, temperature=0, forcer=forcer,
                            timings=timings, max_turns=turns + 1)
    engine_s = time.perf_counter() - t0
    engine_vision = vision["s"]
    # tokens written (the loss mask is 1 exactly on them): free thinking, forced calls and answers, <|im_end|>s
    generated = sum(sum(t.loss_mask) for t in trajs)
    calls = sum(len(t.calls) for t in trajs)
    # every vstar prompt has one input image, so the others in t.images are tool results; in engine_split_s the
    # vision seconds are a part of prefill (the tower runs while prompts and observations are prefilled)
    result = {"prompts": len(examples), "group": group, "turns": turns, "trajectories": len(trajs),
              "tool_calls": calls, "image_observations": sum(len(t.images) - 1 for t in trajs),
              "generated_tokens": generated, "total_tokens": sum(len(t.token_ids) for t in trajs),
              "engine_s": round(engine_s, 2), "engine_tokens_per_s": round(generated / engine_s, 1),
              "engine_split_s": {k: round(v, 2) for k, v in {**timings, "vision": engine_vision}.items()},
              "finish_reasons": sorted({t.finish_reason for t in trajs})}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    if with_baseline:
        vision["s"] = 0.0
        t0 = time.perf_counter()
        seqs, base_generated = baseline(model, processor, examples, group, turns, forcer)
        base_s = time.perf_counter() - t0
        # identical_tokens compares whole sequences (prompts and observations too), example-major on both sides
        result.update(baseline_s=round(base_s, 2), baseline_tokens_per_s=round(base_generated / base_s, 1),
                      baseline_vision_s=round(vision["s"], 2),
                      speedup=round((generated / engine_s) / (base_generated / base_s), 2),
                      identical_tokens=seqs == [t.token_ids for t in trajs])
    for h in hooks:
        h.remove()
    return result


# the kernels that do a pass's arithmetic, as torch.profiler names them on a CPU: matrix products, the fused attention
# (forward and backward) and the vision tower's patch convolution
ARITHMETIC = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::mkldnn_convolution", "aten::convolution_backward")


def kernel_seconds(fn):
    """fn() once under torch.profiler -> the seconds its ARITHMETIC kernels ran (self time): what fn would take if
    everything else (Python, element-wise work, framework plumbing, sampling, bookkeeping) cost nothing. A ratio
    over it is the most any engine or training loop could reach against the same baseline with these kernels on
    this machine. CPU only: on CUDA the kernels run asynchronously and a CPU profile sees only their launches."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith(ARITHMETIC)) / 1e6  # us -> s


def bench_rollout(model, processor, prompts, group, turns, free, with_baseline):
    result = {"bench": "rollout", "device": str(next(model.parameters()).device), "threads": torch.get_num_threads()}
    examples = bench_examples(prompts)
    result.update(time_rollout(model, processor, examples, group, turns, free, with_baseline))
    if with_baseline and result["device"] == "cpu":
        # the engine once more, profiled: its arithmetic alone, and the ratio it would give against this baseline
        kernels = kernel_seconds(functools.partial(rollout.rollout, model, processor, examples, group_size=group,
                                                   temperature=0, forcer=script(processor, turns, free),
                                                   max_turns=turns + 1))
        result["engine_kernels_s"] = round(kernels, 2)
        result["zero_overhead_speedup"] = round(result["generated_tokens"] / kernels / result["baseline_tokens_per_s"],
                                                2)
    result["peak_rss_gib"] = peak_rss_gib()  # both paths together
    return result


def bench_curve(model, processor, prompts, group, free, with_baseline):
    """How the wall time grows with the tool turns per trajectory (1, 2, 4, 8): the engine prefills each turn's
    new tokens once, so its time should grow about linearly in the total tokens; the baseline re-encodes the whole
    conversation every turn, so its time grows about quadratically in the turns."""
    examples = bench_examples(prompts)
    rows = [time_rollout(model, processor, examples, group, turns, free, with_baseline) for turns in (1, 2, 4, 8)]
    print(f"{'turns':>5} {'total tokens':>12} {'engine s':>9} {'baseline s':>10} {'ratio':>6} identical")
    for r in rows:
        print(f"{r['turns']:>5} {r['total_tokens']:>12} {r['engine_s']:>9} {r.get('baseline_s', '-'):>10} "
              f"{r.get('speedup', '-'):>6} {r.get('identical_tokens', '-')}")
    return {"bench": "curve", "device": str(next(model.parameters()).device), "rows": rows,
            "peak_rss_gib": peak_rss_gib()}


def bench_train(model, processor, turns, free):
    """Forward + backward throughput of the SFT loss and of the GRPO update's log-probs on the same TC-like
    trajectories (batch of 8), each against its plain counterpart in the same run. Plain: logits over the whole
    vocabulary at every position, the padding mask, fp32, and (SFT) every image encoded again at every step.
    Optimised, as coldstart, tiny and grpo run them: the LM head only where a token carries loss, no padding mask
    (right padding under causal attention: rollout.sequence_inputs), bf16 autocast on CUDA (rollout.train_autocast;
    fp32 on a CPU), and image encodings reused (rollout.encode_image_cached). The losses of both are reported, to
    show they agree."""
    device = next(model.parameters()).device
    trajs = rollout.rollout(model, processor, bench_examples(8), temperature=0,
                            forcer=script(processor, turns, free))
    seqs, masks = [t.token_ids for t in trajs], [t.loss_mask for t in trajs]
    shown = [rollout.shown_images(t, processor) for t in trajs]  # the images the sequences hold
    # [B, L] right-padded like the sequences: 1 on the sampled tokens, the ones both losses average over
    mask = torch.tensor(rollout.pad_batch(masks, 0, left=False), dtype=torch.float32, device=device)
    model.train()

    def cached():
        return [[rollout.encode_image_cached(processor, im) for im in row] for row in shown]

    def plain(reencode):  # one full forward, every position's logits, fp32
        # reencode: the image processor runs again on every image at every step (no cache)
        images = [[processor.encode_image(im) for im in row] for row in shown] if reencode else cached()
        # lp: [B, L], 0 at t=0; the mask keeps the sampled tokens (padding's values mean nothing): their mean NLL
        lp = rollout.token_logprobs(rollout.sequence_logits(model, processor, seqs, images), seqs)
        return -(lp * mask).sum() / mask.sum()

    def sft_optimised(autocast=True):
        batch = [(s, m, im) for s, m, im in zip(seqs, masks, cached())]
        # autocast=False: the same code with autocast off, which separates the LM-head, padding-mask and
        # encoding-reuse savings from bf16's
        with rollout.train_autocast(device.type) if autocast else torch.autocast(device.type, enabled=False):
            loss, n = rollout.masked_lm_loss(model, processor, batch, device)
        return loss / n  # summed cross-entropy over the loss tokens / their count: plain's mean, computed cheaper

    def tg_optimised():
        with rollout.train_autocast(device.type):
            # the GRPO update's log-probs, [B, L] and 0 off the mask: their mean NLL matches plain's loss
            lp, _ = rollout.masked_logprobs(model, processor, seqs, cached(), masks)
        return -(lp * mask).sum() / mask.sum()

    def run(loss_fn, steps=5, floor=False):
        """Seconds per step (after one warm-up step) and the loss; lr 0 keeps the weights, so every variant times
        the same model. floor (on a CPU): one step more, profiled, for the seconds of its arithmetic alone."""
        # AdamW still steps: its state's memory and its time belong to an update like any other
        opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)

        def step():
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        for i in range(steps + 1):
            if i == 1:  # step 0 is the warm-up: allocator, kernels and caches settle before the clock starts
                t0 = time.perf_counter()
            if device.type == "cuda":  # reset every step: the peak reported is one step's (the last)
                torch.cuda.reset_peak_memory_stats()
            loss = step()
        if device.type == "cuda":  # CUDA runs asynchronously: wait for the last step before reading the clock
            torch.cuda.synchronize()
        out = {"s_per_step": round((time.perf_counter() - t0) / steps, 3), "loss": round(loss.item(), 5)}
        # every unpadded token of the batch (prompt and observations too), not only the loss tokens
        out["tokens_per_s"] = round(sum(map(len, seqs)) / out["s_per_step"], 1)
        if device.type == "cuda":
            out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        if floor and device.type == "cpu":
            out["kernels_s_per_step"] = round(kernel_seconds(step), 3)
        return out

    result = {"bench": "train", "device": str(device), "batch": len(seqs),
              "tokens_per_step": sum(map(len, seqs)), "loss_tokens_per_step": int(mask.sum()),
              "sft_autocast": "bf16" if rollout.bf16_autocast_fits(device.type) else "fp32"}
    # plain SFT re-encodes every image at every step; the GRPO update always reused encodings, so its plain
    # counterpart differs in the LM head and the padding mask (and, on CUDA, bf16 autocast)
    result["sft_plain"] = run(functools.partial(plain, True))
    result["sft_optimised"] = run(sft_optimised, floor=True)
    result["sft_optimised_fp32"] = run(functools.partial(sft_optimised, False))  # what autocast adds on its own
    result["tg_plain"], result["tg_optimised"] = run(functools.partial(plain, False)), run(tg_optimised, floor=True)
    for k in ("sft", "tg"):
        result[f"{k}_speedup"] = round(result[f"{k}_optimised"]["tokens_per_s"] / result[f"{k}_plain"]["tokens_per_s"],
                                       2)
        if "kernels_s_per_step" in result[f"{k}_optimised"]:  # the most a loop could reach with these kernels
            result[f"{k}_zero_overhead_speedup"] = round(
                result[f"{k}_plain"]["s_per_step"] / result[f"{k}_optimised"]["kernels_s_per_step"], 2)
    result["peak_rss_gib"] = peak_rss_gib()  # over all the variants above
    return result


def bench_tools():
    """Median latency of each tool over 50 calls on a 512x512 scene -> {"tool arguments": {"wall_ms", "cpu_ms"}};
    cpu time is the figure to trust when other processes share the machine."""
    # the scenes, 512x512: an 8x8 grid of 64 px cells, a GUI screen, a vstar canvas cut down from 1024 px, and the
    # jigsaw window (2x2 cells, one blacked out) scaled up so that each of its cells is a 256 px quadrant
    grid = tasks.generate("vsp_nav", 1, sizes=(8,))[0]["images"][0]
    jig = tasks.generate("jigsaw", 1)[0]["images"]
    screen = tasks.generate("guiqa", 1, size=(512, 512))[0]["images"][0]
    search = tasks.generate("vstar", 1)[0]["images"][0].resize((512, 512))
    big_jig = jig[0].resize((512, 512))
    # (tool, arguments, images as img_1, img_2, ...); the grid's cell centres are the pixels 32 + 64 k
    cases = [
        ("Point", {"image": "img_1", "description": "holes"}, [grid]),
        ("Point", {"image": "img_1", "description": "red circle"}, [search]),
        ("Draw2DPath", {"image": "img_1", "start_point": [32, 32], "directions": "R,R,R,D,D,D,L,D,D,R,R"}, [grid]),
        ("AStar", {"start": [32, 32], "goal": [480, 480], "obstacles": [[96, 32], [224, 288], [352, 160]],
                   "grid_size": 8}, []),
        ("DetectBlackArea", {"image": "img_1"}, [big_jig]),
        ("InsertImage", {"base_image": "img_1", "image_to_insert": "img_2", "coordinates": [256, 0, 512, 256]},
         [big_jig, jig[1]]),
        ("Crop", {"image": "img_1", "coordinates": [100, 100, 160, 160]}, [grid]),
        ("OCR", {"image": "img_1"}, [screen]),
    ]
    out = {}
    for name, params, images in cases:
        wall, cpu = [], []
        for _ in range(50):
            t, c = time.perf_counter(), time.process_time()
            r = tools.call_tool(name, params, images)
            wall.append(1000 * (time.perf_counter() - t))
            cpu.append(1000 * (time.process_time() - c))
            assert r.status == "success", r.error
        # medians resist the first call's warm-up; 40 characters of arguments still tell the two Points apart
        out[f"{name} {json.dumps(params)[:40]}"] = {"wall_ms": round(float(np.median(wall)), 1),
                                                    "cpu_ms": round(float(np.median(cpu)), 1)}
    return out


if __name__ == "__main__":
    args = parser.parse_args()
    rollout.keep_freed_memory()  # the allocator the stages run with (rollout.cli): both sides of every ratio get it
    torch.manual_seed(args.seed)  # --config 7b draws its random weights from torch's generator
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "tools":
        result = bench_tools()
    else:
        # train: fp32 weights, as coldstart, tiny and grpo train them, so that 'plain' is fp32 on CUDA too
        model, processor = load(args.model, args.config, args.device, torch.float32 if args.what == "train" else None)
        if args.what == "rollout":
            result = bench_rollout(model, processor, args.prompts, args.group, args.turns, args.free,
                                   not args.skip_baseline)
        elif args.what == "curve":
            result = bench_curve(model, processor, args.prompts, args.group, args.free, not args.skip_baseline)
        else:
            result = bench_train(model, processor, args.turns, args.free)
        result["model"] = args.config or args.model
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
