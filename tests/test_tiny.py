"""The tiny default: a deterministic corpus whose tools really compute, a tokenizer that round-trips the protocol,
the pretraining loop (quick run, exact resume), and the shipped base that reads tool lists and copies."""
import io
import json
import os
import random
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import adl
import rollout
import tasks
import tiny
import tools


def render_text(item):
    """A corpus item as text, images as their PNG bytes, so two draws can be compared exactly."""
    if isinstance(item, tuple):  # a drill: (text, copy)
        return "".join(item)
    if isinstance(item, tiny.Marked):  # the choose drill
        return item.text
    out = []
    for m in item:
        for p in rollout.render(m):
            if isinstance(p, str):
                out.append(p)
            else:
                buf = io.BytesIO()
                p.save(buf, format="PNG")
                out.append(buf.getvalue().hex())
    return "".join(out)


def test_corpus_is_deterministic_and_seeds_differ():
    a = [render_text(tiny.corpus_item(random.Random(f"t-{i}"))) for i in range(40)]
    b = [render_text(tiny.corpus_item(random.Random(f"t-{i}"))) for i in range(40)]
    assert a == b
    assert len(set(a)) == len(a)
    # the corpus never shows the five tasks or the seven visual tools
    assert not any(re.search(r"\b(" + "|".join(tools.TOOLS) + r")\b", t) for t in a)


def expected(kind, a, world):
    """An independent implementation of every synthetic tool, to replay observations against."""
    pts = lambda: a["points"]
    return {
        "record": lambda: {"record": world["records"][a["id"]]},
        "document": lambda: {"lines": world["pages"][a["page"]]},
        "sort": lambda: {"sorted": sorted(a["values"])},
        "filter": lambda: {"kept": [x for x in a["values"] if x > a["threshold"]]},
        "sum": lambda: {"sum": sum(a["values"])},
        "count": lambda: {"count": len(a["items"])},
        "shift": lambda: {"points": [[x + a["dx"], y + a["dy"]] for x, y in pts()]},
        "scale": lambda: {"points": [[x * a["factor"], y * a["factor"]] for x, y in pts()]},
        "inside": lambda: {"inside": [[x, y] for x, y in pts()
                                      if a["box"][0] <= x <= a["box"][2] and a["box"][1] <= y <= a["box"][3]]},
        "nearest": lambda: (lambda d: {"nearest": a["candidates"][d.index(min(d))], "index": d.index(min(d))})(
            [abs(x - a["origin"][0]) + abs(y - a["origin"][1]) for x, y in a["candidates"]]),
        "locate": lambda: {"points": world["places"].get(a["place"], [])},
        "layout": lambda: {"items": world["layouts"][a["page"]]},
    }[kind]()


@pytest.mark.parametrize("scenario", list(tiny.SCENARIOS))
def test_every_observation_replays(scenario):
    """Each call's observation is what the tool computes from the call's own arguments; an error observation follows
    a call that really is wrong, and the answer is the last observation's value."""
    errors = 0
    for i in range(30):
        messages, ts, calls, answer = tiny.tool_scenario(random.Random(f"replay-{scenario}-{i}"), scenario)
        turns = [(m, messages[k + 1], messages[k + 2]) for k, m in enumerate(messages[:-1]) if m["role"] == "assistant"]
        for turn, obs, after in turns:
            call = json.loads(re.search(r"<tool_call>(.*)</tool_call>", turn["content"]).group(1))
            seen = json.loads(obs["content"][0]["text"])
            if seen["status"] == "error":  # a real mistake (the tool's own error), then a different call
                errors += 1
                assert seen["error"] == ts.call(call["name"], call["parameters"]).error
                assert call != json.loads(re.search(r"<tool_call>(.*)</tool_call>", after["content"]).group(1))
                continue
            kind, names = ts.tools[call["name"]]
            roles = {shown: role for role, shown in names.items()}
            args = {roles[k]: v for k, v in call["parameters"].items()}
            assert {k: v for k, v in seen.items() if k not in ("name", "status")} == expected(kind, args, ts.world)
        last = json.loads(turns[-1][1]["content"][0]["text"])
        assert tasks.extract_answer(messages[-1]["content"]) == answer
        assert answer in json.dumps(last) or answer in [str(v) for v in last.get("record", {}).values()]
    assert errors > 0  # mistakes and retries are part of the corpus


