"""
The tiny default: a real Qwen2_5_VLForConditionalGeneration of a few million parameters, its fixed tokenizer,
and its pretraining on a procedurally generated corpus of *generic* skills. It plays the part of the instruct
model the paper starts from (Qwen2.5-VL-7B-Instruct reads a tool list, writes JSON calls and copies values out
of its context before TC ever runs); TC, TG and ADL then teach visual tool use on top of it.

The corpus never shows the five tasks or the seven visual tools, so TC, TG and the adopt experiment still
measure what they teach. What it shows, every observation computed by real code:
  1. copying: spans, number lists and [[x, y], ...] lists at random offsets among distractor lists, and
     lists whose tokens repeat (runs of one move, numbers from a pool of two to four);
  2. generic tool use in this project's exact protocol: 2-6 synthetic text tools per prompt (look a record up,
     read a document, read a laid-out page's texts and boxes, sort, filter, sum, count, shift or scale points,
     keep points inside a box, find the nearest point, locate named places) under readable or random names,
     random parameter names and varied descriptions; chains where one observation feeds the next call; tool
     errors and retries;
  3. generic vision: large shapes of named colours on plain backgrounds, with short questions (colour,
     shape, count, position), because the vision tower starts random.

    python tiny.py                      # rebuild the shipped base (tiny_base/) from nothing: 14 min on one H100
                                        # (5,000 steps of 32k tokens; a 2-core CPU would need about 10 hours)
    python tiny.py --quick              # smoke test: a few steps, written under runs/tiny_quick
    python tiny.py --resume             # continue an interrupted pretraining from OUT/ckpt
    python tiny.py --check              # held-out skill checks of the shipped base (greedy, rollout.rollout)
    python tiny.py --check --model runs/tc/model --tc-data runs/tc/data
                                        # ... plus the vsp_nav and guiqa transfer checks
"""
import argparse
import json
import os
import pickle
import random
import shutil
import string
import sys
import time
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import rollout
from tasks import extract_answer, read_jsonl, with_pil
from tools import ToolError, ToolResult, observation

HERE = os.path.dirname(os.path.abspath(__file__))
BASE_DIR = os.path.join(HERE, "tiny_base")  # the shipped base; `--model tiny` loads it

parser = argparse.ArgumentParser(description=__doc__, formatter_class=type(
    "Formatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))
parser.add_argument("--out", default="runs/tiny", help="work directory: ckpt/, log.jsonl")
parser.add_argument("--save", default=BASE_DIR, help="where the finished base goes (a save_pretrained directory)")
parser.add_argument("--init", default=None, help="continue pretraining from this base (its weights and tokenizer; a "
                    "fresh optimizer) instead of random weights, e.g. --init tiny --drill-steps 0 --seed 1")
parser.add_argument("--new-tokenizer", action="store_true", help="with --init: train this commit's tokenizer and "
                    "carry the base's embeddings over to it (see transfer_vocabulary), then continue pretraining")
parser.add_argument("--steps", type=int, default=5000, help="optimizer steps, the drill's included")
parser.add_argument("--drill-steps", type=int, default=3500, help="first steps on copy drills only (short plain "
                    "sequences, loss on the copy): the in-context copy circuit forms there, then the mix teaches the "
                    "protocol")
parser.add_argument("--batch-tokens", type=int, default=32768, help="padded tokens per step (sequences grouped by "
                    "length); the copy transition takes a number of tokens that grows with the batch, but fewer steps")
parser.add_argument("--lr", type=float, default=1e-3,
                    help="peak learning rate, held constant through the copy transition")
parser.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
parser.add_argument("--cooldown", type=float, default=0.15,
                    help="share of the steps at the end that decay the lr to 10%%")
parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
parser.add_argument("--clip", type=float, default=1.0, help="gradient clipping (global norm)")
parser.add_argument("--mix", default="drill=0.1,copy=0.3,tools=0.45,vision=0.15", help="share of each corpus part "
                    "after the drill steps (drill, copy, tools, layout, choose, vision; layout: the layout scenario "
                    "alone, also one of the tools scenarios; choose: the tool-choice drill; the tokenizer corpus uses "
                    "the default)")
parser.add_argument("--workers", type=int, default=None, help="processes that build batches ahead of the GPU (default: "
                    "none on a CPU, where the training process keeps up; up to 14 on a GPU)")
parser.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps")
parser.add_argument("--resume", action="store_true", help="continue from OUT/ckpt (same data, optimizer and RNG)")
parser.add_argument("--stop-after", type=int, default=0,
                    help="stop after this many steps, checkpointing first (0: run to the end)")
parser.add_argument("--stop-minutes", type=float, default=0, help="stop after this much wall time, checkpointing first "
                    "(a machine lent for a while; 0: no limit)")
parser.add_argument("--check", action="store_true", help="only run the held-out skill checks on --model")
parser.add_argument("--model", default="tiny", help="model the checks read: tiny | scratch | PATH")
parser.add_argument("--check-n", type=int, default=200, help="held-out examples per check (0: none; with --check "
                    "and --tc-data, the transfer checks alone)")
parser.add_argument("--tc-data", default=None, help="a TC data directory (coldstart.py's OUT/data): adds the "
                    "transfer checks (teacher-forced: the numbers of vsp_nav's AStar obstacles, the value guiqa's "
                    "answer quotes)")
rollout.add_device_flag(parser)
parser.add_argument("--seed", type=int, default=0, help="seed of initialization and of the corpus")
parser.add_argument("--quick", action="store_true", help="smallest configuration that runs every code path (tests)")

# every code path in seconds: 1 drill step then 3 of the mix (the phase switch included), checkpoints at steps 2
# and 4; save=None puts the base under OUT/base, never over the shipped tiny_base/
QUICK = dict(out="runs/tiny_quick", save=None, steps=4, drill_steps=1, batch_tokens=1536, warmup=2, ckpt_every=2,
             check_n=4)

# -----------------------------------------------------------------------------
# 1. the model's shape and its fixed tokenizer

SPECIAL_TOKENS = rollout.SPECIAL_TOKENS
TINY_VOCAB = 6144
# 4 layers of width 192; 6 query heads of 32 dims over 2 KV heads (GQA); mrope_section splits a head's 16 rotary
# pairs between time, height and width, as Qwen2.5-VL's [16, 24, 24] splits its 64
TINY_TEXT = dict(hidden_size=192, intermediate_size=576, num_hidden_layers=4, num_attention_heads=6,
                 num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
# 2 vision blocks of width 128 on 14 px patches, merged 2x2 into one 28 px token; block 0 attends within windows
# of 112 px (4x4 tokens), block 1 over the whole image
TINY_VISION = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                   tokens_per_second=2)
# 28 px per vision token after the 2x2 merge; 224x224 at most = 64 tokens per image, so a prompt stays short
TINY_PIXELS = dict(min_pixels=28 * 28 * 4, max_pixels=224 * 224)

# Qwen2.5-VL's chat template (what its tokenizer ships), so checkpoints trained elsewhere read the same prompt.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(corpus, vocab_size=TINY_VOCAB):
    """Byte-level BPE (any UTF-8 text encodes) with Qwen's special tokens, merges trained on `corpus`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    # Pieces split at newlines and brackets only, so merges may span words and quotes: a schema fragment or a
    # description the corpus repeats becomes a token or two (ADL's paraphrases too). (Splitting after the `: "`
    # that opens a string value as well was tried in pretraining run 4 and not kept: see results/HISTORY.md.)
    # Numbers split into runs of at most three digits and every run 0-999 is one token (tokenizer_corpus lists
    # them all), so a coordinate is one or two tokens that tokenize the same wherever they are copied; the
    # separators of number, point and move lists (", " and "], [") stand alone. Copying a point list is then the
    # plain induction pattern (find the previous token earlier, emit what followed it), which a small model
    # learns far sooner than aligning digit by digit.
    # Isolated pieces: a newline, "], [", a single bracket or brace, ", " after a digit or "]", and ", " after a
    # lone move letter (the R, L, U, D of move lists).
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n|\], \[|[\[\]{}]|(?<=[0-9\]]), ?|(?<=\b[RLUD]), ?"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[0-9]{1,3}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    # the special tokens take ids 0-6 in SPECIAL_TOKENS' order; the byte alphabet is in the vocabulary from the
    # start, so no text is ever unknown
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    # eos <|im_end|>: a turn ends there; pad <|endoftext|> (SPECIAL_TOKENS[0], hence the [1:] that follows)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=32768)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tokenizer_corpus():
    """The fixed text the tokenizer's merges are learned from: the protocol with the seven tools' schemas, ADL's
    paraphrase pools and random names, the tasks' question phrasings, and a sample of the pretraining corpus.
    Merges are only a compression: knowing a schema's wording teaches the model nothing about the tool."""
    import adl
    import tasks
    import tools
    # the protocol's own prompts weigh as much as the whole corpus sample: the seven-tool prompt (which every TC
    # and TG sequence starts with) then costs a few hundred tokens instead of a thousand
    corpus = [rollout.system_prompt(tools.schemas()), rollout.system_prompt([])] * 300
    rng = random.Random("tokenizer")
    for _ in range(300):  # ADL's randomized tool lists: random names, paraphrased descriptions
        corpus.append(rollout.system_prompt(adl.randomize(tools.schemas(), rng)[0]))
    corpus += [text for pool in adl.TOOL_POOL.values() for text in pool] + list(adl.IMAGE_POOL)
    corpus += [text for tool in adl.PARAM_POOL.values() for pool in tool.values() for text in pool]
    corpus += [" ".join(str(i) for i in range(1000))] * 20  # enough for a merge for every number 0-999
    for task in tasks.TASKS:
        corpus += [ex["question"] for ex in tasks.generate(task, 30, split="train", seed=12345)]
    # seeds of their own ('tokenizer-*'): pretraining draws its items from other streams
    for i in range(3000):
        item = corpus_item(random.Random(f"tokenizer-{i}"), images=False)
        # a drill is (text, copy); a conversation counts with its text parts in the chat template
        corpus.append("".join(item) if isinstance(item, tuple) else
                      "".join(p for m in item for p in rollout.render(m) if isinstance(p, str)))
    return corpus


def build_scratch(tokenizer=None, seed=0):
    """A randomly initialised tiny Qwen2.5-VL and its processor (the shipped tokenizer unless one is given)."""
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    if tokenizer is None and not os.path.isfile(os.path.join(BASE_DIR, "tokenizer.json")):
        raise FileNotFoundError(f"the shipped tiny base {BASE_DIR} is missing; rebuild it with `python tiny.py`")
    tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(BASE_DIR)
    ids = tok.convert_tokens_to_ids
    # the embedding table rounded up to a multiple of 64 rows (friendlier matmul shapes); the spare rows are never
    # sampled (rollout.rollout bans ids past len(tokenizer))
    vocab = (len(tok) + 63) // 64 * 64
    text = dict(TINY_TEXT, vocab_size=vocab, bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                pad_token_id=ids("<|endoftext|>"))
    config = Qwen2_5_VLConfig(text_config=text,
                              vision_config=dict(TINY_VISION, out_hidden_size=TINY_TEXT["hidden_size"]),
                              image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                              vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                              tie_word_embeddings=True)  # the LM head is the embedding table: ~1.2M weights once
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)  # the initialization is drawn here: one seed, the same random weights
    model = Qwen2_5_VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, **TINY_PIXELS)
    return model, rollout.Processor(tok, image_processor)

