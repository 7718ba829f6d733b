"""
The policy side of AdaReasoner: model loading (the tiny default or a Qwen2.5-VL directory),
the protocol's prompts, encoding of conversations into tokens, and the hand-written multi-turn
rollout engine with a KV cache that lives across turns.

Everything here works the same on the tiny default and on a real Qwen2.5-VL checkpoint. The training
stages share its checkpoint and schedule helpers (save_policy, save_checkpoint, load_checkpoint, lr_at).
"""
import copy
import ctypes
import functools
import gc
import inspect
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
import types
import weakref
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

from tasks import InputError, extract_answer, image_digest, is_format_valid, score
from tools import (TOOLS, ToolResult, call_tool, observation, official_call, official_observation, official_schemas,
                   schemas)

# -----------------------------------------------------------------------------
# the processor (tokenizer and image processor) and the device

# Qwen's special tokens: chat structure and image placeholders
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


@dataclass
class Processor:
    """Tokenizer plus image processor: everything the engine needs to turn messages into model inputs."""
    tokenizer: object
    image_processor: object

    def __post_init__(self):
        ids = self.tokenizer.convert_tokens_to_ids
        self.im_start, self.im_end = ids("<|im_start|>"), ids("<|im_end|>")
        self.vision_start, self.vision_end, self.image_pad = (
            ids("<|vision_start|>"), ids("<|vision_end|>"), ids("<|image_pad|>"))
        # pads only fill masked positions (attention 0 or loss mask 0), so any id does; a tokenizer may define none
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else ids("<|endoftext|>")
        self.merge = self.image_processor.merge_size  # patches per side merged into one LLM token (2 in Qwen2.5-VL)
        # tokens a policy never writes: image placeholders and chat structure (only <|im_end|> closes a turn)
        self.never_sampled = [ids(t) for t in SPECIAL_TOKENS if t != "<|im_end|>"]

    def encode_text(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def encode_image(self, image):
        """-> (pixel_values [patches, dim], grid_thw [3]) for one PIL image."""
        out = self.image_processor(images=[image.convert("RGB")], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"][0]

    def save_pretrained(self, out_dir):
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)

    @classmethod
    def from_pretrained(cls, path):
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        # the PIL image processor needs no torchvision; it reads the same preprocessor_config.json
        return cls(AutoTokenizer.from_pretrained(path), Qwen2VLImageProcessorPil.from_pretrained(path))


def resolve_device(device="auto"):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return device


# -----------------------------------------------------------------------------
# several processes (torchrun): data parallel over torch.distributed. A plain `python stage.py` is world size 1 and
# none of this does anything.


def is_cuda(device):
    """'cuda' or a torchrun rank's 'cuda:N'."""
    return torch.device(device).type == "cuda"


def dist_setup(device, fsdp=False):
    """Under torchrun (WORLD_SIZE > 1) join the process group, nccl on CUDA and gloo on a CPU, and take this rank's
    GPU -> (rank, world size, device). Without torchrun -> (0, 1, device); with `fsdp` that is an error, said before
    any work starts."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp and world == 1:
        raise InputError("--fsdp shards over torchrun's processes: run the stage under torchrun --nproc_per_node N")
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return dist.get_rank(), world, device


def rank_and_world():
    """(this process's rank, the world size); (0, 1) without torchrun."""
    import torch.distributed as dist
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def world_size():
    return rank_and_world()[1]


def all_sum(values):
    """Sum a list of numbers over the ranks (itself at world size 1) -> list of floats."""
    import torch.distributed as dist
    if world_size() == 1:
        return [float(v) for v in values]
    on = "cuda" if dist.get_backend() == "nccl" else "cpu"  # gloo reduces CPU tensors; nccl GPU ones
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=on)  # float64: token counts stay exact
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_grads(params):
    """Sum every parameter's gradient over the ranks, after the step's backward passes. Not DDP's hooks: ranks may
    hold different numbers of sequences in a step (or none, at an epoch's end) and only some of them images, so a
    rank may run fewer backward passes or leave the vision tower unused, which DDP does not allow. The losses are
    divided by the step's global token count, so the sum is the gradient of one token-mean loss over the global
    batch, whatever the number of ranks. Under --fsdp only the replicated parameters (the vision tower) are summed
    here: FSDP's backward has already summed the shards' gradients."""
    import torch.distributed as dist
    if world_size() == 1:
        return
    params = [p for p in params if not is_dtensor(p)]
    # a parameter no backward reached (the vision tower on a text-only rank) joins the sum as zeros: every rank must
    # reduce the same tensors in the same buckets, or the collectives mismatch and hang
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for i, p in enumerate(params):  # buckets of about 2**25 values: few collectives, a bounded extra copy
        bucket, size = bucket + [p], size + p.numel()
        if size >= 2**25 or i == len(params) - 1:
            flat = torch.cat([q.grad.reshape(-1) for q in bucket])
            dist.all_reduce(flat)
            for q, g in zip(bucket, flat.split([q.numel() for q in bucket])):
                q.grad.copy_(g.view_as(q))
            bucket, size = [], 0


def all_gather(obj):
    """Every rank's picklable object, in rank order (a one-item list at world size 1)."""
    import torch.distributed as dist
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    import torch.distributed as dist
    if world_size() > 1:
        dist.barrier()


# --fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) shards the language model over the ranks. Training passes then
# run in lockstep (each all-gathers a layer's shards and reduce-scatters its gradients with every other rank), while
# rollouts and evaluations, whose ranks run different numbers of decode steps, run on the whole parameters
# (`unsharded`). A model without FSDP passes through every helper below unchanged.


def add_fsdp_flag(parser):
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard the language model's parameters, gradients and optimizer state "
                             "over the ranks (FSDP2, one unit per decoder layer), for a model whose training state "
                             "does not fit one GPU; the vision tower stays replicated")


def is_dtensor(t):
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def fsdp_units(model):
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard(model):
    """Shard `model` in place with FSDP2: each decoder layer is a unit, the embeddings, final norm and LM head are
    the root's. The vision tower is left out (ignored_params): it stays whole on every rank and all_reduce_grads
    sums its gradients, because a rank whose micro-batch holds no image skips it, and a sharded tower would keep the
    other ranks waiting (it is 0.67B of Qwen2.5-VL-7B's 8.3B parameters; TC freezes it by default for a model
    directory, TG trains it)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for layer in model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model, ignored_params=set(model.model.visual.parameters()))
    # masked_logits runs model.model and model.lm_head rather than model.forward: FSDP must gather the root's
    # embeddings and head around that call too
    model.masked_head = types.MethodType(masked_head, model)
    register_fsdp_forward_method(model, "masked_head")
    for unit in fsdp_units(model):
        # summed, not averaged, over the ranks: the losses are already divided by the global token count
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied one
    return model


def idle_pass(model):
    """A forward and backward that adds nothing to any gradient, for a rank that holds no sequence at this point of
    a step: under FSDP every rank must run the same passes, or the others wait for its all-gathers forever."""
    if not fsdp_units(model):
        return
    ids = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
    (model(input_ids=ids).logits.sum() * 0).backward()


def lockstep_passes(model, n):
    """How many more idle passes this rank owes so that every rank runs as many training passes as the rank with
    the most: max over the ranks minus n (0 without FSDP)."""
    return max(all_gather(n)) - n if fsdp_units(model) else 0


@contextmanager
def unsharded(model):
    """Whole parameters on every rank for the block (rollouts, evaluation: ranks run different numbers of forward
    passes there, so they must not all-gather per pass); sharded again after it."""
    units = fsdp_units(model)
    for unit in units:  # one all-gather per unit, in the same order on every rank
        unit.unshard()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for unit in units:
            unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()


def gathered_state(model, optimizer=None):
    """Under FSDP: (model state dict, optimizer state dict), whole, gathered from the shards onto rank 0's CPU (the
    other ranks get empty dicts); a collective every rank must call. Without FSDP: (None, None), meaning the live
    ones (model.state_dict(), optimizer.state_dict())."""
    if not fsdp_units(model):
        return None, None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # a tied parameter (the LM head of a tied model): written once, as save_pretrained does
            weights.pop(name, None)
        seen.add(id(p))
    return weights, None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=options)


def clip_grads(params, max_norm):
    """torch.nn.utils.clip_grad_norm_ -> the total norm (a float), also over FSDP's sharded gradients beside the
    replicated ones, which torch's cannot mix: the shards' squares are summed over the ranks, the replicated
    gradients (the same on every rank after all_reduce_grads) are counted once."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not any(is_dtensor(g) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    sharded = sum(float(g.to_local().double().pow(2).sum()) for g in grads if is_dtensor(g))
    replicated = sum(float(g.double().pow(2).sum()) for g in grads if not is_dtensor(g))
    total = (all_sum([sharded])[0] + replicated) ** 0.5
    scale = min(1.0, max_norm / (total + 1e-6))  # torch's clip coefficient, clamped at 1
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return total

# -----------------------------------------------------------------------------
# the command line, and loading and saving a policy: the tiny default (tiny.py) or a Qwen2.5-VL directory


BUILTIN_MODELS = ("tiny", "scratch")  # names load_policy knows besides a directory


def keep_freed_memory():
    """Make glibc's malloc keep the memory a step frees, for the next step to reuse. By default it mmaps blocks
    above a threshold (128 KiB at first, raised as large blocks are freed) and unmaps them when freed, and trims the
    heap's top as soon as 128 KiB lie free there, so a training step maps and zeroes much of its activation memory
    again, page by page. With the mmap threshold at its largest (32 MiB), automatic trim only above 1 GiB free and
    the heap grown 256 MiB at a time, freed blocks stay mapped for the next step. Measured on the bench's SFT step
    (2-core CPU): 1.35 -> 1.12 s; TC's loop 1.10x. release_memory's explicit trim still returns memory between
    phases. Returns False where glibc is not the allocator (the settings then do nothing)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt's parameter numbers (malloc.h): M_TRIM_THRESHOLD -1, M_TOP_PAD -2, M_MMAP_THRESHOLD -3; 1 = accepted
    settings = {-3: 32 * 2**20, -1: 2**30, -2: 256 * 2**20}  # mmap only above 32 MiB; trim above 1 GiB; grow by 256 MiB
    return all(libc.mallopt(param, value) == 1 for param, value in settings.items())


def cli(main):
    """Run a stage's main() from the command line: bad input (InputError: a data file, a model directory, a
    checkpoint) ends in one line naming the file and exit status 2, like a bad flag; nothing else is caught.
    The allocator keeps freed memory first (keep_freed_memory)."""
    keep_freed_memory()
    try:
        main()
    except InputError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_flags(parser, argv, quick):
    """parser.parse_args(argv); with --quick the `quick` values replace the defaults, so flags given explicitly
    still win (every stage's --quick works this way)."""
    args = parser.parse_args(argv)
    if args.quick:
        parser = copy.deepcopy(parser)
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


def add_device_flag(parser, what="the model runs"):
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help=f"where {what}: auto picks cuda when it is available")