def test_every_kind_of_mistake_is_a_real_error_and_the_fix_names_the_tool():
    """corrupt() makes each of its five mistakes; the toolset rejects every one, and the thinking after the error
    names the tool that does what the question needs."""
    seen = set()
    for i in range(200):
        rng = random.Random(f"mistake-{i}")
        ts = tiny.Toolset(tiny.make_world(rng))
        for k in ("shift", "sort", "record"):
            ts.add(k, rng, random_names=i % 2 == 0)
        kind = rng.choice(["shift", "sort"])
        args = {"points": [[1, 2]], "dx": 3, "dy": 4} if kind == "shift" else {"values": [5, 1, 3]}
        call = ts.call_json(kind, args)
        bad, fix = tiny.corrupt(rng, call, ts, kind)
        result = ts.call(bad["name"], bad["parameters"])
        if bad["name"] not in ts.tools:
            seen.add("spelling")
            assert result.error.startswith(f"unknown tool '{bad['name']}'")
        elif bad["name"] != call["name"]:
            seen.add("tool")
            assert "{wrong} does not {purpose}" in fix
        elif len(bad["parameters"]) < len(call["parameters"]):
            seen.add("drop")
            dropped = ", ".join(q for q in call["parameters"] if q not in bad["parameters"])
            assert result.status == "error" and result.error.startswith(f"missing parameters: {dropped};")
        elif set(bad["parameters"]) != set(call["parameters"]):
            seen.add("param")
            assert "unknown parameters: " + next(p for p in bad["parameters"] if p not in call["parameters"]) \
                in result.error
        else:
            seen.add("string")
            assert "must be a list" in result.error
        if result.status == "success":  # only a wrong tool that happens to take the same arguments
            assert bad["name"] in ts.tools and bad["name"] != call["name"]
        assert "{error}" in fix
    assert seen == {"drop", "string", "param", "spelling", "tool"}


def test_toolset_errors_name_the_shown_parameters():
    rng = random.Random(3)
    ts = tiny.Toolset(tiny.make_world(rng))
    name = ts.add("shift", rng, random_names=True)
    shown = ts.tools[name][1]
    r = ts.call("nope", {})
    assert r.status == "error" and f"available: {name}" in r.error
    r = ts.call(name, {shown["points"]: [[1, 2]], shown["dx"]: 3})
    assert r.status == "error" and f"missing parameters: {shown['dy']}" in r.error
    r = ts.call(name, {shown["points"]: "[[1, 2]]", shown["dx"]: 3, shown["dy"]: 4})
    assert r.status == "error" and f"parameter '{shown['points']}' must be a list" in r.error
    r = ts.call(name, {shown["points"]: [[1, 2]], shown["dx"]: 3, shown["dy"]: 4})
    assert r.status == "success" and r.data == {"points": [[4, 6]]}


@pytest.fixture(scope="module")
def base():
    return rollout.load_policy("tiny", device="cpu")