def transfer_vocabulary(model, old_tok, new_tok):
    """Move a trained model onto another tokenizer without starting over: a token both vocabularies share keeps its
    embedding row; a new token starts as the mean of the rows of the old pieces its text encodes to. The layers
    above the embeddings keep what they learned (copying, reading schemas); pretraining then adapts them to the new
    pieces. The embeddings are tied, so the LM head follows."""
    emb = model.get_input_embeddings().weight  # (vocab, hidden)
    if len(new_tok) > emb.shape[0]:
        raise ValueError(f"the new tokenizer has {len(new_tok)} entries, the model's embeddings {emb.shape[0]}")
    old_vocab = old_tok.get_vocab()
    # new rows go into a copy: writing into emb as we go could read a row already overwritten; rows past the new
    # vocabulary (the padding to 64) keep their values
    rows, kept = emb.detach().clone(), 0
    for piece, i in new_tok.get_vocab().items():
        if piece in old_vocab:  # the same byte string: same meaning, same row (special tokens included)
            rows[i], kept = emb[old_vocab[piece]], kept + 1
        else:  # the piece as text (a byte-level piece is not text yet), cut into the old tokenizer's pieces
            old_ids = old_tok.encode(new_tok.convert_tokens_to_string([piece]), add_special_tokens=False)
            rows[i] = emb[old_ids].mean(0)
    with torch.no_grad():
        emb.copy_(rows)  # in place: the tied LM head is this same tensor
    return kept


# -----------------------------------------------------------------------------
# 2. synthetic text tools: generic operations under varied names, computed by real code

# the synthetic worlds' vocabulary: values, spans and page names (WORDS), record fields and page labels (FIELDS),
# kinds of place on the map (PLACES)
WORDS = ("apple river stone cloud maple tiger amber delta orbit cedar pearl comet lotus ember frost willow "
         "falcon harbor meadow copper violet summit canyon marble raven silver thunder coral lemon prism "
         "quartz saffron tundra velvet zephyr basil cobalt dune fjord glacier ivory jasper kelp lagoon "
         "mango nectar onyx pepper quill ridge sable thistle umber vapor walnut yarrow zinc acorn birch "
         "candle dragon echo fable garnet hazel iris juniper kite lantern mosaic nutmeg olive pine").split()
FIELDS = ("name city colour code price weight owner status team level score country size model year "
          "height speed rank region phone label amount total balance plan email tag unit grade batch").split()
PLACES = ("tower well gate tree rock house lamp bench fountain statue barn bridge tent cave flag").split()


def rand_name(rng):
    """An ADL-style name: 6 random characters [a-z0-9]."""
    return "".join(rng.choices(string.ascii_lowercase + string.digits, k=6))


def rand_value(rng):
    """A record field's value: a word, a number, an amount, a code or a short phrase."""
    kind = rng.randrange(5)
    if kind == 0:
        return rng.choice(WORDS)
    if kind == 1:  # up to 4 digits: one or two number tokens
        return str(rng.randint(0, 9999))
    if kind == 2:
        return f"${rng.randint(1, 999)}.{rng.randint(0, 99):02d}"
    if kind == 3:
        return "".join(rng.choices(string.ascii_uppercase + string.digits, k=rng.randint(4, 9)))
    return f"{rng.choice(WORDS)} {rng.choice(WORDS)}"


def rand_points(rng, n, hi=999):  # n [x, y] pairs on a 1000 x 1000 map: every coordinate is one token
    return [[rng.randint(0, hi), rng.randint(0, hi)] for _ in range(n)]


# Argument checks: `name` is the role, which Toolset.call rewrites into the name the prompt shows; each message
# says what was expected, so a retry can read its way to a valid call.
def _points(v, name):
    if not (isinstance(v, list)
            and all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) for x in p) for p in v)):
        raise ToolError(f"parameter '{name}' must be a list of [x, y] integer pairs")
    return v


def _ints(v, name, n=None):
    # bool is an int subclass in Python, but true/false are no numbers in JSON
    if not (isinstance(v, list)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in v)) or (n and len(v) != n):
        raise ToolError(f"parameter '{name}' must be a list of {n or 'some'} integers")
    return v


def _int(v, name):
    if not isinstance(v, int) or isinstance(v, bool):
        raise ToolError(f"parameter '{name}' must be an integer")
    return v


def _str(v, name):
    if not isinstance(v, str) or not v:
        raise ToolError(f"parameter '{name}' must be a non-empty string")
    return v


@dataclass
class Kind:
    """One generic operation: the names and words a prompt may show for it, and the code that runs it.
    params: role -> (JSON type, readable names, descriptions); run(world, args by role) -> result fields."""
    names: list
    descriptions: list
    params: dict
    run: object
    purpose: str  # a few words for the thinking text: "I use X to {purpose}"


def _record(world, a):
    key = _str(a["id"], "id")
    if key not in world["records"]:  # the error lists the ids: a wrong one can be corrected from it
        raise ToolError(f"no record with id '{key}'; known ids: {', '.join(sorted(world['records']))}")
    return {"record": world["records"][key]}


def _document(world, a):
    page = _str(a["page"], "page")
    if page not in world["pages"]:
        raise ToolError(f"no page named '{page}'; pages: {', '.join(sorted(world['pages']))}")
    return {"lines": world["pages"][page]}


def _layout(world, a):
    page = _str(a["page"], "page")
    if page not in world["layouts"]:
        raise ToolError(f"no page named '{page}'; pages: {', '.join(sorted(world['layouts']))}")
    return {"items": world["layouts"][page]}


def _locate(world, a):
    place = _str(a["place"], "place")
    return {"points": world["places"].get(place, [])}  # a place the map lacks is no error: there are none of it


def _nearest(world, a):
    (ox, oy), cands = _ints(a["origin"], "origin", 2), _points(a["candidates"], "candidates")
    if not cands:
        raise ToolError("parameter 'candidates' is empty: nothing to compare")
    # city-block distance; a tie goes to the lower index, so the answer is unique
    best = min(range(len(cands)), key=lambda i: (abs(cands[i][0] - ox) + abs(cands[i][1] - oy), i))
    return {"nearest": cands[best], "index": best}


def _inside(world, a):
    pts, (x1, y1, x2, y2) = _points(a["points"], "points"), _ints(a["box"], "box", 4)
    return {"inside": [p for p in pts if x1 <= p[0] <= x2 and y1 <= p[1] <= y2]}