def add_protocol_flag(parser):
    parser.add_argument("--protocol", default=None, choices=["ours", "official"],
                        help="how prompts, tool calls and observations are written: ours, or official (the authors' "
                             "release, for their checkpoints); default: what the model directory's protocol.json "
                             "says, else ours")


def add_grad_checkpointing_flag(parser):
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute each layer's activations in the backward pass instead of keeping them: "
                             "less memory for long sequences and large models, about a third more compute")


def checkpoint_activations(model):
    """--grad-checkpointing, under the name the installed transformers gives it (5.25 warns that the old name goes
    in v6)."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


# a trajectory's limits, the same defaults in every stage (TC's evaluation, TG's rollouts and evaluation, evaluate.py):
# an AStar call on an 8x8 grid with many holes takes ~340 tokens with the tiny tokenizer, and a real trajectory
# stays under 2000 (the total only bounds the cost of a model that loops)
LIMITS = {"max_turns": 8, "max_new_tokens": 384, "max_total_tokens": 3072, "tool_timeout": 5.0}


def add_limit_flags(parser, prefix=""):
    """--{prefix}max-turns, --{prefix}max-new-tokens, --{prefix}max-total-tokens, --{prefix}tool-timeout."""
    helps = {"max_turns": "assistant turns per trajectory", "max_new_tokens": "tokens per assistant turn",
             "max_total_tokens": "tokens per trajectory, prompt included",
             "tool_timeout": "seconds a tool call may run"}
    for key, default in LIMITS.items():
        parser.add_argument(f"--{prefix}{key.replace('_', '-')}", type=type(default), default=default,
                            help=f"{helps[key]} (default %(default)s)")


def limits_of(args, prefix=""):
    """The limit flags' values as rollout() keywords: {max_turns, max_new_tokens, max_total_tokens, tool_timeout}."""
    return {key: getattr(args, prefix.replace("-", "_") + key) for key in LIMITS}


def reason(e):
    """An exception as a short clause for a one-line error: its type and first sentence."""
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text.split('. ')[0][:200]}"


def read_json(path):
    """A JSON file's content, the file closed at once (not whenever the garbage collector gets to it)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def model_exists(path):
    return path in BUILTIN_MODELS or os.path.isdir(path)


def load_policy(path="tiny", device="auto", dtype=None):
    """-> (model, processor). "tiny": the shipped pretrained base (tiny.py); "scratch": the same model randomly
    initialised (an ablation); otherwise a local save_pretrained directory. Nothing is downloaded."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    import tiny  # tiny.py imports this module, so it is imported here rather than at the top
    device = resolve_device(device)
    # the training stages pass float32 and autocast
    dtype = dtype or (torch.bfloat16 if is_cuda(device) else torch.float32)
    if path == "scratch":
        model, processor = tiny.build_scratch()
        return model.to(device, dtype).eval(), processor
    path = tiny.BASE_DIR if path == "tiny" else path
    if not model_exists(path):
        raise InputError(f"model directory {path!r} does not exist (pass 'tiny', 'scratch' or a local "
                         "save_pretrained directory; nothing is downloaded)")
    try:  # a broken file is the user's to fix: name it, in one line, instead of a traceback from deep inside
        read_json(os.path.join(path, "config.json"))
    except (OSError, ValueError) as e:
        raise InputError(f"{os.path.join(path, 'config.json')}: unreadable model config ({e})") from None
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except Exception as e:
        raise InputError(f"{path}: cannot load the model weights ({reason(e)})") from None
    try:
        processor = Processor.from_pretrained(path)
    except Exception as e:
        raise InputError(f"{path}: cannot load the tokenizer or image processor ({reason(e)})") from None
    rows = model.get_input_embeddings().num_embeddings
    if len(processor.tokenizer) > rows:  # ids past the embedding table would fail deep inside the first forward
        raise InputError(f"{path}: the tokenizer has {len(processor.tokenizer)} tokens but the model's embedding table "
                         f"{rows} rows; the tokenizer does not belong to this model")
    return model.to(device).eval(), processor


def save_policy(model, processor, out_dir, protocol="ours"):
    """Write a Hugging Face model directory atomically: a half-written directory never has the final name. A policy
    trained under another protocol than ours declares it (PROTOCOL_FILE), so later stages read it the same way.
    Every rank calls it (under --fsdp the weights are gathered from every rank's shards); rank 0 writes."""
    weights, _ = gathered_state(model)  # None without FSDP: save_pretrained reads the model's own
    if rank_and_world()[0] > 0:
        return None
    out_dir = os.path.abspath(out_dir)
    tmp = out_dir + ".tmp"  # beside the target: the final rename stays on one filesystem
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=weights)
    processor.save_pretrained(tmp)
    if protocol != "ours":
        with open(os.path.join(tmp, PROTOCOL_FILE), "w", encoding="utf-8") as f:
            json.dump({"protocol": protocol}, f)
    replace_dir(tmp, out_dir)
    return out_dir


def replace_dir(tmp, final):
    """Move a finished directory into place; the old one (if any) is removed only after the new one is there. A
    kill between the two renames leaves FINAL.old and FINAL.tmp, both complete; find_checkpoint looks there too."""
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------
# the protocol (DESIGN section 3)

RULES = ("""# How to answer
Think step by step inside <think>...</think>. Then write EITHER exactly one tool call
<tool_call>{"name": "TOOL_NAME", "parameters": {...}}</tool_call>
OR your final answer
<response>... \\boxed{ANSWER}</response>
"""  # the last line is one line of the prompt, written in three pieces here
         "Images are named img_1, img_2, ... in the order they appear, the question's images first; every image a "
         "tool returns gets the next name. Coordinates are absolute pixels of the named image, origin at the "
         "top-left corner. After a tool call, wait for its result before you continue.")

RULES_NO_TOOLS = """# How to answer
Think step by step inside <think>...</think>, then give your final answer as
<response>... \\boxed{ANSWER}</response>"""


def system_prompt(tool_schemas):
    """The tool list (one JSON schema per line) followed by the rules; no tools gives the direct-answer prompt."""
    head = "You are a visual reasoning assistant."
    if not tool_schemas:
        return f"{head}\n\n{RULES_NO_TOOLS}"
    lines = "\n".join(json.dumps(s, ensure_ascii=False) for s in tool_schemas)
    return f"{head} You can call these tools:\n<tools>\n{lines}\n</tools>\n\n{RULES}"


# The authors' release (github.com/ssmisya/AdaReasoner, tool_server/utils/prompts.py): the prompt its checkpoints
# were trained with, whitespace included; {tool_list} is one tool schema per line as a Python dict repr.
OFFICIAL_PROMPT = (
    "\nYou are a visual assistant capable of solving visual reasoning problems. You can rely on your own capabilities "
    "or use external tools to assist in solving. \n\nAvailable Tools  \nIn your response, you can use the following "
    "tools:  \n{tool_list}\n\nSteps for Each Turn\n1. **Think:** First, silently analyze the user's request to "
    "understand the goal. This thinking process should be enclosed in <think> and </think> tags.\n2. **Decide "
    "Action:** Based on your thinking, decide on one of the following two actions:\n   - **If you need to use a "
    "tool:** Generate your tool call, enclosed between <tool_call> and </tool_call> tags. **Do not** generate a "
    "`<response>` in this turn.\n   - **If you have enough information to answer:** Generate your final, "
    "user-facing answer, enclosed between <response> and </response> tags. **Do not** generate a `<tool_call>` in "
    "this turn.\n\nOutput Format:\nYour output must always begin with your thought process. After the `<think>` "
    "block, you must provide **either** a `<tool_call>` or a `<response>`, but **never both** in the same turn.\n"
    "**Case 1: Tool Use is Required**\n<think> Your thoughts and reasoning </think>  \n<tool_call>  \n"
    '{"name": "Tool name", "parameters": {"Parameter name": "Parameter content", "...": "..."}}\n</tool_call>  \n'
    "**Case 2: Ready to Respond to the User**\n<think> Your thoughts and reasoning </think>  \n<response> Your final "
    "response </response>\n\nImportant Notes  \n1. You must always include the <think> field to outline your "
    "reasoning. Provide one of <tool_call> or <response>. You must not include both <tool_call> and <response> in "
    "the same turn because they are mutually exclusive. If tool usage is required, you must instead include both "
    "<think> and <tool_call>, and omit <response> for that turn. If no further tool usage is required and ready to "
    "answer the user's question, you can then use <think> to summarize your reasoning and include <response> with "
    "your final answer, and this indicates the ends of the conversation.\n\n2. You can only invoke a single tool "
    "call at a time in the <tool_call> fields. The tool call should be a JSON object with a \"name\" field and a "
    "\"parameters\" field containing a dictionary of parameters. If no parameters are needed, leave the "
    "\"parameters\" field an empty dictionary. All images have their coordinate origin at the top-left corner.\n\n"
    "3. Some tools require image input. You do not need to generate or upload the actual image data simply refer to "
    "an image using a placeholder in the form of \"img_n\". There may be multiple images present in the dialogue. "
    "Besides the original image, additional images may appear as a result of prior tool calls (e.g., edited images "
    "returned by visual editing tools). You are free to select which image to use as input for the next tool.\n"
    "The index \"n\" in \"img_n\" refers to the image's position in the dialogue history:\n- The original image is "
    "always referred to as \"img_1\".\n- Each subsequent image, including those returned from tools, is assigned "
    "\"img_2\", \"img_3\", and so on, in the order they appear in the dialogue.\nFor example:{{\"parameters\": "
    "{{\"image\": \"img_1\", \"other_params\": \"other_values\"}}}}\n\n4. All image coordinates used must be in "
    "absolute pixel values, not relative or normalized coordinates. \n\n5. At the end, provide your final answer by "
    "placing it inside \\boxed{}, and wrap the entire final output inside <response></response> tags.\n")
