"""The rollout engine: exact log-probs, greedy equivalence with cache-free decoding, the loss mask, tool limits."""
import ctypes
import json
import pathlib
import random
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image

import adl
import rollout
import tiny
import tools


@pytest.fixture(scope="module")
def policy():
    # no protocol tag is a single token here, so the few tokens the model writes freely cannot open a tool call
    corpus = [rollout.system_prompt(tools.schemas()).replace("<", "< ")] * 3
    model, processor = tiny.build_scratch(tiny.build_tokenizer(corpus), seed=0)
    return model.eval(), processor


def make_examples(n):
    """Examples with different prompt lengths and image sizes."""
    out = []
    for i in range(n):
        img = Image.new("RGB", (96 + 40 * i, 128 + 24 * i), (40 * i % 255, 120, 200))
        img.paste((250, 250, 250), (10, 10, 40 + 5 * i, 50))
        out.append({"id": f"ex{i}", "task": "vstar", "question": "What colour is the square?" + " Look closely." * i,
                    "images": [img], "answer": "A", "meta": {}})
    return out


CROP = ('<think>zoom in</think><tool_call>{{"name": "Crop", "parameters": '
        '{{"image": "{img}", "coordinates": {box}}}}}</tool_call>')
SCRIPT = [CROP.format(img="img_1", box="[0, 0, 60, 60]"), CROP.format(img="img_2", box="[10, 20, 200, 180]"),
          '<think>oops</think><tool_call>{"name": "Crop", "parameters": {broken}}</tool_call>',
          "<think>done</think><response>\\boxed{A}</response>"]


def scripted(processor, script=SCRIPT, free=3):
    """A forcer: each turn writes the script's text, then (on even rows) `free` tokens of the model's own, then
    <|im_end|>. The model's tokens come after the call, so even an early <|im_end|> cannot break the script."""
    encoded = [processor.encode_text(s) for s in script]

    def forcer(row, turn, toks):
        seq = encoded[min(turn + row % 2, len(encoded) - 1)]
        if len(toks) < len(seq):
            return seq[len(toks)]
        return None if len(toks) < len(seq) + (free if row % 2 == 0 else 0) else processor.im_end
    return forcer


def full_forward_logprobs(model, processor, traj, temperature=1.0):
    images = [rollout.encode_image_cached(processor, im) for im in traj.images]
    with torch.no_grad():
        logits = rollout.sequence_logits(model, processor, [traj.token_ids], [images])
    return rollout.token_logprobs(logits, [traj.token_ids], temperature)[0], logits[0]


@pytest.mark.parametrize("n,group", [(1, 1), (5, 1), (2, 4)])
def test_logprobs_equal_full_forward(policy, n, group):
    model, processor = policy
    trajs = rollout.rollout(model, processor, make_examples(n), tools=["Crop"], group_size=group, temperature=1.0,
                            seed=3, forcer=scripted(processor), max_new_tokens=200)
    assert len(trajs) == n * group
    assert len({len(t.token_ids) for t in trajs}) > 1 or n == 1  # rows really differ in length
    for row, t in enumerate(trajs):
        assert t.finish_reason == "response" and t.answer == "A"
        if row % 2 == 0:  # these rows ran both Crops: two tool images in the sequence, then a broken call
            assert [c["status"] for c in t.calls] == ["success", "success", "error"] and len(t.images) == 3
        else:  # these start at the second Crop, on an image that does not exist yet
            assert [c["status"] for c in t.calls] == ["error", "error"] and "img_2" in t.calls[0]["error"]
        lp, _ = full_forward_logprobs(model, processor, t)
        mask = torch.tensor(t.loss_mask, dtype=torch.bool)
        diff = (lp[mask] - torch.tensor(t.logprobs)[mask]).abs().max().item()
        assert diff < 1e-4, diff
        assert all(p == 0.0 for p, m in zip(t.logprobs, t.loss_mask) if not m)