# The twelve generic operations, none of them a visual tool. Tool names never repeat across kinds, and within a
# kind each role's readable parameter names differ from the other roles', so a tool never shows two parameters
# under one name.
KINDS = {
    "record": Kind(["get_record", "fetch_entry", "lookup", "read_row", "db_get"],
                   ["Fetch the record stored under an id and return all of its fields.",
                    "Looks up one entry of the database by its id; returns the entry's fields as a JSON object.",
                    "Returns every field of the record whose identifier you give.",
                    "Database reader: give an id, get back that record (field names and values)."],
                   {"id": ("string", ["id", "key", "record_id", "entry"],
                           ["the record's id", "identifier of the entry"])},
                   _record, "look the record up"),
    "document": Kind(["read_page", "open_doc", "page_text", "fetch_page"],
                     ["Read a page of the document store; returns its lines in order, each a label or a value.",
                      "Returns the text lines of a named page, top to bottom (a label line is followed by its value).",
                      "Opens a page by name and lists its lines of text in reading order."],
                     {"page": ("string", ["page", "name", "doc", "page_name"],
                               ["which page to read", "the page's name"])},
                     _document, "read that page"),
    "layout": Kind(["read_layout", "page_items", "scan_layout", "layout_of"],
                   ["Returns the text items of a laid-out page with their boxes [x1, y1, x2, y2], top to bottom and "
                   "left to right; a label and its value share a row.",
                    "Lists every piece of text on a form page, in reading order, each with its bounding box.",
                    "Reads a page's layout: the texts and where they sit (pixel boxes)."],
                   {"page": ("string", ["page", "form", "doc", "screen"], ["which page to read", "the page's name"])},
                   _layout, "read the page's layout"),
    "sort": Kind(["sort_numbers", "order", "sort_list", "ascending"],
                 ["Sort a list of integers from smallest to largest.", "Returns the given numbers in ascending order.",
                  "Orders integers low to high."],
                 {"values": ("array", ["values", "numbers", "items", "xs"],
                             ["the integers to sort", "list of integers"])},
                 lambda w, a: {"sorted": sorted(_ints(a["values"], "values"))}, "sort the numbers"),
    "filter": Kind(["filter_above", "keep_greater", "above", "threshold_filter"],
                   ["Keep only the integers strictly greater than a threshold, in their original order.",
                    "Drops every number that is not above the threshold.",
                    "Returns the values that exceed the given limit."],
                   {"values": ("array", ["values", "numbers", "items", "data"], ["integers to filter", "the list"]),
                    "threshold": ("integer", ["threshold", "limit", "above", "min"],
                                  ["keep values above this", "the cut-off"])},
                   lambda w, a: {"kept": [x for x in _ints(a["values"], "values")
                                          if x > _int(a["threshold"], "threshold")]},
                   "keep the numbers above the threshold"),
    "sum": Kind(["sum_numbers", "total", "add_all", "summation"],
                ["Add up a list of integers and return the total.", "Returns the sum of the numbers.",
                 "Computes the total of a list of integers."],
                {"values": ("array", ["values", "numbers", "terms", "items"], ["integers to add", "the list to sum"])},
                lambda w, a: {"sum": sum(_ints(a["values"], "values"))}, "add the numbers up"),
    "count": Kind(["count_items", "length", "how_many", "count"],
                  ["Count how many entries a list has.", "Returns the number of items in a list.",
                   "Tells the length of the given list."],
                  {"items": ("array", ["items", "list", "entries", "values"], ["the list to count", "any JSON list"])},
                  # any list counts, whatever its items; a non-list goes to _ints only for its error message
                  lambda w, a: {"count": len(a["items"]) if isinstance(a["items"], list)
                                else _ints(a["items"], "items")},
                  "count the entries"),
    "shift": Kind(["shift_points", "translate", "move_points", "offset"],
                  ["Move every [x, y] point by dx to the right and dy down.",
                   "Translates a list of points: adds dx to each x and dy to each y.",
                   "Returns the points shifted by an offset (dx, dy)."],
                  {"points": ("array", ["points", "coords", "pts", "positions"],
                              ["list of [x, y] points", "the points to move"]),
                   "dx": ("integer", ["dx", "right", "shift_x", "x_offset"],
                          ["pixels to add to x", "horizontal offset"]),
                   "dy": ("integer", ["dy", "down", "shift_y", "y_offset"], ["pixels to add to y", "vertical offset"])},
                  lambda w, a: {"points": [[x + _int(a["dx"], "dx"), y + _int(a["dy"], "dy")]
                                           for x, y in _points(a["points"], "points")]},
                  "shift the points"),
    "scale": Kind(["scale_points", "zoom_coords", "multiply_points", "scale"],
                  ["Multiply both coordinates of every [x, y] point by an integer factor.",
                   "Scales a list of points by a whole-number factor.", "Returns each point times the factor."],
                  {"points": ("array", ["points", "coords", "pts", "xy"], ["list of [x, y] points", "points to scale"]),
                   "factor": ("integer", ["factor", "k", "times", "scale"],
                              ["the integer multiplier", "scale factor"])},
                  lambda w, a: {"points": [[x * _int(a["factor"], "factor"), y * _int(a["factor"], "factor")]
                                           for x, y in _points(a["points"], "points")]},
                  "scale the points"),
    "inside": Kind(["inside_box", "clip_points", "in_region", "box_filter"],
                   ["Keep the [x, y] points that lie inside a box [x1, y1, x2, y2] (edges included).",
                    "Returns only the points within the given rectangle.",
                    "Filters points to those inside a region given as [x1, y1, x2, y2]."],
                   {"points": ("array", ["points", "coords", "pts", "candidates"],
                               ["list of [x, y] points", "the points to test"]),
                    "box": ("array", ["box", "region", "rect", "area"], ["[x1, y1, x2, y2]", "the rectangle"])},
                   _inside, "keep the points inside the box"),
    "nearest": Kind(["nearest_point", "closest", "find_nearest", "near"],
                    ["Among candidate [x, y] points, return the one nearest to an origin (city-block distance).",
                     "Finds which candidate point is closest to the origin point.",
                     "Returns the candidate with the smallest |dx| + |dy| to the origin, and its index."],
                    {"origin": ("array", ["origin", "from", "start", "ref"],
                                ["[x, y] reference point", "the point to measure from"]),
                     "candidates": ("array", ["candidates", "points", "options", "targets"],
                                    ["list of [x, y] points", "points to compare"])},
                    _nearest, "find the nearest one"),
    "locate": Kind(["locate", "find_place", "where_is", "map_search"],
                   ["Look a named place up on the map; returns the [x, y] position of every place with that name.",
                    "Returns the coordinates of all map locations called by the given name (empty when none).",
                    "Map search: name a kind of place, get the [x, y] of each one."],
                   {"place": ("string", ["place", "name", "what", "query"],
                              ["the place to find", "name of the place"])},
                   _locate, "find where that is"),
}


@dataclass
class Toolset:
    """The synthetic tools of one prompt: their schemas as shown, and `call`, the engine's way to run them."""
    world: dict
    tools: dict = field(default_factory=dict)    # shown name -> (kind key, {role: shown param name})
    schemas: list = field(default_factory=list)

    def add(self, kind_key, rng, random_names):
        kind = KINDS[kind_key]
        # calls are routed by name, so a prompt never shows one twice
        taken = set(self.tools)
        name = rng.choice([n for n in kind.names if n not in taken] or [rand_name(rng)])
        # ADL-style: a random name says nothing, only the description tells the tool's job
        name = rand_name(rng) if random_names else name
        # with random names, each parameter is random or readable half the time
        params = {role: (rand_name(rng) if random_names and rng.random() < 0.5 else rng.choice(names))
                  for role, (_, names, _) in kind.params.items()}
        self.tools[name] = (kind_key, params)
        props = {params[role]: {"type": typ, "description": rng.choice(descs)}
                 for role, (typ, _, descs) in kind.params.items()}
        # the same schema layout as the seven visual tools' (tools.schemas); every parameter is required
        self.schemas.append({"type": "function", "function": {
            "name": name, "description": rng.choice(kind.descriptions),
            "parameters": {"type": "object", "properties": props, "required": list(props)}}})
        return name

    def name_of(self, kind_key):  # a kind is offered at most once per prompt
        return next(n for n, (k, _) in self.tools.items() if k == kind_key)

    def call_json(self, kind_key, args):
        """The protocol's call for a kind with arguments by role, in this prompt's names."""
        name = self.name_of(kind_key)
        params = self.tools[name][1]
        return {"name": name, "parameters": {params[role]: v for role, v in args.items()}}

    def call(self, name, params, images=None, timeout=None):
        """Run a call as the model wrote it -> ToolResult; every mistake becomes an error the model can read."""
        if name not in self.tools:
            return ToolResult("error", error=f"unknown tool '{name}'; available: {', '.join(self.tools)}")
        kind_key, names = self.tools[name]
        if not isinstance(params, dict):
            return ToolResult("error", error="parameters must be a JSON object")
        # the error lists the parameters the tool takes, for the retry to copy
        missing = [p for p in names.values() if p not in params]
        unknown = [p for p in params if p not in names.values()]
        if missing or unknown:
            return ToolResult("error", error=f"missing parameters: {', '.join(missing) or 'none'}; unknown parameters: "
                                             f"{', '.join(unknown) or 'none'}; {name} takes "
                                             f"{', '.join(names.values())}")
        try:
            # role-named arguments, then the message (if any) in the names the prompt shows
            return ToolResult("success", data=KINDS[kind_key].run(self.world, {r: params[p] for r, p in names.items()}))
        except ToolError as e:
            msg = str(e)
            for role, shown in names.items():
                msg = msg.replace(f"'{role}'", f"'{shown}'")
            return ToolResult("error", error=msg)