OFFICIAL_PROMPT_NO_TOOLS = ("You are a visual assistant capable of solving visual reasoning problems. Provide your "
                            "final answer by placing it inside \\boxed{}")


def official_system_prompt(tool_schemas):
    """The official system prompt: the tool list as Python dict reprs, one per line, inside its rules."""
    if not tool_schemas:
        return OFFICIAL_PROMPT_NO_TOOLS
    return OFFICIAL_PROMPT.replace("{tool_list}", "\n".join(str(s) for s in tool_schemas))


@dataclass(frozen=True)
class Protocol:
    """How a conversation is written, apart from the tools' computation: the schemas and system prompt the model
    reads, how its calls run and how their results read back, and what follows a turn with neither a call nor an
    answer. `ours` is this project's; `official` that of the authors' release, for their checkpoints."""
    name: str
    schemas: object        # canonical tool names -> the schemas the prompt lists
    system_prompt: object  # schemas -> the system message
    call: object           # (name, params, images, timeout) -> ToolResult
    observe: object        # (tool name, ToolResult, name of the returned image or None) -> observation text
    nudge: str = None      # the user turn after a turn with no call and no answer; None: the trajectory ends


OURS = Protocol("ours", schemas, system_prompt, call_tool, observation)
OFFICIAL = Protocol("official", official_schemas, official_system_prompt, official_call, official_observation,
                    nudge="\n Please continue with your response or call a tool.\n")
PROTOCOLS = {p.name: p for p in (OURS, OFFICIAL)}
PROTOCOL_FILE = "protocol.json"  # beside a checkpoint's config.json: {"protocol": "official"}