def test_a_too_elongated_tool_image_becomes_an_error_observation(policy):
    """A Crop 410x2 px (zoomed, still 1:205) cannot go through the image processor: the call is an error the model
    reads, and the rollout goes on."""
    model, processor = policy
    ex = {"id": "wide", "task": "vstar", "question": "Q?", "images": [Image.new("RGB", (420, 100), (9, 9, 9))],
          "answer": "A", "meta": {}}
    script = [CROP.format(img="img_1", box="[0, 0, 410, 2]"), "<think>done</think><response>\\boxed{A}</response>"]
    t = rollout.rollout(model, processor, [ex], tools=["Crop"], temperature=0,
                        forcer=scripted(processor, script, free=0))[0]
    assert [c["status"] for c in t.calls] == ["error"] and "too elongated" in t.calls[0]["error"]
    assert len(t.images) == 1 and t.answer == "A" and t.finish_reason == "response"


def test_positions_match_get_rope_index(policy):
    model, processor = policy
    t = rollout.rollout(model, processor, make_examples(1), tools=["Crop"], temperature=0,
                        forcer=scripted(processor))[0]
    grids = torch.stack([rollout.encode_image_cached(processor, im)[1] for im in t.images])
    ids = torch.tensor([t.token_ids])
    ref, _ = model.model.get_rope_index(ids, (ids == processor.image_pad).int(), grids)
    ours, _ = rollout.mrope_positions(t.token_ids, grids, processor)
    assert torch.equal(ref[:, 0], ours)


def test_greedy_batched_equals_cache_free_decoding(policy):
    """Greedy, batched and cached == per-example decoding with a full forward at every step: at every position
    the model chose freely, the cache-free argmax over the exact prefix is the token the engine emitted."""
    model, processor = policy
    examples = make_examples(4)
    batched = rollout.rollout(model, processor, examples, tools=["Crop"], temperature=0,
                              forcer=scripted(processor, free=6))
    free_positions = 0
    for i, t in enumerate(batched):
        _, logits = full_forward_logprobs(model, processor, t)
        forced = scripted(processor, free=6)
        turn, toks = 0, []
        for pos, (x, m) in enumerate(zip(t.token_ids, t.loss_mask)):
            if not m:
                if toks:
                    turn, toks = turn + 1, []
                continue
            if forced(i, turn, toks) is None:
                assert int(logits[pos - 1].argmax()) == x, (i, pos)
                free_positions += 1
            toks.append(x)
        alone = rollout.rollout(model, processor, [examples[i]], tools=["Crop"], temperature=0,
                                forcer=lambda r, turn, toks, i=i: scripted(processor, free=6)(i, turn, toks))[0]
        assert alone.token_ids == t.token_ids
    assert free_positions >= 20


@pytest.mark.parametrize("padded", [False, True])
def test_decode_step_equals_the_models_forward(policy, padded):
    """decode_step calls the decoder's modules itself: with every row fed, its logits are bit-identical to the
    model's own forward over the same cache, with and without pads (transformers takes another attention path for
    each). With the last row waiting on a tool, the fed rows' logits equal the forward's, in which the waiting row
    feeds a masked pad, and the waiting row's slot holds zeros."""
    model, _ = policy
    B, L = 3, 40
    ids = torch.randint(10, 300, (B, L), generator=torch.Generator().manual_seed(0))
    attn = torch.ones(B, L, dtype=torch.long)
    if padded:
        attn[0, :9] = 0  # row 0 is left-padded
    ours, ref = rollout.kv_cache(model), rollout.kv_cache(model)
    with torch.no_grad():
        for cache in (ours, ref):
            model(input_ids=ids, attention_mask=attn, use_cache=True, **rollout.cache_kwarg(model, cache))
        a_ours = a_ref = attn
        for step, fed in enumerate([B, B, B - 1, B - 1, B]):
            tokens = [17 + 5 * step + r for r in range(B)]
            pos = [L + step] * B
            logits, a_ours = rollout.decode_step(model, ours, a_ours, tokens[:fed], pos[:fed], "cpu")
            a_ref = torch.cat([a_ref, torch.tensor([[1]] * fed + [[0]] * (B - fed))], dim=1)
            out = model(input_ids=torch.tensor(tokens).view(-1, 1), attention_mask=a_ref, use_cache=True,
                        position_ids=torch.tensor(pos).view(1, -1, 1).expand(3, -1, 1),
                        **rollout.cache_kwarg(model, ref))
            expect = out.logits[:fed, -1].float()
            assert torch.equal(a_ours, a_ref) and logits.shape == expect.shape
            if fed == B and step < 2:  # before any row waited: the same batch, the same arithmetic
                assert torch.equal(logits, expect)
            else:
                assert torch.allclose(logits, expect, atol=1e-5), (logits - expect).abs().max()
            if fed < B:
                assert all(not layer.keys[fed:, :, -1].any() for layer in ours.layers)