def test_shipped_tokenizer_round_trips_the_protocol(base):
    _, processor = base
    texts = [rollout.system_prompt(tools.schemas()), rollout.system_prompt([]),
             rollout.system_prompt(adl.randomize(tools.schemas(), random.Random(1))[0]),
             ('<think>x</think><tool_call>{"name": "AStar", "parameters": '
              '{"start": [35, 158], "obstacles": [[1, 2]]}}</tool_call>'),
             '{"name": "OCR", "status": "success", "detections": [{"text": "Amount:", "bbox": [24, 124, 63, 131]}]}',
             "<think>ok</think><response>Route: \\boxed{D,R,R,D}</response>", "héllo 世界 🙂 <|im_start|>user\n"]
    texts += [ex["question"] for t in tasks.TASKS for ex in tasks.generate(t, 3, split="test")]
    texts += [render_text(tiny.corpus_item(random.Random(i), images=False)) for i in range(20)]
    for t in texts:
        assert processor.decode(processor.encode_text(t)) == t
    assert len(processor.encode_text(rollout.system_prompt(tools.schemas()))) < 400  # the tool list stays cheap
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "<think>x</think><response>\\boxed{A}</response>"}]
    assert (processor.tokenizer.apply_chat_template(msgs, tokenize=False)
            == "".join("".join(rollout.render(m)) for m in msgs))


def test_transfer_vocabulary_keeps_shared_rows_and_averages_new_ones():
    texts = [render_text(tiny.corpus_item(random.Random(i), images=False)) for i in range(60)]
    old_tok, new_tok = (tiny.build_tokenizer(texts[:30], vocab_size=700),
                        tiny.build_tokenizer(texts[30:], vocab_size=704))
    model, _ = tiny.build_scratch(old_tok)
    before = model.get_input_embeddings().weight.detach().clone()
    kept = tiny.transfer_vocabulary(model, old_tok, new_tok)
    after, old_vocab = model.get_input_embeddings().weight, old_tok.get_vocab()
    shared = [p for p in new_tok.get_vocab() if p in old_vocab]
    fresh = [p for p in new_tok.get_vocab() if p not in old_vocab]
    assert kept == len(shared) and len(fresh) > 20
    for p in shared:
        assert torch.equal(after[new_tok.convert_tokens_to_ids(p)], before[old_vocab[p]])
    for p in fresh:
        pieces = old_tok.encode(new_tok.convert_tokens_to_string([p]), add_special_tokens=False)
        assert torch.allclose(after[new_tok.convert_tokens_to_ids(p)], before[pieces].mean(0))
    assert model.get_output_embeddings().weight.data_ptr() == after.data_ptr()  # tied: the LM head moved too
    with pytest.raises(ValueError, match="entries"):
        tiny.transfer_vocabulary(model, old_tok, tiny.build_tokenizer(texts, vocab_size=900))


def test_numbers_are_tokens_that_copy_alike(base):
    """Every number 0-999 is one token, and a point list is the same token run alone, inside a labelled line and
    inside a tool call, so copying it is token-for-token."""
    _, processor = base
    assert all(len(processor.encode_text(str(i))) == 1 for i in range(1000))
    points = "[[519, 853], [12, 7], [999, 0]]"
    alone = processor.encode_text(points)
    assert len(alone) == 15  # [ [ 519 ", " 853 "], [" 12 ", " 7 "], [" 999 ", " 0 ] ]
    for context in (f"blue: {points}\n", f'{{"name": "f", "parameters": {{"pts": {points}}}}}'):
        ids = processor.encode_text(context)
        assert any(ids[i:i + len(alone)] == alone for i in range(len(ids))), context