def protocol_of(flag, model):
    """--protocol: the flag when given, else what the model directory declares (PROTOCOL_FILE), else ours."""
    if flag:
        return PROTOCOLS[flag]
    path = os.path.join(str(model), PROTOCOL_FILE)
    if os.path.isfile(path):
        try:
            name = read_json(path)["protocol"]
            return PROTOCOLS[name]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}: expected {{\"protocol\": \"ours\" | \"official\"}} ({reason(e)})") from None
    return OURS


def user_message(example):
    """The question's user turn: its images first (PIL objects, or their img_k names in a saved trajectory), then
    the question."""
    return {"role": "user", "content": [{"type": "image", "image": img} for img in example["images"]]
            + [{"type": "text", "text": example["question"]}]}


def build_messages(example, tool_schemas, system_prompt=system_prompt):
    """System and user messages for one example; images stay PIL objects in the content parts."""
    return [{"role": "system", "content": system_prompt(tool_schemas)}, user_message(example)]


def observation_message(text, image=None):
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image", "image": image})
    return {"role": "user", "content": content}


def render(message):
    """One message in the chat template, as (text or image) segments; images become a placeholder."""
    parts = [f"<|im_start|>{message['role']}\n"]  # Qwen's chat template
    content = message["content"]
    if isinstance(content, str):
        parts.append(content)
    else:
        for c in content:
            parts.append(c["image"] if c["type"] == "image" else c["text"])  # an image stays a segment of its own
    parts.append("<|im_end|>\n")
    return parts


def encode(processor, parts):
    """Text and images -> (token ids, list of (pixel_values, grid_thw)); images expand to their pad tokens.
    Text is tokenized piecewise: every boundary is a special token, so pieces tokenize as the whole would."""
    ids, images, text = [], [], ""
    for p in parts:
        if isinstance(p, str):
            text += p
            continue
        ids += processor.encode_text(text) if text else []
        text = ""
        pixels, grid = encode_image_cached(processor, p)
        # one <|image_pad|> per merged patch (t*h*w patches / merge**2), framed by vision_start and vision_end
        ids += ([processor.vision_start] + [processor.image_pad] * (int(grid.prod()) // processor.merge ** 2)
                + [processor.vision_end])
        images.append((pixels, grid))  # token order: the model fills the pads in this order
    ids += processor.encode_text(text) if text else []
    return ids, images


ENCODED_BUDGET = 256 * 2**20  # bytes of pixel tensors kept for reuse


class EncodedImages:
    """Pixel tensors of the images still alive, keyed by their content, at most `budget` bytes (least recently used
    first out). Identical images share one tensor: the rows of a GRPO group that make the same tool call get equal
    images, and TC decodes a fresh copy of an image at every use, so the image processor runs once per distinct
    image, and pixel_inputs sees which images are one (the same tensor) and runs the vision tower once for them.
    An encoding leaves when no image with its content is alive: the cache holds what can still hit, not up to its
    budget of dead pixels (every encoding of a whole TC run would be 1.2 MB of float32 per 224x224 image, 3.8 GB
    for the default data)."""

    def __init__(self, budget):
        self.budget = budget
        self.clear()

    def clear(self):
        """Drop every kept encoding (a stage that moves on from training to evaluation needs none of them)."""
        self.used = 0
        self.items = OrderedDict()  # content key -> [processor, pixels, grid, weakrefs of the images that have it]
        self.keys = {}  # id(image) -> (weakref, content key): an image seen before is not hashed again

    def __call__(self, processor, image):
        seen = self.keys.get(id(image))
        if seen is not None and seen[0]() is image:  # the weakref catches an id reused by a new image
            key = seen[1]
        else:
            key = image_digest(image)  # sha256 of mode, size and pixels: 0.3 ms for 224x224 RGB, 5 ms for 1024x1024
            self.keys[id(image)] = (weakref.ref(image), key)
        hit = self.items.get(key)
        if hit is None or hit[0] is not processor:
            if hit is not None:  # another processor encodes differently
                self.used -= self.items.pop(key)[1].nbytes
            self.drop_dead()
            pixels, grid = processor.encode_image(image)
            hit = self.items[key] = [processor, pixels, grid, []]
            self.used += pixels.nbytes
        self.items.move_to_end(key)
        if not any(r() is image for r in hit[3]):  # this image keeps the encoding alive too; dead ones no longer
            hit[3] = [r for r in hit[3] if r() is not None] + [weakref.ref(image)]
        while self.used > self.budget and len(self.items) > 1:  # oldest first; the newest always stays
            self.used -= self.items.popitem(last=False)[1][1].nbytes
        return hit[1], hit[2]

    def drop_dead(self):
        """Encodings whose images are all gone leave first, and so do the ids of dead images."""
        for key in [k for k, v in self.items.items() if not any(r() is not None for r in v[3])]:
            self.used -= self.items.pop(key)[1].nbytes
        self.keys = {i: v for i, v in self.keys.items() if v[0]() is not None}


encode_image_cached = EncodedImages(ENCODED_BUDGET)


def peak_rss_mib():
    """The process's peak resident memory so far, in MiB (ru_maxrss is in KiB on Linux), for the training logs."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def release_memory():
    """Drop every kept encoding and give freed heap memory back to the operating system, between two phases of a
    stage. glibc keeps what a phase freed (training's activations, its images) mapped in its arenas, so without the
    trim the next phase's peak adds to the last one's (the default TC's peak: 2.90 GiB before, 2.34 GiB after)."""
    encode_image_cached.clear()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc only; elsewhere the freed memory stays with the process
    except (OSError, AttributeError):
        pass


def encode_conversation(processor, messages):
    """A whole conversation for training -> (ids, loss_mask, images). Loss on each assistant turn's content and
    its closing <|im_end|>, never on the role header or the newline after it (the engine samples the same)."""
    ids, mask, images = [], [], []
    for m in messages:
        parts = render(m)
        if m["role"] == "assistant":
            # the header apart: the engine's prompt ends with it, so the model samples only what follows
            head, body = processor.encode_text(parts[0]), processor.encode_text("".join(parts[1:-1]))
            tail = [processor.im_end] + processor.encode_text("\n")
            ids += head + body + tail
            # mask: 0 on the header, 1 on the body and <|im_end|> (the model must learn to stop), 0 on the newline
            mask += [0] * len(head) + [1] * (len(body) + 1) + [0] * (len(tail) - 1)
        else:
            # system, user and observation messages: context, never loss
            chunk, imgs = encode(processor, parts)
            ids += chunk
            mask += [0] * len(chunk)
            images += imgs
    return ids, mask, images


def mrope_positions(ids, grids, processor, start=0):
    """3-D M-RoPE position ids (3, L) for a token chunk that starts at text position `start`, and the next
    position. Text advances all three axes by one; an image's tokens take (t, row, col) offsets from the
    position where it starts, and the text after it resumes past its larger side (as get_rope_index does)."""
    pos, grids, i, L = [], iter(grids), 0, len(ids)
    while i < L:
        if ids[i] == processor.image_pad:  # an image's pads are contiguous: t*h*w of them
            t, h, w = (int(v) for v in next(grids))
            h, w = h // processor.merge, w // processor.merge  # the LLM's grid: merged patches per side
            # all its tokens share temporal position `start` (t=1 for a still image); rows and columns count from it
            tt = torch.full((t, h, w), start).flatten()
            hh = (start + torch.arange(h)).view(1, h, 1).expand(t, h, w).flatten()
            ww = (start + torch.arange(w)).view(1, 1, w).expand(t, h, w).flatten()
            pos.append(torch.stack([tt, hh, ww]))  # [3, t*h*w]
            i += t * h * w
            start += max(h, w)  # = its largest position + 1, where get_rope_index resumes
        else:
            j = i
            while j < L and ids[j] != processor.image_pad:
                j += 1
            # a text run: the same position on all three axes, [3, j - i]
            pos.append((start + torch.arange(j - i)).view(1, -1).expand(3, -1))
            start += j - i
            i = j
    # [3, L], and the position the next chunk starts at (not L: images advance it by their grid side)
    return (torch.cat(pos, dim=1) if pos else torch.zeros(3, 0, dtype=torch.long)), start


# -----------------------------------------------------------------------------
# batched forward passes


class GrowingLayer(DynamicLayer):
    """One layer's KV cache in preallocated buffers. Hugging Face's DynamicLayer copies its whole cache on every
    token (torch.cat); here a token costs one slice write and the buffer doubles when full, so decoding L tokens
    copies O(L) memory instead of O(L^2). Rows can be repeated (a GRPO group shares its prompt's prefill) and
    dropped (finished rows leave the batch)."""
    window = None  # (a, b, start) while rows a:b prefill one group of chunks (prefill_in_groups)

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.length = 0  # tokens cached; the capacity is kbuf.shape[-2]
        self.kbuf = self.vbuf = None  # [B, heads, capacity, head_dim]

    def update(self, key_states, value_states, *args, **kwargs):
        # transformers' call: every row appends its tokens, or the rows of one prefill group write theirs
        if self.window is not None:
            return self.write_window(key_states, value_states)
        return self.append(key_states, value_states)

    def append(self, key_states, value_states):
        """Append keys and values [A, kv_heads, n, head_dim] to the first A rows -> all that the A rows cache
        [A, kv_heads, length, head_dim]. The rows after them (in decode, rows waiting on a tool) get zeros in those
        slots, which their mask hides: uninitialised memory could hold a NaN, which even a weight of 0 spreads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        A, end = key_states.shape[0], self.length + key_states.shape[-2]
        self.reserve(end, key_states, value_states)
        # the new tokens go into spare capacity in place: what is cached is not copied
        self.kbuf[:A, :, self.length:end], self.vbuf[:A, :, self.length:end] = key_states, value_states
        if A < self.kbuf.shape[0]:
            self.kbuf[A:, :, self.length:end], self.vbuf[A:, :, self.length:end] = 0, 0
        self.length = end
        self.keys, self.values = self.kbuf[:, :, :end], self.vbuf[:, :, :end]  # views: no copy
        return self.keys[:A], self.values[:A]

    def reserve(self, end, key_states, value_states):
        """Room for `end` slots per row; key_states and value_states give a new buffer's shape and dtype."""
        if self.kbuf is None or end > self.kbuf.shape[-2]:  # full: double the capacity, copy what is there
            # doubling (at least 256 slots): O(log L) reallocations, O(L) copied values over a rollout
            rows = key_states.shape[0] if self.kbuf is None else self.kbuf.shape[0]
            shape = (rows, key_states.shape[1], max(2 * end, 256), key_states.shape[-1])
            kbuf, vbuf = key_states.new_empty(shape), value_states.new_empty(shape)
            if self.length:
                kbuf[:, :, :self.length], vbuf[:, :, :self.length] = self.keys, self.values
            self.kbuf, self.vbuf = kbuf, vbuf

    def write_window(self, key_states, value_states):
        """Rows a:b write a group's chunks [b - a, kv_heads, m, head_dim] into the last m of the slots the whole
        prefill appends (slots length..start are the group's padding: zeros, masked) -> all rows a:b cache
        [b - a, kv_heads, start + m, head_dim]. The length advances once every group has written (finish_window)."""
        a, b, start = self.window
        end = start + key_states.shape[-2]
        self.reserve(end, key_states, value_states)
        self.kbuf[a:b, :, self.length:start], self.vbuf[a:b, :, self.length:start] = 0, 0
        self.kbuf[a:b, :, start:end], self.vbuf[a:b, :, start:end] = key_states, value_states
        return self.kbuf[a:b, :, :end], self.vbuf[a:b, :, :end]

    def finish_window(self, end):
        self.window, self.length = None, end
        self.keys, self.values = self.kbuf[:, :, :end], self.vbuf[:, :, :end]

    def get_seq_length(self):
        # not the capacity: HF sizes the mask with it; in a prefill group, the slots before the group's chunks
        if self.window is not None:
            return self.window[2]
        return self.length if self.is_initialized else 0

    def batch_repeat_interleave(self, repeats):
        # row b becomes rows b*G .. b*G+G-1, example-major like rollout's rows
        self.kbuf, self.vbuf = self.kbuf.repeat_interleave(repeats, 0), self.vbuf.repeat_interleave(repeats, 0)
        self.keys, self.values = self.kbuf[:, :, :self.length], self.vbuf[:, :, :self.length]

    def batch_select_indices(self, indices):
        if len(indices) == self.kbuf.shape[0]:  # the same rows reordered: only the rows that change place move
            moved = (indices != torch.arange(len(indices), device=indices.device)).nonzero().squeeze(1)
            n, src = self.length, indices[moved]  # and only their cached slots: the spare capacity holds nothing yet
            self.kbuf[moved, :, :n] = self.kbuf[src, :, :n]
            self.vbuf[moved, :, :n] = self.vbuf[src, :, :n]
        else:  # rows finished: indexing copies the buffers, spare capacity included
            self.kbuf, self.vbuf = self.kbuf[indices], self.vbuf[indices]
        self.keys, self.values = self.kbuf[:, :, :self.length], self.vbuf[:, :, :self.length]


def kv_cache(model):
    """A Hugging Face cache made of GrowingLayers, one per decoder layer."""
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


def shown_images(traj, processor):
    """The trajectory's images that its tokens hold, in order: an image a tool made after max_total_tokens ran out
    is in traj.images but not in the sequence."""
    return traj.images[:traj.token_ids.count(processor.vision_start)]


def pad_batch(seqs, pad_value, left):
    n = max(len(s) for s in seqs)
    # left (prefill): every row's last real token lands in the last column, the only logits read; right (training):
    # positions line up with the tokens from 0
    return [([pad_value] * (n - len(s)) + s) if left else (s + [pad_value] * (n - len(s))) for s in seqs]


def pixel_inputs(model, images, device):
    """The model's image arguments for a list of (pixel_values, grid_thw) in token order; {} without images.
    The vision tower runs once per distinct image: encode_image_cached gives identical images one tensor, and the
    rows of a GRPO group often hold the same image (a tool call made by several of them, the prompt's image in the
    update's micro-batches), so each repeat reuses the first one's features instead of running the tower again."""
    if not images:
        return {}
    first, distinct = {}, []  # id(pixels) -> its index in distinct; the distinct images, in token order
    for p, g in images:
        if id(p) not in first:
            first[id(p)] = len(distinct)
            distinct.append((p, g))
    # pixel_values [patches of all distinct images, dim], split back into images by image_grid_thw [images, 3]
    pixel_values = torch.cat([p for p, _ in distinct]).to(device, model.dtype)
    grids = torch.stack([g for _, g in distinct]).to(device)
    if len(distinct) == len(images) or not takes_encoder_outputs(model):  # nothing to share: the model's own path
        return dict(pixel_values=pixel_values, image_grid_thw=grids)
    # the tower on the distinct images (its attention stays within each image), then every image's features in
    # token order: the model scatters them onto its <|image_pad|> tokens as it would its own
    out = model.model.get_image_features(pixel_values, grids, return_dict=True)
    features = out.pooler_output  # one [merged patches, hidden] tensor per distinct image
    out.pooler_output = tuple(features[first[id(p)]] for p, _ in images)
    return dict(mm_encoder_outputs={"image": out})


def takes_encoder_outputs(model):
    """Whether this transformers version's Qwen2.5-VL accepts precomputed vision features (mm_encoder_outputs)."""
    return "mm_encoder_outputs" in forward_params(type(model.model))


def cache_kwarg(model, cache):
    """The KV cache as this transformers version's forward takes it: `cache` where the argument has that name
    (5.25 takes both, warns about `past_key_values` and drops it in 5.40), `past_key_values` before the rename."""
    return {"cache" if "cache" in forward_params(type(model)) else "past_key_values": cache}


@functools.lru_cache(maxsize=None)
def forward_params(cls):
    """The argument names of a model class's forward, read once per class (they moved between 5.x releases)."""
    return frozenset(inspect.signature(cls.forward).parameters)


def forward_chunk(model, processor, chunks, cache, attn, device):
    """Prefill one token chunk per row into `cache`. Chunks are left-padded (pads masked out, positions from
    our own counters) so every row's last position is real and only its logits are needed.
    chunks: list of (ids, images, positions[3, n]). Returns (last logits [B, V], new attention mask)."""
    n = max(len(c[0]) for c in chunks)  # the longest chunk; shorter ones get left pads
    ids = torch.tensor(pad_batch([c[0] for c in chunks], processor.pad, left=True), device=device)
    # [3, B, n]: left pads at position 0 (masked), real tokens continue each row's own M-RoPE counter
    pos = torch.stack([F.pad(c[2], (n - c[2].shape[1], 0)) for c in chunks], dim=1).to(device)
    # [B, n]: 0 on the left pads
    new = torch.tensor(pad_batch([[1] * len(c[0]) for c in chunks], 0, left=True), device=device)
    # [B, cached + n]: the mask spans every cached slot, the pads of earlier chunks and decode steps included
    attn = new if attn is None else torch.cat([attn, new], dim=1)
    # logits_to_keep=1: the LM head runs on the last position only; the pixels of all rows go in batch order, the order
    # of their pad tokens in the flattened batch
    out = model(input_ids=ids, position_ids=pos, attention_mask=attn, use_cache=True, logits_to_keep=1,
                **cache_kwarg(model, cache), **pixel_inputs(model, [im for c in chunks for im in c[1]], device))
    return out.logits[:, -1].float(), attn  # [B, V] in float32 for sampling and log-probs


def length_groups(lengths, min_saving=256):
    """Rows sorted longest chunk first -> [(a, b)]: runs of rows prefilled together. A new run starts where a chunk is
    at most half the run's longest and the rows from there on would otherwise compute at least `min_saving` pad
    positions, so that no run computes more than twice its tokens and a short run is worth its own forward."""
    groups, a = [], 0
    for j, n in enumerate(lengths):
        if 2 * n <= lengths[a] and (len(lengths) - j) * (lengths[a] - n) >= min_saving:
            groups.append((a, j))
            a = j
    return groups + [(a, len(lengths))]


def prefill_in_groups(model, processor, chunks, cache, attn, device):
    """forward_chunk for the observations of a whole batch, whose lengths differ widely (a text error against an
    image's tokens): one forward per run of similar lengths (length_groups) instead of every row padded to the
    longest. chunks: sorted longest first, row k's chunk for row k of the cache. Each row still appends N slots, N
    the longest chunk, so that the columns stay aligned: a group whose longest chunk is m writes its chunks into the
    last m of them and zeros (masked) before. Measured on TG rollouts, the observations' prefills computed 2-2.6x
    their tokens in pads before (results/HISTORY.md). Returns (last logits [B, V], new attention mask)."""
    lengths = [len(c[0]) for c in chunks]
    groups = length_groups(lengths)
    if len(groups) == 1:
        return forward_chunk(model, processor, chunks, cache, attn, device)
    L, N = attn.shape[1], lengths[0]  # slots cached so far; slots every row appends
    logits, masks = [], []
    for a, b in groups:
        m = lengths[a]  # this group's longest chunk: it fills the last m of the N new slots
        for layer in cache.layers:
            layer.window = (a, b, L + N - m)
        skipped = torch.zeros(b - a, N - m, dtype=attn.dtype, device=device)  # slots this group leaves empty
        # the group's mask [b - a, L + N] comes back whole: its rows of the batch's new mask
        out, mask = forward_chunk(model, processor, chunks[a:b], cache, torch.cat([attn[a:b], skipped], dim=1), device)
        logits.append(out), masks.append(mask)
    for layer in cache.layers:
        layer.finish_window(L + N)
    return torch.cat(logits), torch.cat(masks)  # [B, V], [B, L + N]


# -----------------------------------------------------------------------------
# the rollout engine

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


@dataclass
class Trajectory:
    example_id: str
    task: str
    token_ids: list = field(default_factory=list)   # the whole sequence, prompt included
    loss_mask: list = field(default_factory=list)   # 1 exactly on tokens the model sampled
    logprobs: list = field(default_factory=list)    # sampling-time log-prob of each sampled token, else 0.0
    images: list = field(default_factory=list)      # PIL, in img_k order
    calls: list = field(default_factory=list)       # {name, params, status, error, seconds}
    messages: list = field(default_factory=list)    # protocol messages; images as {"type": "image", "image": "img_k"}
    answer: str = None
    format_valid: bool = False
    finish_reason: str = None
    example_index: int = 0  # of its example in the list rollout was given
    adl_mapping: dict = None  # Mapping.to_json() of the group's ADL names, else None

    @property
    def assistant_turns(self):
        return [m["content"] for m in self.messages if m["role"] == "assistant"]


@dataclass
class Row:
    """A live row of the batch: which trajectory it writes, where its positions are, what it waits for."""
    index: int  # of its trajectory in the returned list
    traj: Trajectory
    next_pos: int  # next M-RoPE text position; not len(token_ids): an image advances it by its grid side
    offered: list  # tool names as the prompt shows them
    mapping: object   # adl.Mapping under ADL (calls map back to canonical names), else None
    run: object       # executes the row's tool calls (call_tool, a protocol's or a Toolset's)
    protocol: object  # Protocol: how observations read and what follows a turn without an action
    rng: object       # random.Random: the row's own sampling stream
    turn: list = field(default_factory=list)  # tokens of the current assistant turn
    pending: object = None                    # the tool call it waits on: (call, parse error, future)


NUDGE = ("nudge", None, None)  # Row.pending of a row whose next observation is the protocol's nudge


def parse_tool_call(text):
    """-> (call dict or None, error message or None) for the first <tool_call> in an assistant turn: (None, None)
    for a turn without one, (None, why) for one that does not parse."""
    m = TOOL_CALL.search(text)
    if m is None:  # no call, or one opened and never closed (a malformed call the model should read about)
        return None, None if "<tool_call>" not in text else (
            'the tool call is not closed; write {"name": ..., "parameters": {...}} inside <tool_call></tool_call>')
    try:
        call = json.loads(m.group(1))
    except json.JSONDecodeError as e:
        return None, (f"the tool call is not valid JSON ({e.msg} at character {e.pos}); write "
                      '{"name": ..., "parameters": {...}} inside <tool_call></tool_call>')
    if isinstance(call, list) and call:  # an array of calls: the first runs (the authors' engine does the same)
        call = call[0]
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None, 'the tool call must be a JSON object with a string "name" and an object "parameters"'
    # 'arguments' is taken for 'parameters' (the OpenAI function-call key)
    return {"name": call["name"], "parameters": call.get("parameters", call.get("arguments", {}))}, None


def run_tool(call, images, timeout, offered, mapping, run=call_tool):
    """Run a parsed call, de-randomizing ADL names first -> (canonical name, ToolResult, seconds).
    Only the tools in the prompt can run: a tool left out (or its real name under ADL) is unknown.
    run: the function that executes a call (tools.call_tool; tiny.py's synthetic tools bring their own)."""
    t0 = time.perf_counter()
    if call["name"] not in offered:
        listed = ", ".join(f"'{n}'" for n in offered) or "none"
        return call["name"], ToolResult(status="error",
                                        error=f"unknown tool '{call['name']}'; available: {listed}"), 0.0
    canonical = mapping.to_canonical(call) if mapping is not None else call  # ADL: the model's names back to canonical
    result = run(canonical["name"], canonical["parameters"], images, timeout=timeout)
    return canonical["name"], result, time.perf_counter() - t0


MAX_ASPECT = 200  # the Qwen2-VL image processor (smart_resize) raises for an image more elongated than this


def add_observation(images, name, result, observe=observation):
    """A tool result joins a conversation: a returned image is appended to `images` and named img_k after its
    position, the name the model uses to pass it to the next tool -> (observation text, image name or None).
    observe: the protocol's rendering of a result (Protocol.observe)."""
    image_name = None
    if result.image is not None:
        images.append(result.image)
        image_name = f"img_{len(images)}"  # 1-based: the question's images come first
    return observe(name, result, image_name), image_name


def tool_observation(row):
    """Wait for the row's tool, record the call, and return the observation message (PIL image inside); a row
    waiting on the nudge (official protocol, a turn without action) gets the nudge instead, and no call is recorded."""
    t = row.traj
    if row.pending is NUDGE:  # a turn without call or answer, under a protocol that asks the model to go on
        row.pending = None
        t.messages.append(observation_message(row.protocol.nudge))
        return t.messages[-1]
    call, err, fut = row.pending  # as end_turn set it
    row.pending = None
    if fut is None:  # the call did not parse (call is None): the model reads why
        name, result, seconds, params = "tool_call", ToolResult(status="error", error=err), 0.0, None
    else:
        name, result, seconds = fut.result()  # blocks until the tool is done; call_tool never runs past its timeout
        params = call["parameters"]
    if result.image is not None and max(result.image.size) >= MAX_ASPECT * min(result.image.size):
        # Qwen2.5-VL's image processor refuses such an image; the model reads why instead of the run crashing
        w, h = result.image.size
        result = ToolResult(status="error", error=f"{name} returned a {w}x{h} image, too elongated to be shown (the "
                                                  f"longer side must be under {MAX_ASPECT} times the shorter); use a "
                                                  "less thin region")
    # params None marks a call that did not parse (grpo.call_quality scores it 0)
    t.calls.append({"name": name, "params": params, "status": result.status, "error": result.error, "seconds": seconds})
    text, image_name = add_observation(t.images, name, result, row.protocol.observe)
    if row.mapping is not None:  # ADL: the observation uses the row's names too
        text = row.mapping.observation(text)
    # the saved message names the image img_k; the returned one holds the PIL image, for encoding
    t.messages.append(observation_message(text, image_name))
    return observation_message(text, result.image)


def finish(t, reason):
    t.finish_reason = reason
    turns = t.assistant_turns
    t.answer = extract_answer(turns[-1]) if turns else None
    t.format_valid = reason == "response" and is_format_valid(turns)  # only an answered trajectory can be format-valid


def sample(logits, temperature, top_p, top_k, uniforms):
    """One token per row: greedy at temperature 0, else drawn by inverting the row's CDF at its own uniform number
    (uniforms: [B], from each row's own random stream, so what a row samples does not depend on the other rows of
    the batch: the same prompts give the same samples on one process or split over several)."""
    if temperature <= 0:
        return logits.argmax(-1)  # [B]; the uniforms go unused
    logits = logits / temperature  # [B, V]
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]; ties with the k-th stay in
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        p = torch.softmax(sorted_logits, dim=-1)
        drop = p.cumsum(-1) - p > top_p  # keep the smallest prefix whose mass reaches top_p
        # the mask goes back from sorted order to vocabulary order
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    # [B, V]; the float64 cumsum adds no rounding of its own, but the float32 softmax sums to 1 only within about
    # 1e-7 to 1e-5 (by the vocabulary's size), hence u is scaled by the last entry below
    cdf = torch.softmax(logits, dim=-1).double().cumsum(-1)
    # the first token whose CDF passes u * total: a token of probability 0 (banned, cut by top-k or top-p) has a CDF
    # equal to its predecessor's and can never be it
    u = torch.as_tensor(uniforms, dtype=torch.float64, device=cdf.device).view(-1, 1) * cdf[:, -1:]
    # right=True: the first index whose CDF exceeds u; the clamp guards u at the very top against rounding
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def decode_step(model, cache, attn, ids, pos, device):
    """Feed one token to each of the first A = len(ids) rows of the batch, the token each just wrote -> (their next
    logits [A, V], the attention mask [B, L + 1]). The other B - A rows wait on a tool and take no part: each gets a
    masked empty slot, so the columns stay aligned, and its cache is not read (LiveBatch keeps the fed rows first,
    so that their cache is a view, not a copy). At a TG rollout's shape about half the rows wait at a time, and a
    row costs the read of its whole KV cache: leaving them out halved the decode time (results/HISTORY.md).
    The text decoder's own modules are called in order, without Hugging Face's forward around them: at the tiny
    size that wrapper (mask building, M-RoPE recomposition, argument plumbing, output records) cost more than the
    layers' arithmetic, about 970 ATen ops a call. The operations and their order are those of transformers'
    Qwen2.5-VL sdpa forward for one token, so with every row fed the logits are bit-identical to model(...)
    (tests/test_rollout.py)."""
    lm = model.model.language_model
    B = len(ids)  # from here on the batch is the fed rows
    # one new cache slot per row: 1 for a fed token, 0 for a waiting row's (masked, and zero in the cache)
    new = torch.zeros(attn.shape[0], 1, dtype=attn.dtype, device=device)
    new[:B] = 1
    attn = torch.cat([attn, new], dim=1)  # [all rows, L]
    x = lm.embed_tokens(torch.tensor(ids, device=device).view(-1, 1))  # [B, 1, hidden]
    # the padding mask, [B, 1, 1, L]: one query per row sees every cached slot that is not a pad. Built once as the
    # additive mask SDPA would make of transformers' boolean one in every layer (0 or -inf); no mask at all when
    # nothing is padded (what transformers does, and its kernel choice)
    live = attn[:B]
    pad = None if live.all() else torch.zeros(live.shape, dtype=x.dtype, device=device).masked_fill_(
        live == 0, float("-inf"))[:, None, None, :]
    # M-RoPE for a text token: its position is the same on all three axes, so the three sections recombine into
    # plain RoPE at that position; [B, 1, head_dim]
    rope = lm.rotary_emb
    freqs = torch.tensor(pos, device=device, dtype=torch.float).view(B, 1, 1) * rope.inv_freq.float()
    freqs = torch.cat([freqs, freqs], dim=-1)
    cos, sin = (freqs.cos() * rope.attention_scaling).to(x.dtype), (freqs.sin() * rope.attention_scaling).to(x.dtype)
    for i, layer in enumerate(lm.layers):
        a = layer.self_attn
        h = layer.input_layernorm(x)
        # [B, heads, 1, head_dim] queries, [B, kv_heads, 1, head_dim] keys and values
        q = a.q_proj(h).view(B, 1, -1, a.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(B, 1, -1, a.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(B, 1, -1, a.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # the model's own rotation
        k, v = cache.layers[i].append(k, v)  # [B, kv_heads, L, head_dim]: everything cached, this token included
        if pad is None:  # grouped-query attention in the kernel, as transformers runs it without a mask
            o = F.scaled_dot_product_attention(q, k, v, scale=a.scaling, enable_gqa=a.num_key_value_groups > 1)
        else:  # the query heads that share a KV head become its queries: [B, kv_heads, groups, head_dim]
            o = F.scaled_dot_product_attention(q.reshape(B, a.num_key_value_heads, -1, a.head_dim), k, v,
                                               attn_mask=pad, scale=a.scaling)
        o = o.reshape(B, -1, 1, a.head_dim).transpose(1, 2).contiguous().reshape(B, 1, -1)  # [B, 1, heads * head_dim]
        x = x + a.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(lm.norm(x)).float()[:, -1], attn  # [B, V]


def end_turn(row, text, ended, pool, max_new_tokens, max_turns, tool_timeout):
    """A row's assistant turn is complete (`ended`: it closed with <|im_end|>, else it hit a limit). Record it and
    decide: the trajectory finishes (an answer, no action, a limit), the turn's tool call starts in `pool`, or
    (official protocol, a turn without action) the nudge becomes its next observation.
    -> True while the row goes on (it now waits on its tool or the nudge)."""
    t = row.traj
    t.messages.append({"role": "assistant", "content": text})
    if not ended:  # a limit cut the turn: no action runs
        finish(t, "max_new_tokens" if len(row.turn) >= max_new_tokens else "max_total_tokens")
    elif "<response>" in text:  # an answer ends it, even beside a call (format-invalid then)
        finish(t, "response")
    elif "<tool_call>" not in text:
        # ours ends a turn without an action here; official nudges the model on, within max_turns
        if row.protocol.nudge is None or len(t.assistant_turns) >= max_turns:
            finish(t, "no_action")
        else:  # the protocol's nudge is this row's next observation
            row.pending = NUDGE
            return True
    elif len(t.assistant_turns) >= max_turns:  # no turn left to read the result
        finish(t, "max_turns")
    else:  # a call that does not parse still waits: its observation is the parse error
        call, err = parse_tool_call(text)
        # the tool starts now while the other rows keep decoding; it gets the images as they stand
        fut = None if call is None else pool.submit(run_tool, call, list(t.images), tool_timeout, row.offered,
                                                    row.mapping, row.run)
        row.pending = (call, err, fut)
        return True
    return False


def observation_chunk(row, message, processor, max_total_tokens):
    """The observation's tokens appended to the row's trajectory, the header of its next assistant turn included
    -> the chunk to prefill (ids, images, positions), or None when it would pass max_total_tokens (it finishes)."""
    t = row.traj
    # "\n" closes the last turn, whose <|im_end|> is already cached (the last sampled token); the chunk ends with the
    # next turn's header, so the row samples right after it
    ids, imgs = encode(processor, ["\n"] + render(message) + ["<|im_start|>assistant\n"])
    if len(t.token_ids) + len(ids) >= max_total_tokens:  # >=: room for one sampled token at least
        finish(t, "max_total_tokens")
        return None
    # positions continue from the row's own counter: an image advances M-RoPE by its grid, not its length
    pos, row.next_pos = mrope_positions(ids, [g for _, g in imgs], processor, row.next_pos)
    t.token_ids += ids
    t.loss_mask += [0] * len(ids)  # observations never carry loss
    t.logprobs += [0.0] * len(ids)
    row.turn = []  # max_new_tokens and the forcer count per turn
    return ids, imgs, pos


@contextmanager
def timed(timings, key):
    """Add the block's wall time to timings[key] (when timings is a dict); CUDA work is waited for."""
    t0 = time.perf_counter()
    yield
    if timings is not None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # else queued kernels bill the next block
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


@dataclass
class LiveBatch:
    """The rows still running, with what the model computed for them: the KV cache (one row per live row), the
    attention mask over everything cached, and the next-token logits of the first A rows, those the last forward
    fed (decode_step feeds only the rows that wrote a token; the rows after them wait on a tool)."""
    rows: list
    cache: object
    attn: torch.Tensor    # [B, cached length]: 0 on pads
    logits: torch.Tensor  # [A, V]: rows[:A]'s

    def keep(self, keep, fed=(), progress=None):
        """Only rows[k] for k in keep go on, the rows in `fed` first (those the next decode step feeds): finished
        rows leave the batch and the cache shrinks with them (and advance the tqdm bar `progress`, when given)."""
        keep, fed = list(keep), set(fed)
        # the fed rows first, with the fewest rows moved: a row that is not fed trades places with the last fed
        # row after it (a row that starts waiting moves two rows' cache, not every row after it)
        i, j = 0, len(keep) - 1
        while True:
            while i < j and keep[i] in fed:
                i += 1
            while i < j and keep[j] not in fed:
                j -= 1
            if i >= j:
                break
            keep[i], keep[j] = keep[j], keep[i]
        if progress is not None:
            progress.update(len(self.rows) - len(keep))
        if keep != list(range(len(self.rows))):  # rows finished or changed places (else nothing is copied)
            idx = torch.tensor(keep, dtype=torch.long, device=self.attn.device)
            self.cache.batch_select_indices(idx)  # a reordering of the same rows copies only the rows that move
            self.attn, self.rows = self.attn[idx], [self.rows[k] for k in keep]


@torch.no_grad()
def rollout(model, processor, examples, tools=None, group_size=1, max_turns=LIMITS["max_turns"],
            max_new_tokens=LIMITS["max_new_tokens"], max_total_tokens=LIMITS["max_total_tokens"], temperature=1.0,
            top_p=1.0, top_k=0, seed=0, tool_timeout=LIMITS["tool_timeout"],
            adl=None, toolsets=None, forcer=None, progress=None, timings=None, protocol=OURS, keys=None):
    """Sample `group_size` multi-turn trajectories per example; returns them example-major.

    tools: canonical tool names offered (None: all seven, []: the direct-answer prompt without tools).
    adl: optional per-example (randomized schemas, Mapping) from adl.randomize; the group shares it.
    toolsets: optional per-example object with `.schemas` and `.call(name, params, images, timeout)` that replaces
        the visual tools (tiny.py's synthetic text tools).
    forcer: optional fn(traj_index, turn, tokens_so_far_in_turn) -> token id or None, scripts text in tests.
    temperature 0 is greedy; recorded log-probs are under the tempered distribution (T=1 when greedy).
    progress: optional tqdm bar, advanced as trajectories finish.
    keys: optional per-example sampling keys (default: the example's index here). Row g of example i samples from
        its own stream seeded by (seed, keys[i], g), so a caller that splits examples over batches or processes and
        passes their global positions gets the samples of one big batch.
    timings: optional dict that receives seconds spent in prefill, decode and waiting on tools.
    protocol: how prompts, calls and observations are written (OURS, or OFFICIAL for the authors' checkpoints).

    The phases: 1. prefill every prompt once; then, while rows are live, 2. one token for every row that is
    writing its turn (a row whose turn ends in a tool call starts the tool and waits), or, when every row waits,
    3. prefill all the observations in one batch and let the rows write again.
    """
    device = next(model.parameters()).device
    offered = protocol.schemas(list(TOOLS) if tools is None else list(tools))  # [] for []: the no-tools prompt
    keys = list(range(len(examples))) if keys is None else list(keys)
    logp_temp = temperature if temperature > 0 else 1.0  # greedy records log-probs at T=1
    vocab = model.get_output_embeddings().weight.shape[0]  # LM-head rows; may exceed len(tokenizer)
    # sampling skips structural special tokens and the vocabulary's padding rows; the recorded log-probs stay
    # those of the model's full distribution, so they equal a plain forward pass (and GRPO's ratios)
    banned = torch.tensor(processor.never_sampled + list(range(len(processor.tokenizer), vocab)), device=device)

    # 1. prefill each distinct prompt once; a group's rows then share its cache
    trajs, chunks, rows = [], [], []
    for i, ex in enumerate(examples):
        # ADL: the group's random names and their Mapping; else the offered schemas as they are
        tool_schemas, mapping = adl[i] if adl and adl[i] is not None else (offered, None)
        run = protocol.call
        if toolsets and toolsets[i] is not None:
            tool_schemas, run = toolsets[i].schemas, toolsets[i].call
        msgs = build_messages(ex, tool_schemas, protocol.system_prompt)
        # the prompt ends with the assistant header: the first sampled token opens the turn
        ids, imgs = encode(processor, [p for m in msgs for p in render(m)] + ["<|im_start|>assistant\n"])
        pos, next_pos = mrope_positions(ids, [g for _, g in imgs], processor)  # next_pos: the first sampled token's
        chunks.append((ids, imgs, pos))
        # the saved conversation names images img_k instead of holding pixels
        saved = [msgs[0], user_message({**ex, "images": [f"img_{k + 1}" for k in range(len(ex["images"]))]})]
        # rows are example-major (sample g of example i is row i*G + g), the order repeat_interleave gives the cache
        for g in range(group_size):
            t = Trajectory(ex["id"], ex["task"], token_ids=list(ids), loss_mask=[0] * len(ids),
                           logprobs=[0.0] * len(ids), images=list(ex["images"]), messages=[dict(m) for m in saved],
                           example_index=i, adl_mapping=mapping.to_json() if mapping is not None else None)
            trajs.append(t)
            # the row's own stream: a str seed hashes the same in every process (not by PYTHONHASHSEED)
            rows.append(Row(len(trajs) - 1, t, next_pos, [s["function"]["name"] for s in tool_schemas], mapping, run,
                            protocol, random.Random(f"{seed}-{keys[i]}-{g}")))
    cache = kv_cache(model)  # one cache for the whole rollout; rows leave it as they finish
    with timed(timings, "prefill"):
        logits, attn = forward_chunk(model, processor, chunks, cache, None, device)
    if group_size > 1:  # the group's copies of a prompt start from the same cache rows
        cache.batch_repeat_interleave(group_size)
        logits, attn = logits.repeat_interleave(group_size, 0), attn.repeat_interleave(group_size, 0)
    batch = LiveBatch(rows, cache, attn, logits)  # B = len(examples) * group_size rows

    with ThreadPoolExecutor(max_workers=8) as pool:  # tools run here while other rows keep decoding
        while batch.rows:
            if any(row.pending is None for row in batch.rows):
                # 2. one token for every row writing its turn. The last forward fed rows[:A]; those of them that
                # ended their turn then wait, with the rows after them
                A = len(batch.logits)
                logp = torch.log_softmax(batch.logits / logp_temp, dim=-1)  # [A, V]: the full distribution
                # a uniform number only for rows that write (a row's stream must not depend on how long the
                # others keep it waiting on its tool)
                uniforms = [row.rng.random() if row.pending is None and temperature > 0 else 0.0
                            for row in batch.rows[:A]]
                # banned tokens get -inf for sampling only; logp above keeps them
                sampled = sample(batch.logits.index_fill(1, banned, float("-inf")), temperature, top_p, top_k,
                                 uniforms).tolist()
                keep = list(range(A, len(batch.rows)))  # rows the last forward did not feed wait on
                # rows that wrote a token and go on: the next decode step feeds each its token (a turn that ended
                # in a tool call too: its <|im_end|>, which the observation follows)
                fed = []
                wrote_k, wrote_x = [], []  # batch row and token of every row that wrote one: their log-probs below
                for k, row in enumerate(batch.rows[:A]):
                    t = row.traj
                    if row.pending is not None:  # its turn ended at the last token: it waits on its tool
                        keep.append(k)
                        continue
                    # tests script text through the forcer; its token's log-prob is still the model's
                    forced = forcer(row.index, len(t.assistant_turns), row.turn) if forcer else None
                    x = int(forced) if forced is not None else sampled[k]
                    # a sampled token: loss mask 1 (and, below, the log-prob GRPO's ratio divides by)
                    t.token_ids.append(x), t.loss_mask.append(1)
                    wrote_k.append(k), wrote_x.append(x)
                    row.turn.append(x)
                    row.next_pos += 1  # x is fed to the model at the next decode step, at next_pos - 1
                    ended = x == processor.im_end  # it stays in the tokens with loss 1: GRPO trains the stop too
                    if not ended and len(row.turn) < max_new_tokens and len(t.token_ids) < max_total_tokens:
                        keep.append(k), fed.append(k)  # still writing
                        continue
                    # the turn is over: it answers, stops, or calls a tool (which starts now, in parallel with
                    # the rows still writing)
                    if end_turn(row, processor.decode(row.turn[:-1] if ended else row.turn), ended, pool,
                                max_new_tokens, max_turns, tool_timeout):
                        keep.append(k), fed.append(k)  # waits on its tool or the nudge; its last token is fed
                # one gather and one copy to the host for every row's log-prob, not one tensor index per row
                for k, lp in zip(wrote_k, logp[wrote_k, wrote_x].tolist()):
                    batch.rows[k].traj.logprobs.append(lp)
                # finished rows leave and the fed rows move first, before the next forward
                batch.keep(sorted(keep), fed, progress)
                if fed:  # rows[:len(fed)], each fed the token it just wrote, at its position
                    fed = batch.rows[:len(fed)]
                    with timed(timings, "decode"):
                        batch.logits, batch.attn = decode_step(model, cache, batch.attn, [r.turn[-1] for r in fed],
                                                               [r.next_pos - 1 for r in fed], device)
            else:
                # 3. every live row waits on its tool: prefill all observations (text and new images) in one batch
                chunks, keep = [], []
                for k, row in enumerate(batch.rows):
                    with timed(timings, "tools"):
                        message = tool_observation(row)
                    # None: the observation would pass max_total_tokens; the row finishes
                    chunk = observation_chunk(row, message, processor, max_total_tokens)
                    if chunk is not None:
                        chunks.append(chunk)
                        keep.append(k)
                # all fed, the longest observation first: prefill_in_groups runs rows of similar lengths together
                order = sorted(range(len(chunks)), key=lambda j: -len(chunks[j][0]))
                batch.keep([keep[j] for j in order], keep, progress)
                if chunks:
                    with timed(timings, "prefill"):
                        batch.logits, batch.attn = prefill_in_groups(model, processor, [chunks[j] for j in order],
                                                                     cache, batch.attn, device)
    return trajs

# -----------------------------------------------------------------------------
# training helpers: whole-sequence forward passes (SFT, pretraining, the GRPO update), the learning-rate
# schedule, checkpoints and logs


def save_checkpoint(ckpt_dir, model, processor, optimizer, state):
    """A resumable checkpoint: the policy as a model directory plus optimizer, RNG and loop state. Its last file,
    COMPLETE, says the checkpoint is whole; it is written into CKPT.tmp, which then replaces CKPT. Every rank calls
    it (under --fsdp the states are gathered from the shards); rank 0 writes."""
    weights, optim = gathered_state(model, optimizer)  # (None, None) without FSDP: the live states
    if rank_and_world()[0] > 0:
        return
    tmp = os.path.abspath(ckpt_dir) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(os.path.join(tmp, "model"), state_dict=weights)
    processor.save_pretrained(os.path.join(tmp, "model"))
    # the CPU torch and python RNGs go on where they were
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    # an FSDP run's optimizer state is keyed by parameter name (whole tensors), a plain run's by position
    torch.save({"optimizer": optimizer.state_dict() if optim is None else optim, "fsdp": optim is not None,
                "state": state, "rng": rng}, os.path.join(tmp, "trainer.pt"))
    # last: without it the checkpoint is incomplete
    with open(os.path.join(tmp, "COMPLETE"), "w", encoding="utf-8") as f:
        json.dump({"step": state["step"]}, f)
    replace_dir(tmp, os.path.abspath(ckpt_dir))


def find_checkpoint(ckpt_dir):
    """The newest complete checkpoint -> its path, or None. Newest first: CKPT.tmp once its COMPLETE is written
    (a kill came before it replaced CKPT), CKPT (only ever a finished CKPT.tmp renamed), CKPT.old (the one before)."""
    ckpt_dir = os.path.abspath(ckpt_dir)
    if os.path.isfile(os.path.join(ckpt_dir + ".tmp", "COMPLETE")):
        return ckpt_dir + ".tmp"
    return next((p for p in (ckpt_dir, ckpt_dir + ".old") if os.path.isfile(os.path.join(p, "trainer.pt"))), None)


def resume_from(ckpt_dir, resume):
    """--resume: the checkpoint to continue from, saying which, or None (saying there is none, so the run starts
    from step 0; its log is kept beside the new one, see open_log)."""
    if not resume:
        return None
    path = find_checkpoint(ckpt_dir)
    print(f"--resume: continuing from {path}" if path
          else f"--resume: no complete checkpoint at {ckpt_dir}; starting from step 0")
    return path


def load_checkpoint(ckpt_dir, optimizer, model=None):
    """Restore optimizer and RNG state -> the saved loop state dict. The weights are the model directory
    `ckpt_dir/model`, loaded with load_policy like any other. `model`: the (sharded) policy, under --fsdp."""
    path = os.path.join(ckpt_dir, "trainer.pt")
    try:
        blob = torch.load(path, weights_only=False)  # RNG states and dicts, not only tensors
    except Exception as e:  # a damaged checkpoint stops the run rather than silently restarting over its outputs
        raise InputError(f"{path}: unreadable checkpoint ({reason(e)}); "
                         "remove it to start over, or restore it") from None
    sharded = model is not None and bool(fsdp_units(model))
    if blob.get("fsdp", False) != sharded:
        raise InputError(f"{path}: written by a run {'with' if blob.get('fsdp') else 'without'} --fsdp; resume it "
                         "the same way")
    if sharded:  # whole tensors keyed by name: each rank keeps its own shard of them
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, blob["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng"]["torch"])
    random.setstate(blob["rng"]["python"])
    return blob["state"]


def write_json_atomic(path, obj, indent=None):
    """JSON written beside PATH and renamed over it: a kill leaves the old file or the new one, never half."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
    os.replace(path + ".tmp", path)


def open_log(path, done, first=1):
    """A run's JSONL log, opened for appending. Resumed after `done` steps (numbered from `first`), it keeps those
    steps' lines and drops what a killed run wrote after its checkpoint, a torn last line included. A fresh run
    (done=0) moves an existing log aside to LOG.1, LOG.2, ... instead of erasing it."""
    if done and os.path.exists(path):
        keep = []
        for line in open(path, encoding="utf-8"):
            try:
                if json.loads(line)["step"] < done + first:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut short by the kill
                pass
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
    elif not done and os.path.exists(path) and os.path.getsize(path):
        n = 1
        while os.path.exists(f"{path}.{n}"):
            n += 1
        os.replace(path, f"{path}.{n}")
        print(f"kept the previous log as {path}.{n}")
    return open(path, "a", encoding="utf-8")


def lr_at(step, total, base_lr, warmup, schedule="cosine", cooldown=0.2):
    """Linear warmup, then cosine decay to 10%, or constant, or "wsd": constant, then a linear decay to 10% over
    the last `cooldown` share of the steps (tiny.py: a constant lr carries the copy transition)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup  # step 0 does not run at lr 0
    if schedule == "constant":
        return base_lr
    if schedule == "wsd":
        start = total * (1 - cooldown)  # the step where the decay begins
        return base_lr * (1 - 0.9 * min(1.0, max(0.0, step - start) / max(1.0, total - start)))
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))  # base_lr at progress 0, 10% at 1


def bf16_autocast_fits(device):
    """bf16 autocast for training passes on CUDA only. On a CPU with AMX (this machine) it ran 1.26x faster than fp32
    on the tiny model but its memory grew with every new sequence length (the CPU bf16 kernels keep per-shape state:
    1.39 GB peak in fp32 against 2.24 GB after 40 steps of varied lengths in bf16; 7.0 GB for a whole TC run, 9.8 GB
    in a pretraining run), and on AVX2-only CPUs it runs about 10x slower, so CPUs train in fp32."""
    return is_cuda(device)


def train_autocast(device):
    """The autocast context of training passes (weights and optimizer stay fp32): see bf16_autocast_fits."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16_autocast_fits(device))


def sequence_inputs(model, processor, seqs, images, device, padding_mask=True):
    """Model inputs for whole sequences, right-padded: ids, attention mask, M-RoPE positions and pixels.
    seqs: list of token id lists; images: per row, a list of (pixel_values, grid_thw).
    padding_mask=False passes no attention mask. Under causal attention a right-padded row's padding comes after
    every real token, so no real position ever attends to it: the real positions' outputs are the same, and SDPA
    runs its causal kernel (which skips the upper triangle) instead of reading a [B, 1, L, L] mask. The training
    passes use it: on this CPU TC's loop ran 1.14x faster and the TG update 1.21x (README, Results). Padded
    positions' outputs are then garbage, and nothing reads them."""
    ids = torch.tensor(pad_batch(seqs, processor.pad, left=False), device=device)  # [B, L], right-padded
    attn = torch.tensor(pad_batch([[1] * len(s) for s in seqs], 0, left=False), device=device) \
        if padding_mask else None  # [B, L]: 0 on padding
    # [3, B, L]: each row's M-RoPE positions from 0, zeros on its padding
    pos = torch.stack([F.pad(mrope_positions(s, [g for _, g in im], processor)[0], (0, ids.shape[1] - len(s)))
                       for s, im in zip(seqs, images)], dim=1).to(device)
    return dict(input_ids=ids, attention_mask=attn, position_ids=pos,
                **pixel_inputs(model, [im for row in images for im in row], device))  # the rows' images in row order


def sequence_logits(model, processor, seqs, images, device=None):
    """One full, cache-free forward over whole sequences, with the padding mask -> logits [B, L, V] (position t
    predicts token t+1). The plain reference the training passes (masked_logits) are tested against."""
    device = device or next(model.parameters()).device
    return model(**sequence_inputs(model, processor, seqs, images, device), use_cache=False).logits


def masked_logits(model, processor, seqs, images, masks, device):
    """One forward over whole sequences with the LM head run only where masks[b][t] is 1 (position t-1 predicts
    token t) -> (logits [N, V] in row-major order of the mask, their target tokens [N], mask [B, L-1])."""
    inputs = sequence_inputs(model, processor, seqs, images, device, padding_mask=False)  # right-padded
    targets = torch.tensor(pad_batch(seqs, 0, left=False), device=device)[:, 1:]  # [B, L-1]: position t predicts t+1
    mask = torch.tensor(pad_batch(masks, 0, left=False), device=device)[:, 1:].bool()  # [B, L-1] bool
    # under --fsdp, shard() made masked_head a forward method of the model (FSDP gathers the root's weights for it)
    logits = model.masked_head(inputs, mask) if hasattr(model, "masked_head") else masked_head(model, inputs, mask)
    return logits, targets[mask], mask                                             # N = masked tokens


def masked_head(model, inputs, mask):
    """The decoder's hidden states [B, L, H], through the LM head at the mask's positions only -> logits [N, V]."""
    hidden = model.model(**inputs, use_cache=False).last_hidden_state             # [B, L, H]
    return model.lm_head(hidden[:, :-1][mask])


def masked_lm_loss(model, processor, batch, device):
    """Summed cross-entropy over loss-masked tokens and their count, for SFT and pretraining. batch: list of
    (ids, mask, images). The LM head runs only where a token carries loss (a minority of positions)."""
    logits, targets, mask = masked_logits(model, processor, [ids for ids, _, _ in batch], [im for _, _, im in batch],
                                          [m for _, m, _ in batch], device)
    return F.cross_entropy(logits.float(), targets, reduction="sum"), int(mask.sum())


def masked_logprobs(model, processor, seqs, images, masks, temperature=1.0):
    """log p(token t | tokens < t) at the tempered distribution and that distribution's entropy, [B, L] each,
    computed only where masks[b][t] is 1 and 0 elsewhere. The GRPO update needs them only on the tokens the model
    sampled; the LM head over the whole vocabulary at every prompt and observation position is what a full pass
    spends most of its time on at the tiny size. Equal to token_logprobs(sequence_logits(...)) on the mask."""
    device = next(model.parameters()).device
    logits, targets, mask = masked_logits(model, processor, seqs, images, masks, device)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)               # [N, V]
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)                  # [N]
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)  # [N]: logged, never trained on
    # back to [B, L]: masked_scatter fills the mask's positions in the same row-major order they were taken in
    zeros = torch.zeros(mask.shape, device=device)
    # F.pad(1, 0): index t holds token t's value, aligned with Trajectory.logprobs
    return F.pad(zeros.masked_scatter(mask, picked), (1, 0)), F.pad(zeros.masked_scatter(mask, entropy), (1, 0))