def test_a_reordering_moves_only_the_rows_that_change_place():
    """GrowingLayer.batch_select_indices with a permutation (LiveBatch moves the rows it feeds first) gives what
    indexing gives, and without new buffers; selecting fewer rows copies."""
    layer = rollout.GrowingLayer()
    k, v = torch.randn(4, 2, 5, 8), torch.randn(4, 2, 5, 8)
    layer.update(k, v)
    buf = layer.kbuf
    order = torch.tensor([3, 1, 2, 0])
    layer.batch_select_indices(order)
    assert layer.kbuf is buf and torch.equal(layer.keys, k[order]) and torch.equal(layer.values, v[order])
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(layer.keys, k[order][[2, 0]]) and layer.kbuf.shape[0] == 2


def test_observations_prefill_in_groups_as_in_one_forward(policy):
    """prefill_in_groups runs chunks of very different lengths as separate forwards (length_groups): the logits, the
    attention mask and every real token's cached keys and values equal one forward over all chunks padded to the
    longest (to float rounding), and the slots a group leaves empty hold zeros."""
    model, processor = policy
    assert rollout.length_groups([60, 50, 6]) == [(0, 3)]  # 54 pad positions saved: not worth a forward
    lengths = [300, 280, 10, 8]
    assert rollout.length_groups(lengths) == [(0, 2), (2, 4)]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 300, (20,), generator=gen).tolist() for _ in lengths]
    chunks = []
    for n in lengths:
        ids = torch.randint(10, 300, (n,), generator=gen).tolist()
        chunks.append((ids, [], rollout.mrope_positions(ids, [], processor, 20)[0]))
    results = []
    with torch.no_grad():
        for prefill in (rollout.forward_chunk, rollout.prefill_in_groups):
            cache = rollout.kv_cache(model)
            first = [(p, [], rollout.mrope_positions(p, [], processor)[0]) for p in prompts]
            _, attn = rollout.forward_chunk(model, processor, first, cache, None, "cpu")
            logits, attn = prefill(model, processor, chunks, cache, attn, "cpu")
            results.append((logits, attn, cache))
    (ref, ref_attn, ref_cache), (ours, our_attn, our_cache) = results
    assert torch.equal(our_attn, ref_attn) and torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    L, N = 20, lengths[0]
    for mine, theirs in zip(our_cache.layers, ref_cache.layers):
        assert mine.get_seq_length() == L + N and mine.window is None
        for r, n in enumerate(lengths):  # a row's real slots: its cached prompt and its chunk, right-aligned
            real = list(range(L)) + list(range(L + N - n, L + N))
            assert torch.allclose(mine.keys[r, :, real], theirs.keys[r, :, real], atol=1e-4)
            assert torch.allclose(mine.values[r, :, real], theirs.values[r, :, real], atol=1e-4)
        assert not mine.keys[2:, :, L:L + N - lengths[2]].any()  # the second group's empty slots


def test_loss_mask_covers_exactly_the_model_tokens(policy):
    model, processor = policy
    t = rollout.rollout(model, processor, make_examples(2), tools=["Crop"], temperature=1.0, seed=1,
                        forcer=scripted(processor))[0]
    spans, cur = [], []
    for x, m in zip(t.token_ids, t.loss_mask):
        if m:
            cur.append(x)
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    assert [processor.decode(s) for s in spans] == [a + "<|im_end|>" for a in t.assistant_turns]
    unmasked = processor.decode([x for x, m in zip(t.token_ids, t.loss_mask) if not m])
    assert "<|image_pad|>" in unmasked and '"status": "success"' in unmasked and "<|im_start|>system" in unmasked
    assert "zoom in" not in unmasked