# -----------------------------------------------------------------------------
# 3. the corpus: scenarios played in the protocol against the real synthetic tools


def make_world(rng):
    """The hidden state the synthetic tools read: records, document pages and a map of named places."""
    # dict.fromkeys, not a set: a set's order changes with PYTHONHASHSEED and the corpus must not
    # 3-6 record ids (fewer if two draws coincide)
    ids = list(dict.fromkeys(f"{rng.choice(['item', 'user', 'order', 'P', 'node'])}-{rng.randint(10, 9999)}"
                             for _ in range(rng.randint(3, 6))))
    # 4-20 fields a record: a lookup has to pick the asked field out of many
    records = {i: {f: rand_value(rng) for f in rng.sample(FIELDS, rng.randint(4, 20))} for i in ids}
    pages = {}
    for _ in range(rng.randint(2, 4)):
        # a page's lines alternate "Label:" and its value; labels are unique within a page
        labels = rng.sample(FIELDS, rng.randint(3, 8))
        pages[f"{rng.choice(WORDS)}_{rng.randint(1, 99)}"] = [s for lab in labels
                                                              for s in (f"{lab.title()}:", rand_value(rng))]
    places = {p: rand_points(rng, rng.randint(1, 8)) for p in rng.sample(PLACES, rng.randint(3, 6))}  # 1-8 of each
    layouts = {f"{rng.choice(WORDS)}_{rng.randint(1, 99)}": make_layout(rng) for _ in range(rng.randint(1, 3))}
    return {"records": records, "pages": pages, "places": places, "layouts": layouts}


def make_layout(rng):
    """A form page as a layout reader returns it: a title, rows of "Label:" and value, a button or two, each text
    with its box. Labels share one column and values another, so x coordinates and the keys repeat on every row:
    quoting one row's items verbatim needs a copy that keeps its place, not one that jumps to the last match."""
    text_key, box_key = rng.choice([("text", "bbox"), ("text", "box"), ("str", "rect"), ("value", "pos"),
                                    ("label", "at")])

    def item(text, x, y):  # about 6 px a character, 7 px high
        return {text_key: text, box_key: [x, y, x + 6 * len(text) - 1, y + 7]}
    items = [item(f"{rng.choice(WORDS).title()} {rng.choice(WORDS).title()}", 16, 13)]
    label_x, value_x, row = rng.randint(10, 40), rng.randint(150, 220), rng.randint(30, 60)
    labels = rng.sample(FIELDS, rng.randint(3, 7))
    for i, lab in enumerate(labels):
        y = 60 + i * row
        items += [item(f"{lab.title()}:", label_x, y), item(rand_value(rng), value_x, y)]
    y = 60 + len(labels) * row + 20
    items += [item(w, 400 + 80 * j, y) for j, w in enumerate(rng.sample(["Save", "Cancel", "Help", "Next"],
                                                                       rng.randint(0, 2)))]
    return items


def think_call(ts, kind_key, rng, name=None):
    """The thinking before a call: first what the question needs, then the tool. The name comes last, so the model
    has written down what it looks for before it picks the tool whose description matches."""
    templates = ["To {purpose} I call {name}.", "I need to {purpose}; the tool for that is {name}.",
                 "The question asks me to {purpose}, which is what {name} does.", "I have to {purpose}: I use {name}."]
    return rng.choice(templates).format(name=name or ts.name_of(kind_key), purpose=KINDS[kind_key].purpose)


def listed(rng, lists, target):
    """Several labelled lists in random order, the one to use among them (copy at a random offset)."""
    labels = rng.sample(["A", "B", "C", "D", "first", "second", "red", "blue", "north", "south"], len(lists))
    # shown in random order: the target sits at any position, so copying must find it by its label
    order = rng.sample(range(len(lists)), len(lists))
    lines = [f"{labels[i]}: {json.dumps(lists[i])}" for i in order]
    return "\n".join(lines), labels[target]


# Each scenario is a generator of (rng, world): it yields (kind, args by role, question) for every call it wants,
# the question on the first yield only (None after), receives the real observation's data, and returns
# (thinking, answer). tool_scenario builds the toolset after the first yield and plays every call, mistakes and
# retries included; `needs` in SCENARIOS lists the kinds the toolset must offer (None: the first call's kind).


def sc_record(rng, world):
    rid = rng.choice(list(world["records"]))
    fld = rng.choice(list(world["records"][rid]))
    q = rng.choice(["What is the {f} of record {r}?", "Look up {r} and tell me its {f}.",
                    "Record {r}: what is its '{f}' field?"])
    data = yield "record", {"id": rid}, q.format(f=fld, r=rid)
    # the answer is read from the observation, never from the world: the model only sees the former
    return f"The record's {fld} is {data['record'][fld]}.", data["record"][fld]


def sc_document(rng, world):
    page = rng.choice(list(world["pages"]))
    lines = world["pages"][page]
    k = rng.randrange(0, len(lines), 2)  # an even line: a label
    label = lines[k][:-1]  # without its colon
    q = rng.choice(["On page {p}, what is written after '{l}'?", "What is the value of '{l}' on page {p}?",
                    "Read page {p}: which value belongs to the label {l}?"])
    data = yield "document", {"page": page}, q.format(p=page, l=label)
    value = data["lines"][data["lines"].index(label + ":") + 1]
    return f"The line after '{label}:' says {value}.", value


def sc_layout(rng, world):
    """A value read off a laid-out page: the thinking quotes the label's item and the next one as the observation
    writes them (one contiguous span), then answers the value."""
    page = rng.choice(list(world["layouts"]))
    items = world["layouts"][page]
    text_key = next(iter(items[0]))
    k = rng.choice([i for i, it in enumerate(items) if it[text_key].endswith(":")])  # a label's item
    label = items[k][text_key][:-1]
    q = rng.choice(["On page {p}, what is the value of '{l}'?", "Read the {l} on page {p}.",
                    "Page {p}: what is the {l}?"])
    data = yield "layout", {"page": page}, q.format(p=page, l=label)
    got = data["items"]
    pair = ", ".join(json.dumps(it, ensure_ascii=False) for it in got[k:k + 2])  # the label's item and its value's
    think = rng.choice(["The layout reads {pair}: the value on the row of '{l}'.",
                        "In the items: {pair}. The second text is the value of '{l}'.", "Label and value: {pair}."])
    return think.format(pair=pair, l=label), got[k + 1][text_key]


def sc_numbers(rng, world):
    kind = rng.choice(["sort", "filter", "sum", "count"])
    lists = [[rng.randint(0, 999) for _ in range(rng.randint(2, 12))] for _ in range(rng.randint(1, 3))]
    target = rng.randrange(len(lists))
    text, label = listed(rng, lists, target)
    args = {"values": lists[target]} if kind != "count" else {"items": lists[target]}  # count's role is "items"
    if kind == "filter":
        args["threshold"] = rng.randint(0, 999)
    ask = {"sort": "Sort list {l} in ascending order.", "filter": "Keep the numbers of list {l} that are above {t}.",
           "sum": "What is the sum of list {l}?", "count": "How many numbers does list {l} have?"}[kind]
    data = yield kind, args, f"{text}\n{ask.format(l=label, t=args.get('threshold'))}"
    value = json.dumps(next(iter(data.values())))  # each of these kinds returns one field: the answer is its JSON
    return f"The tool returned {value}.", value


def sc_points(rng, world):
    kind = rng.choice(["shift", "scale", "inside"])
    lists = [rand_points(rng, rng.randint(1, 16)) for _ in range(rng.randint(1, 3))]
    target = rng.randrange(len(lists))
    text, label = listed(rng, lists, target)
    args = {"points": lists[target]}
    if kind == "shift":
        args.update(dx=rng.randint(-50, 50), dy=rng.randint(-50, 50))
        ask = f"Shift the points of {label} by dx={args['dx']}, dy={args['dy']}."
    elif kind == "scale":
        args["factor"] = rng.randint(2, 4)
        ask = f"Scale the points of {label} by {args['factor']}."
    else:
        x1, y1 = rng.randint(0, 500), rng.randint(0, 500)  # sides of 100-499 px: the box stays on the map
        args["box"] = [x1, y1, x1 + rng.randint(100, 499), y1 + rng.randint(100, 499)]
        ask = f"Which points of {label} lie inside the box {json.dumps(args['box'])}?"
    data = yield kind, args, f"Points:\n{text}\n{ask}"
    value = json.dumps(next(iter(data.values())))
    return f"The result is {value}.", value