def token_logprobs(logits, seqs, temperature=1.0):
    """log p(token t | tokens < t) for each row, [B, L] with 0 at t=0. Past a row's end the values are those of
    pad id 0 and mean nothing: callers multiply by their mask."""
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # [B, L-1, V]
    targets = torch.tensor(pad_batch(seqs, 0, left=False), device=logits.device)[:, 1:]
    out = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return F.pad(out, (1, 0))  # [B, L], aligned with the tokens

# -----------------------------------------------------------------------------
# the one evaluation every stage runs, and the metrics it reports (a pure function of examples and trajectories)


# examples per evaluation batch, the default of every stage's flag. Measured on the default TC evaluation (500 test
# examples, 2-core CPU): 25 took 56 s and 2.17 GiB resident, 50 took 61 s and 2.52 GiB (each row's KV cache and tool
# images), 16 took 60 s and 1.98 GiB
EVAL_BATCH = 25


def evaluate(model, processor, examples, tools, adl=None, batch_size=EVAL_BATCH, desc="eval", seed=0, **sampling):
    """The one evaluation every stage runs: rollouts over `examples` (greedy unless `sampling` says otherwise) in
    batches of `batch_size` -> (trajectories, {task: metrics}). adl: one (schemas, Mapping) pair per example, as
    adl.plan returns, or None."""
    from tqdm import tqdm
    rank, world = rank_and_world()
    trajs = {}
    # under torchrun each rank takes every world-th example; sampling keys are the examples' global positions, so
    # an example gets the same trajectory whatever the world size and the batching
    mine = list(range(rank, len(examples), world))
    with tqdm(total=len(mine), desc=desc, dynamic_ncols=True, leave=False, disable=rank > 0) as bar:
        for i in range(0, len(mine), batch_size):
            idx = mine[i:i + batch_size]
            batch = rollout(model, processor, [examples[k] for k in idx], tools=tools, seed=seed, keys=idx,
                            adl=[adl[k] for k in idx] if adl else None, progress=bar,
                            **{"temperature": 0.0, **sampling})  # greedy unless the caller samples
            trajs.update(zip(idx, batch))
            # no update follows an evaluation batch, so no encoding of its images is ever looked up again: kept,
            # they would fill the cache's budget (256 MiB, ENCODED_BUDGET) with dead weight
            encode_image_cached.clear()
    if world > 1:  # every rank gets every trajectory (their images stay on the rank that made them)
        for part in all_gather({k: replace(t, images=[]) for k, t in trajs.items()}):
            trajs = {**part, **trajs}  # ours (with images) win over the copies
    trajs = [trajs[k] for k in range(len(examples))]  # back in example order
    return trajs, metrics_by_task(examples, trajs)