def test_hanging_tool_is_cut_and_malformed_call_does_not_stop_the_batch(policy, monkeypatch):
    model, processor = policy
    release = threading.Event()  # the hung thread ends with the test, not 30 s later in another test

    def hang(args, images):
        release.wait(30)
    schema = {"type": "function", "function": {"name": "Sleep", "description": "waits",
                                               "parameters": {"type": "object", "properties": {}, "required": []}}}
    monkeypatch.setitem(tools.TOOLS, "Sleep", (schema, hang))
    script = ['<think>wait</think><tool_call>{"name": "Sleep", "parameters": {}}</tool_call>',
              "<think>done</think><response>\\boxed{A}</response>"]
    bad = ['<think>x</think><tool_call>{"name": "Crop", "parameters": </tool_call>',
           '<think>x</think><tool_call>{"name": "NoSuchTool", "parameters": {}}</tool_call>',
           '<think>x</think><tool_call>{"name": "Crop", "parameters": {}}',  # never closed
           "<think>done</think><response>\\boxed{A}</response>"]
    enc = [[processor.encode_text(s) + [processor.im_end] for s in sc] for sc in (script, bad)]

    def forcer(row, turn, toks):
        seq = enc[row % 2][min(turn, len(enc[row % 2]) - 1)]
        return seq[len(toks)] if len(toks) < len(seq) else processor.im_end
    try:
        trajs = rollout.rollout(model, processor, make_examples(2), tools=["Sleep", "Crop"], temperature=0,
                                tool_timeout=0.5, forcer=forcer)
    finally:
        release.set()
    hung, broken = trajs
    # cut at its limit while the tool was still blocked (waiting for it would read "returned no result")
    assert hung.calls[0]["status"] == "error" and hung.calls[0]["error"] == "tool 'Sleep' timed out after 0.5 s"
    assert hung.finish_reason == "response" and hung.format_valid
    assert [c["status"] for c in broken.calls] == ["error", "error", "error"]
    assert "not valid JSON" in broken.calls[0]["error"] and "unknown tool 'NoSuchTool'" in broken.calls[1]["error"]
    assert broken.calls[2]["error"].startswith("the tool call is not closed"), broken.calls[2]
    assert broken.finish_reason == "response" and broken.answer == "A"
    obs = [m for m in broken.messages if m["role"] == "user"][1:]
    assert all(json.loads(m["content"][0]["text"])["status"] == "error" for m in obs)


def test_adl_calls_are_derandomized_before_the_tool_runs(policy):
    """A randomized trajectory, replayed through the engine, gets the same tool outputs as the canonical one."""
    model, processor = policy
    ex = make_examples(1)[0]
    offered = tools.schemas(["Crop", "Point"])
    new_schemas, mapping = adl.randomize(offered, random.Random(7))
    canonical = [{"name": "Crop", "parameters": {"image": "img_1", "coordinates": [5, 5, 70, 60]}},
                 {"name": "Point", "parameters": {"image": "img_2", "description": "red square"}}]
    texts = [[f"<think>step</think><tool_call>{json.dumps(c)}</tool_call>" for c in calls]
             + ["<think>ok</think><response>\\boxed{A}</response>"]
             for calls in (canonical, [mapping.from_canonical(c) for c in canonical], canonical)]
    enc = [[processor.encode_text(s) + [processor.im_end] for s in sc] for sc in texts]

    def forcer(row, turn, toks):
        seq = enc[row][turn]
        return seq[len(toks)] if len(toks) < len(seq) else processor.im_end
    # the third row calls the real names under ADL
    plain, randomized, real = rollout.rollout(model, processor, [ex, ex, ex], tools=["Crop", "Point"], temperature=0,
                                              adl=[None, (new_schemas, mapping), (new_schemas, mapping)], forcer=forcer)
    assert [c["status"] for c in plain.calls] == [c["status"] for c in randomized.calls] == ["success", "success"]
    assert [c["name"] for c in randomized.calls] == ["Crop", "Point"]
    assert plain.images[1].tobytes() == randomized.images[1].tobytes()
    def observations(t):
        return [json.loads(m["content"][0]["text"].split("\n")[0]) for m in t.messages[2:] if m["role"] == "user"]
    for a, b in zip(observations(plain), observations(randomized)):
        assert b["name"] == mapping.names[a["name"]]
        assert {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in b.items() if k != "name"}
    assert "Crop" not in randomized.messages[0]["content"] and randomized.adl_mapping == mapping.to_json()
    # the real name is not offered under ADL: calling it is an unknown tool, and the error lists the random names
    assert real.calls[0]["status"] == "error"
    listed = ", ".join(f"'{s['function']['name']}'" for s in new_schemas)  # in the prompt's order
    assert sorted(s["function"]["name"] for s in new_schemas) == sorted([mapping.names["Crop"], mapping.names["Point"]])
    assert real.calls[0]["error"] == f"unknown tool 'Crop'; available: {listed}", real.calls[0]["error"]