def sc_chain(rng, world):
    """Two or three calls, each later one copying arguments out of earlier observations."""
    places = world["places"]
    a, b = rng.sample(list(places), 2)
    mode = rng.choice(["nearest", "inside", "shift"])
    if mode == "nearest":
        q = f"Which {b} is nearest to the {a}? Give its [x, y]."
        pa = yield "locate", {"place": a}, q
        pb = yield "locate", {"place": b}, None
        # the first {a} the map lists is "the {a}"; both lists are copied out of the observations above
        data = yield "nearest", {"origin": pa["points"][0], "candidates": pb["points"]}, None
        return f"The nearest {b} is at {json.dumps(data['nearest'])}.", json.dumps(data["nearest"])
    if mode == "inside":
        px, py = rng.choice(places[a])  # a box around one of them, so the answer is seldom empty
        x1, y1 = max(0, px - rng.randint(0, 300)), max(0, py - rng.randint(0, 300))
        box = [x1, y1, px + rng.randint(0, 300), py + rng.randint(0, 300)]
        pa = yield "locate", {"place": a}, f"Which {a} positions are inside the box {json.dumps(box)}?"
        data = yield "inside", {"points": pa["points"], "box": box}, None
        return f"These {a} positions are inside: {json.dumps(data['inside'])}.", json.dumps(data["inside"])
    dx, dy = rng.randint(-50, 50), rng.randint(-50, 50)
    pa = yield "locate", {"place": a}, f"Find every {a} and shift the positions by dx={dx}, dy={dy}."
    data = yield "shift", {"points": pa["points"], "dx": dx, "dy": dy}, None
    return f"Shifted: {json.dumps(data['points'])}.", json.dumps(data["points"])


def sc_record_chain(rng, world):
    """A record holds a number list; a second tool works on it."""
    rid = rng.choice(list(world["records"]))
    fld = rng.choice(list(world["records"][rid]))
    # the field now holds a number list; the record tool reads this world, so its observation shows the list
    world["records"][rid][fld] = [rng.randint(0, 999) for _ in range(rng.randint(2, 10))]
    kind = rng.choice(["sort", "sum"])
    data = yield "record", {"id": rid}, (f"Take the '{fld}' list of record {rid} and "
                                         f"{'sort it' if kind == 'sort' else 'add it up'}.")
    out = yield kind, {"values": data["record"][fld]}, None
    value = json.dumps(next(iter(out.values())))
    return f"The answer is {value}.", value


# name -> (generator, kinds the toolset must offer, or None for just the first call's)
SCENARIOS = {"record": (sc_record, ["record"]), "document": (sc_document, ["document"]),
             "layout": (sc_layout, ["layout"]),
             "numbers": (sc_numbers, None), "points": (sc_points, None),
             "chain": (sc_chain, ["locate", "nearest", "inside", "shift"]),
             "record_chain": (sc_record_chain, ["record", "sort", "sum"])}


def corrupt(rng, call, ts, kind_key):
    """A plausible mistake in a call -> (the wrong call, the thinking that fixes it once the error is read): a
    parameter left out, a list sent as a string, a parameter name the tool does not take, a misspelt tool name,
    or another offered tool."""
    name, params = call["name"], dict(call["parameters"])
    key = rng.choice(list(params))  # the parameter (shown name) a mistake touches
    mistake = rng.choice(["drop", "string", "param", "spelling", "tool"])
    fix = "The call failed ({error}). I fix the arguments and try again."
    if mistake == "string" and isinstance(params[key], list):  # fails the list checks (_points, _ints)
        params[key] = json.dumps(params[key])
    elif mistake == "param":  # a readable name instead of the one shown (what a model guesses)
        role = next(r for r, shown in ts.tools[name][1].items() if shown == key)
        # another readable name of the same role, or a generic one; never a name the call already uses
        guess = rng.choice([n for n in KINDS[kind_key].params[role][1] + ["input", "data"] if n not in params])
        params[guess] = params.pop(key)
        fix = "The call failed ({error}). I use the parameter names the tool takes."
    elif mistake == "spelling":
        i = rng.randrange(len(name))
        other = [c for c in string.ascii_lowercase + string.digits if c != name[i]]
        wrong = name[:i] + rng.choice(other) + name[i + 1:]
        if wrong not in ts.tools:  # a typo that names another offered tool is no typo
            name, fix = wrong, "The call failed ({error}). The tool's name is {name}; I call it again."
    elif mistake == "tool":  # another offered tool (every prompt offers at least two) with these arguments
        name = rng.choice([n for n in ts.tools if n != name])
        fix = "The call failed ({error}). {wrong} does not {purpose}; the tool that does is {name}."
    if (name, params) == (call["name"], call["parameters"]):  # a mistake that does not apply here: drop a parameter
        del params[key]
    return {"name": name, "parameters": params}, fix


def assistant(think, call=None, answer=None):  # one turn: thinking, then a call or a \boxed answer, never both
    body = f"<think>{think}</think>"
    if call is not None:
        return {"role": "assistant", "content": body + f"<tool_call>{json.dumps(call, ensure_ascii=False)}</tool_call>"}
    return {"role": "assistant", "content": body + f"<response>\\boxed{{{answer}}}</response>"}


def tool_scenario(rng, name=None, random_names=None, n_tools=None):
    """One generic tool-use conversation -> (messages, toolset, expected calls, answer). Every observation is the
    real result of the call before it."""
    name = name or rng.choice(list(SCENARIOS))
    fn, needs = SCENARIOS[name]
    world = make_world(rng)
    gen = fn(rng, world)
    # the first request brings the question and, for scenarios of varying kind, the kind the toolset must offer
    kind_key, args, question = next(gen)
    needs = needs or [kind_key]
    random_names = rng.random() < 0.5 if random_names is None else random_names  # half the prompts ADL-style
    # at least two tools, so there is always a choice to make; every needed kind is offered, the rest distract
    n_tools = n_tools or rng.randint(max(2, len(needs)), 6)
    kinds = needs + rng.sample([k for k in KINDS if k not in needs], max(0, n_tools - len(needs)))
    ts = Toolset(world)
    for k in rng.sample(kinds, len(kinds)):  # the tool list in random order
        ts.add(k, rng, random_names)
    messages = [{"role": "system", "content": rollout.system_prompt(ts.schemas)},
                {"role": "user", "content": question}]
    calls = []  # the right calls only, in order (the checks' expected first call)
    while True:  # one call per request of the scenario
        call = ts.call_json(kind_key, args)
        if rng.random() < 0.15:  # a mistake, the tool's real error, and the fix that reads it
            bad, fix = corrupt(rng, call, ts, kind_key)
            result = ts.call(bad["name"], bad["parameters"])
            # the wrong turn is an assistant turn like the others, and carries loss like them
            if result.status == "error":
                messages += [assistant(think_call(ts, kind_key, rng, bad["name"]), bad),
                             rollout.observation_message(observation(bad["name"], result))]
                think = fix.format(error=result.error, name=call["name"], wrong=bad["name"],
                                   purpose=KINDS[kind_key].purpose)
                messages.append(assistant(think, call))
            else:  # the mistake happened to run (another tool taking the same parameter names): no error to learn from
                messages.append(assistant(think_call(ts, kind_key, rng), call))
        else:
            messages.append(assistant(think_call(ts, kind_key, rng), call))
        result = ts.call(call["name"], call["parameters"])
        # the right call always runs: scenarios only ask for what their world holds
        assert result.status == "success", result.error
        messages.append(rollout.observation_message(observation(call["name"], result)))
        calls.append(call)
        try:  # the scenario reads the real result: a chain's next arguments are copied from it
            kind_key, args, _ = gen.send(result.data)
        except StopIteration as stop:
            think, answer = stop.value
            break
    messages.append(assistant(think, answer=answer))
    return messages, ts, calls, answer


def copy_item(rng):
    """Copy a span, a number list, a point list or a JSON record out of the question; no tool is needed even
    when some are offered."""
    form = rng.randrange(4)
    # 2-4 lists, the target among distractors of the same form: word spans, numbers, [x, y] points, records
    if form == 0:
        lists = [" ".join(rng.sample(WORDS, rng.randint(2, 8))) for _ in range(rng.randint(2, 4))]
    elif form == 1:
        lists = [[rng.randint(0, 9999) for _ in range(rng.randint(1, 16))] for _ in range(rng.randint(2, 4))]
    elif form == 2:
        lists = [rand_points(rng, rng.randint(1, 16)) for _ in range(rng.randint(2, 4))]
    else:
        lists = [{f: rand_value(rng) for f in rng.sample(FIELDS, rng.randint(2, 6))} for _ in range(rng.randint(2, 4))]
    target = rng.randrange(len(lists))
    text, label = listed(rng, lists, target)
    # `listed` shows a span in JSON quotes; its answer is the text inside them, the other forms their JSON
    answer = lists[target] if isinstance(lists[target], str) else json.dumps(lists[target])
    ask = rng.choice(["Repeat {l} exactly.", "Copy entry {l}.", "What does {l} say? Answer with it verbatim."])
    tools = []
    if rng.random() < 0.2:  # mostly short and dense: copies are what the loss should be about
        ts = Toolset(make_world(rng))
        for k in rng.sample(list(KINDS), rng.randint(2, 5)):
            ts.add(k, rng, rng.random() < 0.5)
        tools = ts.schemas
    return [{"role": "system", "content": rollout.system_prompt(tools)},
            {"role": "user", "content": f"{text}\n{ask.format(l=label)}"},
            assistant(rng.choice(["No tool is needed: the answer is in the question.", "I copy it from the question.",
                                  f"Entry {label} is right there; I repeat it."]), answer=answer)]


COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (240, 210, 20),
           "black": (20, 20, 20), "white": (250, 250, 250), "purple": (130, 40, 170), "orange": (245, 140, 20)}
BACKGROUNDS = [(200, 200, 200), (170, 190, 210), (215, 200, 170), (160, 160, 160)]


def draw_shape(d, shape, box, colour):
    x1, y1, x2, y2 = box
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([((x1 + x2) // 2, y1), (x2, y2), (x1, y2)], fill=colour)


def vision_item(rng):
    """A plain picture of 1-4 large shapes and a short question about colour, shape, count or position."""
    size = rng.choice([112, 168, 224])  # 4x4, 6x6 or 8x8 vision tokens of 28 px
    img = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    d = ImageDraw.Draw(img)
    cell = size // 2
    slots = rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], rng.randint(1, 4))  # quadrants (column, row), one shape each
    objs = []
    for sx, sy in slots:
        shape, colour = rng.choice(["circle", "square", "triangle"]), rng.choice(list(COLOURS))
        m = rng.randint(4, cell // 6)  # margin: a shape fills most of its quadrant and never touches another
        draw_shape(d, shape, (sx * cell + m, sy * cell + m, (sx + 1) * cell - m, (sy + 1) * cell - m), COLOURS[colour])
        objs.append((shape, colour, sx, sy))
    shape, colour, sx, sy = rng.choice(objs)
    # "the {shape}" must name one object: colour and position need a unique shape, the shape question a unique
    # colour; a count is always well defined
    kinds = ["count"]
    if sum(o[0] == shape for o in objs) == 1:
        kinds += ["colour", "where"]
    if sum(o[1] == colour for o in objs) == 1:
        kinds.append("shape")
    q = rng.choice(kinds)
    if q == "colour":
        question, answer = f"What colour is the {shape}?", colour
    elif q == "shape":
        question, answer = f"What shape is the {colour} object?", shape
    elif q == "where":
        axis = rng.choice(["x", "y"])
        question = f"Is the {shape} on the {'left or right' if axis == 'x' else 'top or bottom'}?"
        answer = ("left", "right")[sx] if axis == "x" else ("top", "bottom")[sy]  # from the quadrant it was drawn in
    else:
        question, answer = f"How many {shape}s are there?", str(sum(o[0] == shape for o in objs))
    tools = []
    if rng.random() < 0.3:  # irrelevant tools on offer: a picture question needs none of them
        ts = Toolset(make_world(rng))
        for k in rng.sample(list(KINDS), rng.randint(2, 4)):
            ts.add(k, rng, rng.random() < 0.5)
        tools = ts.schemas
    return [{"role": "system", "content": rollout.system_prompt(tools)},
            {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": question}]},
            assistant(rng.choice(["I look at the picture.", "The shapes are large; I can see it directly."]),
                      answer=answer)]


@dataclass
class Marked:
    """Plain text whose loss falls on marked character spans only (the choose drill): the spans are tokenized as
    part of the whole text, exactly as they are when the model writes them in a turn."""
    text: str
    spans: list  # [(start, end)] character offsets


def choose_item(rng):
    """A tool-choice drill: a prompt's tool list, 2-6 tools of random kinds shown as the system prompt shows them
    (most with random names), then one thinking line per tool in another order, each naming the tool for its
    purpose as the corpus's turns do ("To sort the numbers I call x7uppz."), the loss on the names only. The
    held-out tool-choice check misses this token: in 66 of the 69 failures of the run-5 base, the first call named
    another offered tool or a name not offered (the tail of one tool's name with the head of another's), while the
    arguments were right whenever the tool was. The name comes before its description in a schema, so choosing by
    description is a lookup backwards, which the tools scenarios practise on one token in hundreds; here it is
    every line's target. -> Marked."""
    ts = Toolset({})  # the tools are only named here, never called: no world behind them
    kinds = rng.sample(list(KINDS), rng.randint(2, 6))
    random_names = rng.random() < 0.8  # the check's case (ADL-style names), and readable names sometimes
    for k in kinds:
        ts.add(k, rng, random_names)
    text, spans = rollout.system_prompt(ts.schemas) + "\n\n", []
    # each offered tool once, in another order: a second line for a kind could copy the first instead of looking up
    for kind_key in rng.sample(kinds, len(kinds)):
        line, name = think_call(ts, kind_key, rng), ts.name_of(kind_key)
        start = len(text) + line.rindex(name)  # every template ends with the name or with "{name} does."
        spans.append((start, start + len(name)))
        text += line + "\n"
    return Marked(text, spans)


def drill_item(rng):
    """A plain copy drill, no chat template: 2-3 labelled lists (words, numbers or [x, y] pairs) and a cue; the
    loss falls on the copy only. Short and dense: the copy circuit forms here (for the shipped base, abruptly
    at about step 2,050 of 32k-token batches). -> (text before the copy, the copy)."""
    form = rng.randrange(5)
    n = rng.randint(2, 3)
    if form == 0:  # unique words across all lists: plain induction (the token after the match) suffices
        sizes = [rng.randint(3, 10) for _ in range(n)]
        words = rng.sample(WORDS + FIELDS + PLACES, sum(sizes))
        lists = [" ".join(words[sum(sizes[:i]):sum(sizes[:i + 1])]) for i in range(n)]
    elif form == 1:  # numbers and pairs as JSON, exactly as tool calls and observations write them
        lists = [json.dumps([rng.randint(0, 9999) for _ in range(rng.randint(2, 12))]) for _ in range(n)]
    elif form == 2:
        lists = [json.dumps(rand_points(rng, rng.randint(1, 10))) for _ in range(n)]
    elif form == 3:  # runs of one repeated move: the token after the match is ambiguous, the copy must keep count
        lists = [",".join(m for _ in range(rng.randint(2, 6)) for m in [rng.choice("LRUD")] * rng.randint(1, 7))
                 for _ in range(n)]
    else:  # numbers drawn from a pool of 2-4: almost every token repeats within and across the lists
        pool = rng.sample(range(1000), rng.randint(2, 4))
        lists = [json.dumps(rng.choices(pool, k=rng.randint(3, 12))) for _ in range(n)]
    labels = rng.sample(["A", "B", "C", "D", "E", "F"], n)
    k = rng.randrange(n)
    # the cue "copy X: " ends the text; the loss falls on what follows it (encode_item)
    return "".join(f"{lab}: {x}\n" for lab, x in zip(labels, lists)) + f"copy {labels[k]}: ", lists[k]


MIX_PARTS = ("drill", "copy", "tools", "layout", "choose", "vision")  # what corpus_item can draw


def parse_mix(text):
    """'copy=0.35,tools=0.5,vision=0.15' -> (("copy", 0.35), ...)"""
    mix = tuple((k.strip(), float(v)) for k, v in (p.split("=") for p in text.split(",")))
    unknown = [k for k, _ in mix if k not in MIX_PARTS]
    if unknown:
        raise ValueError(f"--mix: unknown parts {unknown}; the parts are {', '.join(MIX_PARTS)}")
    return mix


def corpus_item(rng, mix=None, images=True):
    """One item of the pretraining corpus: a conversation (list of messages), or a drill (text, copy).
    mix: ((part, share), ...), default --mix's."""
    mix = mix or parse_mix(parser.get_default("mix"))
    part = rng.choices([p for p, _ in mix], [w for _, w in mix])[0]  # shares are weights: they need not sum to 1
    if part == "drill":
        return drill_item(rng)
    if part == "vision" and images:
        return vision_item(rng)
    if part == "copy":
        return copy_item(rng)
    if part == "choose":
        return choose_item(rng)
    if part == "layout":  # the layout scenario alone (it is also one of the "tools" scenarios)
        return tool_scenario(rng, "layout")[0]
    return tool_scenario(rng)[0]  # "tools", and "vision" when images=False (the tokenizer's corpus is text only)

# -----------------------------------------------------------------------------
# 4. pretraining: a plain loop over freshly generated, length-grouped batches


def encode_item(processor, item):
    """-> (ids, loss mask, images). A conversation as the engine sees it (loss on assistant turns); a copy drill as
    plain text with the loss on the copy and the <|im_end|> that closes it; a Marked text with the loss on its spans."""
    if isinstance(item, list):
        return rollout.encode_conversation(processor, item)
    if isinstance(item, Marked):  # loss on every token that overlaps a marked span
        enc = processor.tokenizer(item.text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [int(any(a < end and start < b for start, end in item.spans)) for a, b in enc["offset_mapping"]]
        return enc["input_ids"], mask, []
    # the closing <|im_end|> carries loss too: the drill also teaches where a copy stops
    head, copy = processor.encode_text(item[0]), processor.encode_text(item[1]) + [processor.im_end]
    return head + copy, [0] * len(head) + [1] * len(copy), []


def chunk_batches(seed, phase, chunk, processor, batch_tokens, mix, steps_per_chunk=8):
    """The batches of one chunk of steps, deterministic from (seed, phase, chunk): draw items worth
    `steps_per_chunk` batches, sort them by length, cut them into batches of at most `batch_tokens` padded
    tokens, and shuffle the batches. A resumed run rebuilds the chunk and continues at the same batch."""
    # the chunk's own stream: any chunk can be rebuilt alone (on resume, in any worker)
    rng = random.Random(f"pretrain-{seed}-{phase}-{chunk}")
    items, total = [], 0
    # unpadded tokens worth 80% of steps_per_chunk full batches: padding and the room the cut below leaves in each
    # batch bring that to roughly steps_per_chunk batches (pretrain takes however many there are)
    while total < steps_per_chunk * batch_tokens * 0.8:
        ids, mask, images = encode_item(processor, corpus_item(rng, mix))
        if len(ids) <= batch_tokens:  # a longer item fits no batch
            items.append((ids, mask, images))
            total += len(ids)
    items.sort(key=lambda it: len(it[0]))  # by length: a batch's rows then pad to nearly the same length
    batches, cur = [], []
    for it in items:
        # sorted ascending, `it` is the longest so far: (rows + 1) * its length is the padded size with it added
        if cur and (len(cur) + 1) * len(it[0]) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(it)
    batches.append(cur)
    # in sorted order the steps would go from short items to long ones (in the mix: drills first, tool scenarios last)
    rng.shuffle(batches)
    return batches


class Chunks(torch.utils.data.Dataset):
    """Chunk i of one phase -> its batches, pickled (plain bytes cross process boundaries without holding a
    shared-memory handle per image tensor). A Dataset so that DataLoader workers can build chunks ahead."""

    def __init__(self, seed, phase, processor, batch_tokens, mix):
        self.args = (seed, phase, processor, batch_tokens, mix)

    def __len__(self):  # endless: the sampler says which chunks are read
        return 1 << 40

    def __getitem__(self, i):
        seed, phase, processor, batch_tokens, mix = self.args
        return pickle.dumps(chunk_batches(seed, phase, i, processor, batch_tokens, mix))


def as_is(raw):  # the loader's collate_fn: a chunk's pickled bytes pass through untouched
    return raw


def chunk_stream(seed, phase, start, processor, batch_tokens, mix, workers):
    """Yields the batches of chunks start, start+1, ... of one phase, in order; with workers > 0 they are built
    ahead in background processes."""
    chunks = Chunks(seed, phase, processor, batch_tokens, mix)
    if not workers:  # built here, nothing crosses a process boundary: no pickling
        yield from (chunk_batches(seed, phase, i, processor, batch_tokens, mix) for i in range(start, len(chunks)))
        return
    # batch_size=None: one item is one whole chunk; each worker builds up to 4 chunks ahead, and the loader hands
    # them over in the sampler's order whichever worker finishes first, so the stream is the same as without workers
    loader = torch.utils.data.DataLoader(chunks, sampler=range(start, len(chunks)), batch_size=None,
                                         num_workers=workers, collate_fn=as_is, prefetch_factor=4)
    for raw in loader:
        yield pickle.loads(raw)


def pretrain(model, processor, out, steps, drill_steps, batch_tokens, lr, warmup, cooldown, weight_decay, clip, mix,
             seed, ckpt_every, resume, stop_after, device, workers=0, stop_minutes=0):
    """The loop; returns the finished state, or None when --stop-after or --stop-minutes stopped it early."""
    deadline = time.time() + 60 * stop_minutes if stop_minutes else None
    params = [p for p in model.parameters() if p.requires_grad]
    # beta2 0.95, the usual choice of LM pretraining (nanoGPT's): the second moment follows a changing gradient
    # scale sooner than with 0.999
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    ckpt = os.path.join(out, "ckpt")
    # where the data stands: the phase, the chunk of it and the batch within the chunk; saved with every
    # checkpoint, so a resumed run trains on exactly the batches an uninterrupted one would have
    state = {"step": 0, "phase": "drill", "chunk": 0, "pos": 0}
    found = rollout.resume_from(ckpt, resume)
    if found:
        # the weights are copied into this model rather than replacing it: the optimizer holds these parameters
        model.load_state_dict(rollout.load_policy(os.path.join(found, "model"), device, torch.float32)[0].state_dict())
        state = rollout.load_checkpoint(found, optimizer)
        print(f"resumed at step {state['step']}")
    log = rollout.open_log(os.path.join(out, "log.jsonl"), state["step"])
    autocast = rollout.train_autocast(device)  # bf16 on CUDA, fp32 on a CPU (see rollout.bf16_autocast_fits)
    print(f"training passes in {'bf16 autocast' if rollout.bf16_autocast_fits(device) else 'fp32'} on {device}")
    stream, batches, have = None, None, None  # have: the (phase, chunk) whose batches are held
    bar = tqdm(total=steps, initial=state["step"], desc="pretrain", dynamic_ncols=True)
    model.train()
    while state["step"] < steps:
        t0 = time.perf_counter()
        phase = "drill" if state["step"] < drill_steps else "mix"  # the curriculum: copy drills, then the mix
        if phase != state["phase"]:  # the mix starts at its own chunk 0
            state.update(phase=phase, chunk=0, pos=0)
        if have != (phase, state["chunk"]):  # chunks advance one at a time, so the stream is always in step
            # a stream per phase, opened at the first step (fresh or resumed) and at the switch
            if have is None or have[0] != phase:
                phase_mix = (("drill", 1.0),) if phase == "drill" else mix
                stream = chunk_stream(seed, phase, state["chunk"], processor, batch_tokens, phase_mix, workers)
            batches = next(stream)
            have = (phase, state["chunk"])
        batch = batches[state["pos"]]
        # WSD: linear warmup, constant through the copy transition, a linear decay to 10% over the last `cooldown`
        lr_now = rollout.lr_at(state["step"], steps, lr, warmup, "wsd", cooldown)
        for g in optimizer.param_groups:
            g["lr"] = lr_now
        with autocast:
            loss, n = rollout.masked_lm_loss(model, processor, batch, device)
        # the mean over the batch's loss tokens: every token weighs the same, so a long item weighs more
        (loss / max(1, n)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)  # the norm before clipping: the one logged
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["pos"] += 1
        if state["pos"] == len(batches):  # chunks hold a varying number of batches
            state["chunk"], state["pos"] = state["chunk"] + 1, 0
        dt = time.perf_counter() - t0  # the whole step, waiting for its batch included
        tokens = sum(len(ids) for ids, _, _ in batch)  # unpadded
        rec = {"step": state["step"], "phase": phase, "loss": loss.item() / max(1, n), "lr": lr_now,
               "grad_norm": float(grad_norm),
               "tokens": tokens, "loss_tokens": n, "tokens_per_s": tokens / dt, "cpu_s": time.process_time()}
        # cpu_s: this process's CPU seconds so far; against wall time it shows a machine shared with others
        log.write(json.dumps(rec) + "\n")
        log.flush()  # each step's line reaches the file; a resume drops those past its checkpoint (open_log)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr_now:.1e}", tok_s=f"{rec['tokens_per_s']:.0f}")
        stop = (stop_after and state["step"] >= stop_after) or (deadline and time.time() > deadline)
        # also right before an early stop and at the last step: --resume then continues from the very next step
        if (ckpt_every and state["step"] % ckpt_every == 0) or stop or state["step"] == steps:
            rollout.save_checkpoint(ckpt, model, processor, optimizer, state)
        if stop and state["step"] < steps:  # a stop at the last step is simply the end
            bar.close()
            log.close()
            return None
    bar.close()
    log.close()
    model.eval()
    return state

# -----------------------------------------------------------------------------
# 5. held-out checks: greedy rollouts through the engine, on seeds the corpus never draws


def check_examples(check, n):
    """-> (examples, toolsets, expected first calls) for one check; seeds 'heldout-*' never occur in training."""
    examples, toolsets, expected = [], [], []
    for i in range(n):
        rng = random.Random(f"heldout-{check}-{i}")
        if check == "copy_list":  # a 1-16 pair list among distractors, copied into a call
            messages, ts, calls, answer = tool_scenario(rng, "points", n_tools=rng.randint(2, 6))
        elif check == "lookup":   # the value of a named key in a record of 4-20 fields
            messages, ts, calls, answer = tool_scenario(rng, "record", n_tools=rng.randint(2, 6))
        else:                     # tool choice by description among 2-6 randomly named tools
            messages, ts, calls, answer = tool_scenario(rng, rng.choice(["numbers", "points", "record", "document"]),
                                                        random_names=True, n_tools=rng.randint(2, 6))
        question = next(m["content"] for m in messages if m["role"] == "user")
        examples.append({"id": f"{check}-{i}", "task": "synthetic", "question": question, "images": [],
                         "answer": answer, "meta": {}})
        toolsets.append(ts)  # the engine runs the model's calls against this prompt's own synthetic tools
        expected.append(calls[0])  # the scenario's right first call (a corpus mistake is never in `calls`)
    return examples, toolsets, expected


def run_checks(model, processor, n, seed=0):
    """Greedy rollouts on the held-out checks -> {check: rate} for copy_list, lookup and tool_choice, format_valid
    over those three, and vision (picture questions, direct-answer prompt); {} for n=0."""
    if not n:
        return {}
    out, fmt = {}, []
    for check in ("copy_list", "lookup", "tool_choice"):
        examples, toolsets, expected = check_examples(check, n)
        # greedy; 4 turns: the call, the answer, and room for retries after errors
        trajs = rollout.rollout(model, processor, examples, toolsets=toolsets, temperature=0, max_turns=4,
                                max_new_tokens=256, max_total_tokens=3072, seed=seed)
        first = [t.calls[0] if t.calls else None for t in trajs]
        if check == "lookup":  # the final answer: the call and the copy out of its observation
            ok = [t.answer is not None and t.answer.strip() == ex["answer"] for t, ex in zip(trajs, examples)]
        elif check == "copy_list":  # the list argument, copied exactly
            ok = [c is not None and c["name"] == e["name"] and _points_arg(c["params"]) == _points_arg(e["parameters"])
                  for c, e in zip(first, expected)]
        else:  # tool choice: the right tool with exactly the right arguments
            ok = [c is not None and c["name"] == e["name"] and c["params"] == e["parameters"]
                  for c, e in zip(first, expected)]
        out[check] = sum(ok) / len(ok)
        fmt += [t.format_valid for t in trajs]
    out["format_valid"] = sum(fmt) / len(fmt)
    # vision: messages [system, user [image, question], assistant]; the expected answer is the corpus turn's
    # \boxed value, asked under the direct-answer prompt (tools=[]), whatever tools the item offered
    vision = [vision_item(random.Random(f"heldout-vision-{i}")) for i in range(n)]
    examples = [{"id": f"vision-{i}", "task": "synthetic", "question": m[1]["content"][1]["text"],
                 "images": [m[1]["content"][0]["image"]], "answer": extract_answer(m[-1]["content"]), "meta": {}}
                for i, m in enumerate(vision)]
    trajs = rollout.rollout(model, processor, examples, tools=[], temperature=0, max_turns=2, max_new_tokens=64,
                            seed=seed)
    out["vision"] = sum(t.answer == ex["answer"] for t, ex in zip(trajs, examples)) / n
    return out


def _points_arg(params):
    """The list-of-pairs argument of a call, whatever the prompt named it."""
    return next((v for v in (params or {}).values() if isinstance(v, list) and v and isinstance(v[0], list)), None)


def teacher_forced(model, processor, messages, k, span, keep=lambda token: True):
    """-> (hits, total): greedy next-token guesses for the tokens of assistant turn k that lie inside the character
    span (start, end) of its text, given the conversation before it and the turn up to each token; keep(token text)
    picks the tokens scored."""
    text = messages[k]["content"]
    prefix, _, images = rollout.encode_conversation(processor, messages[:k] + [{"role": "assistant", "content": ""}])
    prefix = prefix[:-2]  # drop the empty turn's <|im_end|>\n: the turn goes on
    # the turn up to the span's end, encoded in one piece as training encodes it; scored: the tokens that overlap
    # the span (a token may start before it: a merge across the quote that opens a value)
    enc = processor.tokenizer(text[:span[1]], add_special_tokens=False, return_offsets_mapping=True)
    ids = prefix + enc["input_ids"]
    logits = rollout.sequence_logits(model, processor, [ids], [images])[0]  # [L, V]
    pred = logits[:-1].argmax(-1).tolist()  # pred[t - 1]: the greedy guess for ids[t], given ids[:t]
    scored = [len(prefix) + j for j, (_, end) in enumerate(enc["offset_mapping"])
              if end > span[0] and keep(processor.decode([enc["input_ids"][j]]))]
    return sum(pred[t - 1] == ids[t] for t in scored), len(scored)


def transfer_check(model, processor, data_dir, limit=100):
    """Teacher-forced accuracy on two copies in real TC trajectories, material the base never saw:
    obstacles: the numbers of AStar's `obstacles` in vsp_nav, after the first pair (copied from the Point
    observation above it); gui_value: the value guiqa's answer quotes from the OCR detections (the detection after
    the label's). -> {check: (accuracy, records)}"""
    records = read_jsonl(os.path.join(data_dir, "train.jsonl"), ["task", "messages"], lambda r: r)
    out = {}
    for check, task, marker in (("obstacles", "vsp_nav", '"AStar"'), ("gui_value", "guiqa", '"OCR"')):
        # direct trajectories (TC's efficient plan: no reflection, no failed call) that call the tool
        chosen = [r for r in records if r["task"] == task and r.get("kind") == "direct"
                  and any(marker in m["content"] for m in r["messages"] if m["role"] == "assistant")][:limit]
        hits = total = 0
        for r in chosen:
            messages = with_pil(r["messages"], data_dir)  # the encoder takes PIL images
            if check == "obstacles":
                k = next(i for i, m in enumerate(messages) if m["role"] == "assistant" and marker in m["content"])
                text = messages[k]["content"]
                start = text.index("]", text.index('"obstacles": [') + len('"obstacles": [')) + 1  # past pair 1
                # obstacles is the call's last argument, so the body ends with the list's last pair
                # number tokens only: the separators follow the format
                h, n = teacher_forced(model, processor, messages, k, (start, text.index("]}}</tool_call>")),
                                      keep=lambda token: token.strip().isdigit())
            else:  # the answer turn quotes {"text": label, ...}, {"text": value, ...}: score the value's text
                k = len(messages) - 1
                text = messages[k]["content"]
                start = text.index('{"text": "', text.index('{"text": "') + 1) + len('{"text": "')
                h, n = teacher_forced(model, processor, messages, k, (start, text.index('"', start)))
            hits, total = hits + h, total + n
        out[check] = (hits / max(1, total), len(chosen))
    return out

# -----------------------------------------------------------------------------


def default_workers(device):
    """Batch builders: none on a CPU (they would take cores from training), most of the cores beside a GPU."""
    return 0 if device == "cpu" else max(1, min(14, (os.cpu_count() or 2) - 2))


def main(argv=None):
    args = rollout.parse_flags(parser, argv, QUICK)
    sys.stdout.reconfigure(line_buffering=True)
    device = rollout.resolve_device(args.device)
    if args.check:  # bf16 on CUDA, fp32 on a CPU (load_policy's default)
        model, processor = rollout.load_policy(args.model, device=device)
        with torch.no_grad():
            results = run_checks(model, processor, args.check_n, args.seed)
            if args.tc_data:
                for check, (rate, n) in transfer_check(model, processor, args.tc_data).items():
                    results[f"transfer_{check}"], results[f"transfer_{check}_records"] = rate, n
        print(json.dumps(results, indent=1))
        return results
    mix = parse_mix(args.mix)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    tok_dir = os.path.join(args.out, "tokenizer")
    if (args.new_tokenizer or not args.init) and not os.path.isdir(tok_dir):  # trained once per run directory
        print("training the tokenizer on the fixed corpus ...")
        build_tokenizer(tokenizer_corpus()).save_pretrained(tok_dir)
    from transformers import AutoTokenizer
    if args.init:  # continued pretraining: the base's weights (and tokenizer, unless --new-tokenizer)
        model, processor = rollout.load_policy(args.init, device=device, dtype=torch.float32)
        if args.new_tokenizer:
            new_tok = AutoTokenizer.from_pretrained(tok_dir)
            kept = transfer_vocabulary(model, processor.tokenizer, new_tok)
            print(f"tokenizer of {tok_dir}: {kept} of {len(new_tok)} entries kept their embedding")
            processor = rollout.Processor(new_tok, processor.image_processor)
    else:
        model, processor = build_scratch(AutoTokenizer.from_pretrained(tok_dir), seed=args.seed)
        model.to(device)  # fp32 weights and optimizer state: bf16 only inside autocast, on CUDA
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocabulary "
          f"{len(processor.tokenizer)}, {device}")
    state = pretrain(model, processor, args.out, args.steps, args.drill_steps, args.batch_tokens, args.lr, args.warmup,
                     args.cooldown, args.weight_decay, args.clip, mix, args.seed, args.ckpt_every, args.resume,
                     args.stop_after, device, default_workers(device) if args.workers is None else args.workers,
                     args.stop_minutes)
    if state is None:
        print("stopped early (--stop-after or --stop-minutes); continue with --resume")
        return None
    save = args.save or os.path.join(args.out, "base")
    # the base carries its own training log and the command that made it, so it can be rebuilt and compared
    rollout.save_policy(model, processor, save)
    shutil.copy(os.path.join(args.out, "log.jsonl"), os.path.join(save, "log.jsonl"))
    with open(os.path.join(save, "command.txt"), "w", encoding="utf-8") as f:
        f.write("python tiny.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "\n")
    with torch.no_grad():  # pretrain() left the model in eval mode
        results = run_checks(model, processor, args.check_n, args.seed)
    results["wall_s"] = time.perf_counter() - t0
    rollout.write_json_atomic(os.path.join(save, "checks.json"), results, indent=1)
    print(f"base saved to {save} ({results['wall_s']:.0f} s): {json.dumps(results)}")
    return results


if __name__ == "__main__":
    rollout.cli(main)