def test_choose_drill_marks_the_names_of_the_tools_that_fit():
    """The choose drill's loss falls on tool names only, and each is the offered tool whose description belongs to
    the kind its line asks for; the marked tokens are the names as the whole text tokenizes them."""
    processor = rollout.Processor.from_pretrained(tiny.BASE_DIR)
    for i in range(20):
        item = tiny.choose_item(random.Random(f"choose-{i}"))
        schemas = [json.loads(line) for line in item.text.split("<tools>\n")[1].split("\n</tools>")[0].split("\n")]
        described = {s["function"]["name"]: s["function"]["description"] for s in schemas}
        lines = item.text.split("\n\n")[-1].strip().split("\n")
        assert len(lines) == len(item.spans) == len(schemas)  # one line per offered tool
        assert sorted(item.text[a:b] for a, b in item.spans) == sorted(described)  # each tool asked for once
        for line, (a, b) in zip(lines, item.spans):
            name = item.text[a:b]
            assert line.rstrip(".").endswith(name) or line.endswith(f"{name} does.")
            kind = next(k for k in tiny.KINDS.values() if k.purpose in line)
            assert described[name] in kind.descriptions
        ids, mask, images = tiny.encode_item(processor, item)
        assert ids == processor.encode_text(item.text) and images == []  # tokenized as one text
        # the marked tokens, read back as runs: each run spells one name, in order; a token at either end may
        # hold a character or two beside it (merges span words: "use wns7k4" can split as "us", "e w", "ns7", ...)
        runs, cur = [], []
        for t, m in zip(ids, mask):
            if m:
                cur.append(t)
            elif cur:
                runs, cur = runs + [processor.decode(cur)], []
        names = [item.text[a:b] for a, b in item.spans]
        assert len(runs) == len(names) and all(n in r and len(r) <= len(n) + 4 for r, n in zip(runs, names)), runs


def test_shipped_base_copies_held_out_drills(base):
    """Teacher-forced on drills drawn from seeds pretraining never used, the base predicts the copied tokens: the
    in-context copy circuit formed (a random model gets about none)."""
    model, processor = base
    hits = total = 0
    with torch.no_grad():
        for i in range(12):
            ids, mask, _ = tiny.encode_item(processor, tiny.drill_item(random.Random(f"heldout-drill-{i}")))
            pred = rollout.sequence_logits(model, processor, [ids], [[]])[0, :-1].argmax(-1).tolist()
            hits += sum(pred[t - 1] == ids[t] for t in range(1, len(ids)) if mask[t])
            total += sum(mask[1:])
    assert hits / total >= 0.97, (hits, total)


def test_shipped_base_writes_the_protocol(base):
    """Greedy rollouts on held-out synthetic tool prompts: the base opens most answers with a <think> block and a
    tool call that parses as the protocol's JSON (an untrained model writes neither; 10 of these 12 today)."""
    model, processor = base
    examples, toolsets, _ = tiny.check_examples("tool_choice", 12)
    with torch.no_grad():
        trajs = rollout.rollout(model, processor, examples, toolsets=toolsets, temperature=0, max_turns=1,
                                max_new_tokens=160)
    first = [t.assistant_turns[0] for t in trajs]
    ok = [turn.startswith("<think>") and "</think><tool_call>{" in turn and rollout.parse_tool_call(turn)[0] is not None
          for turn in first]
    assert sum(ok) >= 9, first


def test_scratch_is_the_same_model_untrained(base):
    model, processor = base
    scratch, sp = rollout.load_policy("scratch", device="cpu")
    assert type(scratch) is type(model) and len(sp.tokenizer) == len(processor.tokenizer)
    a, b = model.state_dict(), scratch.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])


def test_masked_loss_equals_full_logits_loss():
    """The LM head only at loss positions, without the padding mask, gives the plain computation's loss and gradients
    (a full forward with the padding mask). Float sums run in another order, so each gradient entry is compared
    within 1e-4 relative plus an absolute 1e-6 of its tensor's largest entry (the summed loss makes entries of
    thousands; measured worst difference: 4e-7 of the largest)."""
    model, processor = tiny.build_scratch(seed=1)
    batch = [tiny.encode_item(processor, tiny.corpus_item(random.Random(f"loss-{i}"))) for i in range(8)]
    batch.append(rollout.encode_conversation(processor, tiny.vision_item(random.Random(0))))
    loss, n = rollout.masked_lm_loss(model, processor, batch, "cpu")
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    seqs = [ids for ids, _, _ in batch]
    logits = rollout.sequence_logits(model, processor, seqs, [im for _, _, im in batch])
    targets = torch.tensor(rollout.pad_batch(seqs, 0, left=False))[:, 1:]
    mask = torch.tensor(rollout.pad_batch([m for _, m, _ in batch], 0, left=False))[:, 1:].bool()
    plain = F.cross_entropy(logits[:, :-1][mask], targets[mask], reduction="sum")
    plain_grads = torch.autograd.grad(plain, list(model.parameters()), allow_unused=True)
    assert n == int(mask.sum()) and torch.allclose(loss, plain, rtol=1e-5)
    for g, h in zip(grads, plain_grads):
        assert (g is None) == (h is None)
        if g is not None:
            assert torch.allclose(g, h, rtol=1e-4, atol=1e-6 * h.abs().max().item())