def test_tiny_model_saves_and_loads(scratch_dir, tmp_path):
    model, processor = rollout.load_policy(scratch_dir, device="cpu")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    prompt = rollout.system_prompt(tools.schemas())
    assert processor.decode(processor.encode_text(prompt)) == prompt
    assert len(processor.encode_text(prompt)) < 1000
    text = "héllo 世界 🙂 <|im_start|>user\n"
    assert processor.decode(processor.encode_text(text)) == text
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "<think>x</think><response>\\boxed{A}</response>"}]
    assert (processor.tokenizer.apply_chat_template(msgs, tokenize=False)
            == "".join("".join(rollout.render(m)) for m in msgs))
    with pytest.raises(rollout.InputError, match="does not exist"):
        rollout.load_policy(str(tmp_path / "missing"))


def test_the_encoding_cache_is_bounded_and_exact():
    processor = rollout.Processor.from_pretrained(tiny.BASE_DIR)
    cache = rollout.EncodedImages(budget=3 * 2**20)  # a 224x224 image is 1.2 MB of float32 patches: two fit
    images = [Image.new("RGB", (224, 224), (40 * i, 0, 0)) for i in range(5)]
    first = [cache(processor, im) for im in images]
    assert len(cache.items) == 2 and cache.used == 2 * first[0][0].nbytes <= 3 * 2**20
    assert cache(processor, images[-1])[0] is first[-1][0]  # a hit returns the kept tensor
    again = cache(processor, images[0])  # evicted long ago: encoded anew, the same values
    assert again[0] is not first[0][0] and torch.equal(again[0], first[0][0]) and torch.equal(again[1], first[0][1])
    cache.clear()  # what coldstart does between training and evaluation: nothing kept, the next call encodes anew
    assert (cache.used, len(cache.items)) == (0, 0) and cache(processor, images[0])[0] is not again[0]


def test_the_encoding_cache_lets_go_of_images_that_died():
    processor = rollout.Processor.from_pretrained(tiny.BASE_DIR)
    cache = rollout.EncodedImages(budget=64 * 2**20)
    kept = Image.new("RGB", (224, 224), "red")
    cache(processor, kept)
    for i in range(4):  # what TC does: a fresh image decoded for every use, gone after the step
        cache(processor, Image.new("RGB", (224, 224), (0, 40 * i, 0)))
    assert len(cache.items) == 2 and cache.used == 2 * cache(processor, kept)[0].nbytes  # the live one and the last
    # keyed by content: another image with the same pixels gets the same tensor, a changed pixel does not
    same, changed = kept.copy(), kept.copy()
    changed.putpixel((5, 5), (0, 0, 0))
    assert cache(processor, same)[0] is cache(processor, kept)[0]
    assert cache(processor, changed)[0] is not cache(processor, kept)[0]
    del kept, same, changed  # every image of those contents gone: their encodings leave at the next miss
    cache(processor, Image.new("RGB", (224, 224), "blue"))
    assert len(cache.items) == 1