def describe(label, m):
    """One line of metrics for a console: accuracy, format validity, calls per sample, tool success."""
    success = "n/a" if m["tool_success_rate"] is None else f"{m['tool_success_rate']:.3f}"  # n/a: no calls
    return (f"{label:11s} accuracy {m['accuracy']:.3f}  format-valid {m['format_valid_rate']:.3f}  "
            f"calls/sample {m['cps']:.2f}  tool success {success}")


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def wilson(successes, n, z=1.96):
    """The 95% Wilson score interval of a rate -> [low, high] ([0, 1] for n = 0). Unlike the normal approximation it
    stays inside [0, 1] and is honest near 0% and 100%, where small evaluations of the tiny model live."""
    if not n:
        return [0.0, 1.0]
    p = successes / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))]


def level_key(level):
    return (isinstance(level, str), level)  # numeric levels in order, then named ones


def metrics(examples, trajectories, by_level=True):
    """Accuracy and tool statistics of aligned examples and trajectories (trajectories[i] answers examples[i]).
    tool_success_rate is None (not applicable) when no tool was called, never 0 or 1."""
    assert len(examples) == len(trajectories), "one trajectory per example"
    n = len(examples)
    calls = [c for t in trajectories for c in t.calls]
    per_tool = Counter(c["name"] for c in calls)
    ok_tool = Counter(c["name"] for c in calls if c["status"] == "success")
    scores = [score(ex, t.answer) for ex, t in zip(examples, trajectories)]
    out = {
        "n": n,
        "accuracy": mean(scores),
        "accuracy_ci": wilson(sum(scores), n),  # 95% Wilson interval: read every accuracy with it
        "cps": len(calls) / n if n else None,  # CPS: tool calls per sample
        "tool_success_rate": sum(ok_tool.values()) / len(calls) if calls else None,
        "calls_per_sample_per_tool": {k: per_tool[k] / n for k in sorted(per_tool)},
        "tool_success_rate_per_tool": {k: ok_tool[k] / per_tool[k] for k in sorted(per_tool)},
        "mean_turns": mean(len(t.assistant_turns) for t in trajectories),
        "mean_generated_tokens": mean(sum(t.loss_mask) for t in trajectories),  # sampled tokens per trajectory
        "format_valid_rate": mean(float(bool(t.format_valid)) for t in trajectories),
        "answered_rate": mean(float(t.answer is not None) for t in trajectories),
        "finish_reasons": dict(sorted(Counter(t.finish_reason for t in trajectories).items())),
    }
    levels = sorted({ex["meta"]["level"] for ex in examples if "level" in ex.get("meta", {})}, key=level_key)
    if by_level and levels:
        out["by_level"] = {}
        for lv in levels:
            idx = [i for i, ex in enumerate(examples) if ex.get("meta", {}).get("level") == lv]
            out["by_level"][str(lv)] = metrics([examples[i] for i in idx], [trajectories[i] for i in idx], False)
    return out


def metrics_by_task(examples, trajectories):
    """{task: metrics} over aligned examples and trajectories, tasks in the order they first appear."""
    tasks_seen = list(dict.fromkeys(ex["task"] for ex in examples))
    return {task: metrics(*zip(*[(ex, t) for ex, t in zip(examples, trajectories) if ex["task"] == task]),
                          by_level=False)
            for task in tasks_seen}