def test_wsd_schedule():
    lr = [rollout.lr_at(s, 100, 1.0, 10, "wsd", 0.2) for s in range(100)]
    assert lr[0] == 0.1 and lr[9] == 1.0 and lr[50] == 1.0 and lr[80] == 1.0
    assert lr[90] == pytest.approx(0.55) and min(lr) >= 0.1 and lr == sorted(lr[:80]) + lr[80:]


def test_quick_pretraining_runs_and_resumes_exactly(tmp_path):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    res = tiny.main(["--quick", "--out", whole])
    assert set(res) >= {"copy_list", "lookup", "tool_choice", "format_valid", "vision"}
    for f in ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json", "log.jsonl",
              "checks.json"):
        assert os.path.isfile(os.path.join(whole, "base", f))
    assert [json.loads(x)["step"] for x in open(os.path.join(whole, "log.jsonl"))] == [1, 2, 3, 4]
    shutil.copytree(os.path.join(whole, "tokenizer"), os.path.join(parts, "tokenizer"))  # skip training it again
    assert tiny.main(["--quick", "--out", parts, "--stop-after", "2"]) is None
    tiny.main(["--quick", "--out", parts, "--resume", "--check-n", "0"])  # the checks ran above; they train nothing
    a, b = (load_file(os.path.join(whole, "base", "model.safetensors")),
            load_file(os.path.join(parts, "base", "model.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda d: [json.loads(x)["loss"] for x in open(os.path.join(d, "log.jsonl"))]
    assert losses(whole) == losses(parts)


def test_batch_builders_give_the_same_batches():
    """DataLoader workers build exactly the chunks the training process would build itself."""
    _, processor = tiny.build_scratch()
    mix = tiny.parse_mix("drill=0.2,copy=0.3,tools=0.3,vision=0.2")
    here = tiny.chunk_stream(0, "mix", 3, processor, 1536, mix, workers=0)
    ahead = tiny.chunk_stream(0, "mix", 3, processor, 1536, mix, workers=2)
    images = 0
    for _ in range(3):
        a, b = [it for batch in next(here) for it in batch], [it for batch in next(ahead) for it in batch]
        assert [(ids, m) for ids, m, _ in a] == [(ids, m) for ids, m, _ in b]
        for (_, _, ia), (_, _, ib) in zip(a, b):
            assert len(ia) == len(ib) and all(torch.equal(p, q) and torch.equal(g, h) for (p, g), (q, h) in zip(ia, ib))
            images += len(ia)
    assert images > 0


def test_corpus_does_not_depend_on_the_hash_seed():
    """Two processes with different PYTHONHASHSEED draw the same corpus (a set's order would differ)."""
    import subprocess
    import sys
    code = ("import random, hashlib, tiny, tests.test_tiny as t; print(hashlib.sha256(''.join("
            "t.render_text(tiny.corpus_item(random.Random(i), images=False)) for i in range(30))"
            ".encode()).hexdigest())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # both at once: most of each is importing torch and transformers
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2")]
    out = [p.communicate(timeout=300)[0] for p in procs]
    # each printed one sha256 hex digest (64 characters and a newline), the same
    assert [p.returncode for p in procs] == [0, 0] and len(out[0]) == 65 and out[0] == out[1]