def test_identical_images_go_through_the_vision_tower_once(policy):
    """Two rows holding the same image (a group's equal tool calls; the prompt's image in the update's
    micro-batches) share one encoding and one pass of the vision tower, and get the logits of the model's own path,
    which runs the tower on every image."""
    model, processor = policy
    a, b = make_examples(2)[0]["images"][0], make_examples(2)[1]["images"][0]
    rows = [[a], [a.copy(), b]]  # the copy: another object with the same pixels
    seqs, images = [], []
    for row in rows:
        ids, imgs = rollout.encode(processor, ["<|im_start|>user\n", *row, "What colour?<|im_end|>\n"])
        seqs.append(ids)
        images.append(imgs)
    assert images[1][0][0] is images[0][0][0]  # one tensor for both
    patches = []  # what the tower is given, per pass
    hook = model.model.visual.register_forward_pre_hook(lambda m, args: patches.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            shared = rollout.sequence_logits(model, processor, seqs, images)
            # every image encoded on its own (distinct tensors): the model's own path, the tower on all three
            own = rollout.sequence_logits(model, processor, seqs, [[processor.encode_image(im) for im in row]
                                                                    for row in rows])
    finally:
        hook.remove()
    n_a, n_b = (int(rollout.encode_image_cached(processor, im)[1].prod()) for im in (a, b))
    assert patches == [n_a + n_b, 2 * n_a + n_b]
    assert torch.allclose(shared, own, atol=1e-5), (shared - own).abs().max()


def test_sampled_rows_do_not_depend_on_the_rest_of_the_batch(policy):
    """Each row samples from its own stream keyed by (seed, key, sample): the same example gets the same sampled
    trajectories alone or in a batch with others, as a rank of a torchrun split gets one process's samples."""
    model, processor = policy
    examples = make_examples(3)
    together = rollout.rollout(model, processor, examples, tools=["Crop"], group_size=2, temperature=1.0, seed=5,
                               max_new_tokens=12, max_turns=1)
    alone = rollout.rollout(model, processor, examples[2:], tools=["Crop"], group_size=2, temperature=1.0, seed=5,
                            max_new_tokens=12, max_turns=1, keys=[2])
    assert [t.token_ids for t in alone] == [t.token_ids for t in together[4:]]
    assert together[4].token_ids != together[5].token_ids  # the group's samples differ
    other = rollout.rollout(model, processor, examples[2:], tools=["Crop"], group_size=2, temperature=1.0, seed=6,
                            max_new_tokens=12, max_turns=1, keys=[2])
    assert [t.token_ids for t in other] != [t.token_ids for t in alone]


def test_inverse_cdf_sampling_never_draws_a_banned_token():
    logits = torch.full((2, 5), float("-inf"))
    logits[0, 1], logits[1, 3], logits[1, 4] = 0.0, 0.0, 0.0
    for u in (0.0, 0.3, 0.5, 0.999999999):
        got = rollout.sample(logits, 1.0, 1.0, 0, [u, u]).tolist()
        assert got[0] == 1 and got[1] == (3 if u < 0.5 else 4)


def test_every_stage_limits_trajectories_alike():
    """TC's evaluation, TG's rollouts and evaluate.py read one set of limit defaults (rollout.LIMITS), and a flag moves
    its own stage's value only."""
    import coldstart
    import evaluate
    import grpo
    assert rollout.limits_of(coldstart.parser.parse_args([]), "eval-") == rollout.LIMITS
    assert rollout.limits_of(evaluate.parser.parse_args([])) == rollout.LIMITS
    assert rollout.limits_of(grpo.parse_args([])) == rollout.LIMITS
    assert rollout.limits_of(grpo.parse_args(["--max-new-tokens", "7"])) == {**rollout.LIMITS, "max_new_tokens": 7}


def test_keep_freed_memory_serves_activations_from_the_heap():
    # in a fresh process: the setting is process-wide, and the first allocation must see glibc's defaults
    code = """
import ctypes, json, torch, rollout
class Info(ctypes.Structure):  # glibc's struct mallinfo2: arena = heap bytes, hblkhd = bytes in mmap'd blocks
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
def grew(make):  # -> (mmap'd bytes, heap bytes) that appeared while making and holding one tensor
    a, h = libc.mallinfo2().hblkhd, libc.mallinfo2().arena
    x = make()
    return libc.mallinfo2().hblkhd - a, libc.mallinfo2().arena - h
block = lambda: torch.empty(4 * 2**20)  # 16 MiB, an activation of the SFT step
out = {"default": grew(block), "kept": rollout.keep_freed_memory(), "first": grew(block), "again": grew(block)}
print(json.dumps(out))
"""
    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("glibc >= 2.33 (mallinfo2) only")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    cwd=pathlib.Path(__file__).parents[1]).stdout)
    assert out["default"][0] >= 16 * 2**20  # glibc's default: a block this large is mmap'd, and unmapped when freed
    assert out["kept"] is True
    assert out["first"][0] == 0 and out["first"][1] >= 16 * 2**20  # now it comes from the heap...
    assert out["again"] == [0, 0]  # ...and after it is freed, the next one reuses it: nothing mapped anew
