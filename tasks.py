"""
The five synthetic tasks: generators, renderers, answer extraction and scoring.

Every example is a pure function of (task, split, seed, index) and knobs: the RNG seed is
derived from all of them, so the same arguments give byte-identical images. Scenes use the
colours and the bitmap font of tools.py (so Point and OCR can read them), but the tools only
ever see the pixels, never `meta`.
"""
import functools
import hashlib
import json
import math
import os
import re

import numpy as np
from PIL import Image, ImageDraw

from tools import COLOURS, MOVES, SCENE, SHAPES, astar, draw_text, parse_moves, text_size

TASKS = ("vsp_nav", "vsp_verify", "jigsaw", "vstar", "guiqa")
SPLITS = {"train": 0, "rl": 1, "test": 2}  # the index is part of every example's RNG seed (generate)
CELL = 64        # grid tasks: pixels per cell, so a grid's size is its image size / 64
LETTERS = "ABCD"  # option letters of jigsaw and vstar

# -----------------------------------------------------------------------------
# rendering helpers


# cached by (draw_fn, size, args): the same shape in the same colour is drawn once; paste never changes it
@functools.lru_cache(maxsize=256)
def _patch(draw_fn, w, h, *args, ss=4):
    """A shape drawn on a transparent patch at `ss` times the size and averaged down:
    antialiased edges at the cost of a small patch, not a supersampled canvas."""
    patch = Image.new("RGBA", (w * ss, h * ss), (0, 0, 0, 0))
    draw_fn(ImageDraw.Draw(patch), w * ss, h * ss, *args)
    return patch.resize((w, h), Image.BOX)


def _stamp(canvas, xy, size, draw_fn, *args):
    patch = _patch(draw_fn, *size, *args)  # RGBA: its own alpha is the paste mask
    canvas.paste(patch, xy, patch)


def _texture(rng, h, w, base, amp, blobs=6):
    """A light RGB background around `base`: smooth blobs (computed at 1/8 size, then
    upsampled) plus grain, the same offset on every channel, applied with lookup tables."""
    sh, sw = max(2, h // 8), max(2, w // 8)
    yy, xx = np.mgrid[0:sh, 0:sw] / max(sh, sw)  # both in units of the longer side: blobs stay round
    f = np.zeros((sh, sw))
    for _ in range(blobs):
        # a Gaussian blob of random sign and a radius of 0.1-0.4 of the longer side
        cx, cy, r = rng.random(), rng.random(), 0.1 + 0.3 * rng.random()
        f += rng.uniform(-1, 1) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / r ** 2)
    # centred on 124 so that with the grain (0..7) it averages ~128, clipped at 248 so 248 + 7 fits a uint8
    smooth = Image.fromarray(np.clip(amp * f + 124, 0, 248).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    grain = np.frombuffer(rng.bytes(h * w), np.uint8).reshape(h, w) & 7   # 0..7
    offset = Image.fromarray(np.asarray(smooth) + grain)                    # 128 means no change
    # one lookup table per channel adds (offset - 128) to its base value: a brightness offset, the hue stays
    return Image.merge("RGB", [offset.point([min(255, max(0, v + i - 128)) for i in range(256)]) for v in base])


# -----------------------------------------------------------------------------
# vsp_nav / vsp_verify: FrozenLake grids


def _layout(rng, split, sizes, verify):
    """A grid where the gift is reachable. The layout's hash picks the split (80/10/10), so
    even tiny 3x3 grids never appear in two splits with different ice noise."""
    while True:
        n = int(rng.choice(sizes))
        cells = [(c, r) for r in range(n) for c in range(n)]  # (column, row), as tools.astar takes them
        order = rng.permutation(len(cells))
        start, goal = cells[order[0]], cells[order[1]]  # two distinct cells; the rest may become holes
        density = rng.uniform(0.15, 0.3)
        holes = sorted(cells[i] for i in order[2:] if rng.random() < density)
        path = astar(start, goal, set(holes), n, n)
        # verify is in the key: nav and verify layouts are bucketed independently
        key = json.dumps([n, start, goal, holes, verify]).encode()
        bucket = int(hashlib.sha256(key).hexdigest(), 16) % 10  # 0-7 train, 8 rl, 9 test
        # reject and redraw: an unreachable gift, or a layout that belongs to another split
        if path and {"train": bucket < 8, "rl": bucket == 8, "test": bucket == 9}[split]:
            return n, start, goal, holes, path


def _elf(d, w, h):
    tunic, face = SCENE["elf"]
    d.polygon([(0.34 * w, 0.47 * h), (0.66 * w, 0.47 * h), (0.74 * w, 0.86 * h), (0.26 * w, 0.86 * h)], fill=tunic)
    d.polygon([(0.36 * w, 0.28 * h), (0.64 * w, 0.28 * h), (0.5 * w, 0.04 * h)], fill=tunic)       # hat
    d.ellipse([0.36 * w, 0.22 * h, 0.64 * w, 0.50 * h], fill=face)  # face
    for ex in (0.45, 0.55):
        d.ellipse([(ex - 0.02) * w, 0.33 * h, (ex + 0.02) * w, 0.37 * h], fill=(30, 30, 30))
    d.rectangle([0.3 * w, 0.86 * h, 0.7 * w, 0.92 * h], fill=(90, 60, 30))                        # boots


def _gift(d, w, h):
    box, ribbon = SCENE["gift"]
    d.rectangle([0.22 * w, 0.40 * h, 0.78 * w, 0.86 * h], fill=box)
    d.rectangle([0.18 * w, 0.32 * h, 0.82 * w, 0.42 * h], fill=(185, 28, 42))                    # lid
    d.rectangle([0.45 * w, 0.32 * h, 0.55 * w, 0.86 * h], fill=ribbon)
    d.rectangle([0.22 * w, 0.58 * h, 0.78 * w, 0.66 * h], fill=ribbon)
    d.ellipse([0.36 * w, 0.18 * h, 0.5 * w, 0.33 * h], fill=ribbon)  # the bow's two loops
    d.ellipse([0.5 * w, 0.18 * h, 0.64 * w, 0.33 * h], fill=ribbon)


def _hole(d, w, h):
    water, ripple = SCENE["hole"]
    # the light outline is far from every paint colour in SCENE: Point leaves it out of the hole
    d.ellipse([0.08 * w, 0.14 * h, 0.92 * w, 0.86 * h], fill=water, outline=(150, 190, 215), width=w // 40)
    for k in range(2):
        d.arc([(0.25 + 0.1 * k) * w, (0.3 + 0.1 * k) * h, (0.75 - 0.1 * k) * w, (0.7 - 0.1 * k) * h],
              200, 320, fill=ripple, width=w // 40)


def render_grid(rng, n, start, goal, holes):
    size = n * CELL  # pixels: the image is n x n cells of 64 px
    img = _texture(rng, size, size, (205, 228, 242), 12)
    d = ImageDraw.Draw(img)
    for k in range(n + 1):  # faint cell borders, 2 px between cells
        for v in (k * CELL - 1, k * CELL):  # the last column of one cell and the first of the next
            d.line([(v, 0), (v, size)], fill=(175, 205, 228))
            d.line([(0, v), (size, v)], fill=(175, 205, 228))
    # each object drawn 56 x 56 px, 4 px inside its cell, jittered by up to 3 px: it never leaves the cell,
    # so the cell under Point's centre pixel // 64 is the object's cell
    for cell, draw_fn in [(h, _hole) for h in holes] + [(start, _elf), (goal, _gift)]:
        jx, jy = rng.integers(-3, 4, 2)
        _stamp(img, (cell[0] * CELL + 4 + int(jx), cell[1] * CELL + 4 + int(jy)), (CELL - 8, CELL - 8), draw_fn)
    return img


def walk(meta, moves, off_grid="stay"):
    """Walk the elf -> (how the walk ends, the cell where): 'hole' (it stepped into one), 'off_grid' (a move left
    the grid, with off_grid='fail', as verification judges), 'goal' or 'short' (it stopped elsewhere). With
    off_grid='stay' (navigation scoring) an off-grid move leaves the elf in place."""
    # cells are (column, row); holes as a set of tuples
    n, (x, y), holes = meta["grid"], meta["start"], {tuple(h) for h in meta["holes"]}
    for m in moves:
        dx, dy = MOVES[m]
        if not (0 <= x + dx < n and 0 <= y + dy < n):
            if off_grid == "fail":
                return "off_grid", [x, y]
            continue  # off_grid='stay': the move is ignored, the walk goes on
        x, y = x + dx, y + dy
        if (x, y) in holes:
            return "hole", [x, y]
    return ("goal" if [x, y] == list(meta["goal"]) else "short"), [x, y]


def replay(meta, moves, off_grid="stay"):
    """True iff the elf never enters a hole and ends on the gift (see walk)."""
    return walk(meta, moves, off_grid)[0] == "goal"


_NAV_Q = [
    "The elf stands on a frozen lake divided into a grid. Give the moves that take it to the gift "
    "without stepping into an ice hole, as a comma-separated list of R (right), L (left), U (up), D (down).",
    "Help the player reach the present. Holes in the ice must be avoided. Answer with a sequence of moves "
    "like R,R,D (R right, L left, U up, D down).",
    "Plan a safe route on this frozen lake from the elf to the gift, moving one cell at a time. "
    "Write the moves as letters R, L, U, D separated by commas.",
]
_VERIFY_Q = [
    "The elf follows the moves {moves} (R right, L left, U up, D down, one cell each). Does it reach the gift "
    "safely, without falling into a hole or leaving the grid? Answer Yes or No.",
    "Is this path safe and does it reach the gift? Path from the elf: {moves} (R right, L left, U up, D down). "
    "Answer Yes or No.",
    "On the frozen lake, the player moves {moves}, one cell per letter (R right, L left, U up, D down). "
    "Will it arrive at the present without stepping into an ice hole or off the grid? Yes or No?",
]


def _verify_moves(rng, n, start, goal, holes, path):
    """A candidate move sequence: about half of them safe, the others walk into a hole, stop
    short or leave the grid. The label comes from replaying, never from the intention."""
    meta = {"grid": n, "start": start, "goal": goal, "holes": holes}
    want = bool(rng.random() < 0.5)  # the label aimed at; the label kept is the replayed one
    free = [(c, r) for r in range(n) for c in range(n) if (c, r) not in holes]
    for _ in range(20):  # a few attempts at a candidate whose replayed label is `want`, else the last one
        moves = list(path)
        kind = str(rng.choice(["detour", "shortest"] if want else ["hole", "short", "offgrid"]))
        if kind == "detour":
            # a safe detour: the shortest route through a random free cell (it may pass the gift and come back)
            via = free[rng.integers(len(free))]
            a, b = astar(start, via, set(holes), n, n), astar(via, goal, set(holes), n, n)
            moves = a + b if a is not None and b is not None else moves
        elif kind == "hole" and holes:
            h = holes[rng.integers(len(holes))]
            # a route into hole h (the other holes avoided), then on to the gift ignoring holes; the walk stops at h
            a = astar(start, h, set(holes) - {h}, n, n)
            moves = a + astar(h, goal, set(), n, n) if a is not None else moves
        elif kind == "short":
            k = int(rng.integers(1, 3))
            moves = moves[:-k] if len(moves) > k else moves  # drop the last 1-2 moves: stops short
        elif kind == "offgrid":
            # walk the first i moves, then insert one that leaves the grid from there
            i = int(rng.integers(len(moves) + 1))
            x, y = start
            for m in moves[:i]:
                x, y = x + MOVES[m][0], y + MOVES[m][1]
            out = [m for m, (dx, dy) in MOVES.items() if not (0 <= x + dx < n and 0 <= y + dy < n)]
            moves = moves[:i] + [out[rng.integers(len(out))]] + moves[i:] if out else moves
        if replay(meta, moves, "fail") == want:
            break
    return moves, replay(meta, moves, "fail")


def _grid_task(rng, split, verify, sizes=tuple(range(3, 9))):
    n, start, goal, holes, path = _layout(rng, split, sizes, verify)
    img = render_grid(rng, n, start, goal, holes)
    # level: the grid size, the axis the report breaks accuracy down by
    meta = {"level": n, "grid": n, "start": list(start), "goal": list(goal), "holes": [list(h) for h in holes]}
    if not verify:
        # the reference is one shortest route; score() accepts any safe one
        return str(rng.choice(_NAV_Q)), [img], ",".join(path), meta
    moves, safe = _verify_moves(rng, n, start, goal, holes, path)
    meta["moves"] = ",".join(moves)
    return str(rng.choice(_VERIFY_Q)).format(moves=meta["moves"]), [img], "Yes" if safe else "No", meta

# -----------------------------------------------------------------------------
# jigsaw: a procedural picture, a 2x2 window of its 3x3 cells with one cell blacked out


def _picture(rng, size):
    """Gradients, stripes and shapes, never darker than 27 so that only the hole is black."""
    half = size // 2  # the gradient and stripes are smooth: compute them at half size
    # coordinates in [0, 1) of the half-size grid
    yy, xx = np.ogrid[0:half, 0:half]
    yy, xx = yy.astype(np.float32) / half, xx.astype(np.float32) / half
    c1, c2, c3 = (rng.uniform(40, 255, 3).astype(np.float32) for _ in range(3))
    a = rng.uniform(0, 2 * np.pi)
    # a linear gradient from c2 to c1 along a random direction
    t = ((np.cos(a) * xx + np.sin(a) * yy + 1) / 2)[..., None]
    b = rng.uniform(0, 2 * np.pi)
    # stripes of a random direction and frequency, mixing in 0-0.7 of c3
    stripes = 0.35 + 0.35 * np.sin((np.cos(b) * xx + np.sin(b) * yy) * rng.uniform(6, 20) * np.pi)[..., None]
    img = (c1 * t + c2 * (1 - t)) * (1 - stripes) + c3 * stripes
    # shapes drawn at twice the size and averaged down: antialiased edges
    pic = Image.fromarray(np.clip(img, 30, 255).astype(np.uint8)).resize((2 * size, 2 * size), Image.BILINEAR)
    d = ImageDraw.Draw(pic)
    for _ in range(rng.integers(4, 9)):  # 4-8 shapes, coordinates in the 2x canvas
        x, y = rng.uniform(0, 2 * size, 2)
        r = rng.uniform(0.1, 0.4) * size
        colour = tuple(int(v) for v in rng.uniform(30, 255, 3))
        kind = rng.integers(3)
        if kind == 0:
            d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        elif kind == 1:
            d.rectangle([x - r, y - r * 0.6, x + r, y + r * 0.6], fill=colour)
        else:
            d.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=colour)
    # minus 0..3 of grain after the clip at 30: every pixel stays >= 27, no uint8 wrap-around
    grain = np.frombuffer(rng.bytes(size * size * 3), np.uint8).reshape(size, size, 3) & 3
    return Image.fromarray(np.asarray(pic.resize((size, size), Image.BOX)) - grain)


_JIGSAW_Q = [
    "The first image is part of a picture with one piece missing (the black square). {cands} "
    "Which candidate fills the black square? Answer with the letter.",
    "One square of this picture has been blacked out. Candidate pieces: {cands} Which one belongs in the "
    "gap? Answer with its letter.",
    "Complete the puzzle: which of the pieces {cands} fits the black area of the first image? Give the letter.",
]


def _jigsaw(rng, split, cell=112, candidates=(2, 3)):
    pic = _picture(rng, 3 * cell)  # 3 x 3 cells of `cell` px (336 px at the default 112)
    k = int(rng.choice(candidates))  # candidates shown, the answer included; also the level
    r0, c0 = rng.integers(0, 2, 2)  # the window's top-left cell (row, column): a 2 x 2 window fits at 0 or 1
    window = pic.crop((c0 * cell, r0 * cell, (c0 + 2) * cell, (r0 + 2) * cell))
    hr, hc = rng.integers(0, 2, 2)  # the blacked-out cell inside the window
    # pixel box [x0, y0, x1, y1] in window coordinates
    hole = [int(hc) * cell, int(hr) * cell, (int(hc) + 1) * cell, (int(hr) + 1) * cell]
    piece = window.crop(hole)  # cut before the hole is painted black
    window.paste((0, 0, 0), hole)
    # distractors: cells outside the window, same palette and texture as the answer
    outside = [(r, c) for r in range(3) for c in range(3) if not (r0 <= r < r0 + 2 and c0 <= c < c0 + 2)]
    picks = rng.choice(len(outside), k - 1, replace=False)  # 5 cells lie outside the window
    pieces = [pic.crop((outside[i][1] * cell, outside[i][0] * cell, (outside[i][1] + 1) * cell,
                        (outside[i][0] + 1) * cell)) for i in picks]
    answer = int(rng.integers(k))
    pieces.insert(answer, piece)  # the answer's letter: its position among the candidates
    cands = " ".join(f"{LETTERS[i]}: img_{i + 2}." for i in range(k))  # img_1 is the window, the candidates follow
    meta = {"level": k, "hole": hole, "cell": cell}
    return str(rng.choice(_JIGSAW_Q)).format(cands=cands), [window] + pieces, LETTERS[answer], meta

# -----------------------------------------------------------------------------
# vstar: a small target on a large canvas of look-alike distractors

SIMILAR = {"red": ["orange", "pink", "brown"], "orange": ["red", "yellow", "brown"],
           "yellow": ["orange", "green", "brown"], "green": ["yellow", "blue", "brown"],
           "blue": ["purple", "green", "pink"], "purple": ["blue", "pink", "red"],
           "pink": ["red", "purple", "orange"], "brown": ["orange", "red", "purple"]}


def _shape(d, w, h, shape, colour):
    if shape == "circle":
        d.ellipse([0, 0, w - 1, h - 1], fill=colour)
    elif shape == "square":
        d.rectangle([0, 0, w - 1, h - 1], fill=colour)
    elif shape == "triangle":
        d.polygon([(w / 2, 0), (w - 1, h - 1), (0, h - 1)], fill=colour)
    else:  # five-pointed star, inner radius 0.45 of the outer
        pts = [(w / 2 + (0.5 if i % 2 == 0 else 0.225) * w * math.sin(i * math.pi / 5),
                h * 0.55 - (0.55 if i % 2 == 0 else 0.25) * h * math.cos(i * math.pi / 5)) for i in range(10)]
        d.polygon(pts, fill=colour)


_VSTAR_Q = {
    "color": ["What colour is the {shape}?", "Look closely: what is the colour of the small {shape}?",
              "Somewhere in the image there is a tiny {shape}. Which colour is it?"],
    "shape": ["What shape is the {colour} object?", "Which shape does the small {colour} object have?",
              "Find the tiny {colour} object. What is its shape?"],
    "count": ["How many {colour} {shape}s are there?", "Count the small {colour} {shape}s in the image.",
              "How many {colour} {shape}s can you find?"],
}


def _vstar(rng, split, canvas=1024, target_px=(14, 22), objects=(30, 45)):
    kind = str(rng.choice(list(_VSTAR_Q)))
    names = list(COLOURS)
    colour, shape = str(rng.choice(names)), str(rng.choice(SHAPES))
    count = int(rng.integers(1, 5)) if kind == "count" else 1  # 1-4 targets to count
    n = int(rng.integers(*objects))  # objects on the canvas, targets included (30-44 by default)
    others = [c for c in names if c != colour]
    near = SIMILAR[colour]  # about half the distractors draw a look-alike colour
    # targets first, on an almost empty canvas: none is dropped in practice, and the count answer counts
    # the targets actually drawn
    specs = [(colour, shape, True)] * count
    while len(specs) < n:  # distractors never share the target's identifying attribute(s)
        c = str(rng.choice(near if rng.random() < 0.5 else names))
        s = str(rng.choice(SHAPES))
        if ((kind == "color" and s == shape) or (kind == "shape" and c == colour)
                or (kind == "count" and (c, s) == (colour, shape))):
            continue
        specs.append((c, s, False))
    img = _texture(rng, canvas, canvas, (236, 232, 224), 14, blobs=10)
    placed, targets = [], []
    for c, s, is_target in specs:
        for _ in range(200):
            # side in px: targets 14-22, distractors 12-26, so size alone does not give a target away
            size = int(rng.integers(target_px[0], target_px[1] + 1)) if is_target else int(rng.integers(12, 27))
            x, y = rng.integers(8, canvas - size - 8, 2)  # top-left corner, at least 8 px from every edge
            # with sides of 12-26 px this leaves a gap of more than 7 px between any two objects, so Point's
            # connected components never merge two of them
            if all(abs(x - px) > (size + ps) / 2 + 14 or abs(y - py) > (size + ps) / 2 + 14 for px, py, ps in placed):
                break
        else:  # 200 tries without room: drop this object
            continue
        placed.append((x, y, size))
        # up to 12 per channel off the palette colour: Point matches the nearest palette colour within 60
        jitter = rng.integers(-12, 13, 3)
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[c]) + jitter, 0, 255))
        _stamp(img, (int(x), int(y)), (size, size), _shape, s, fill)
        if is_target:
            targets.append([int(x) + size / 2, int(y) + size / 2, size])  # [centre x, centre y, side] in px
    if kind == "color":
        options, correct = [colour] + list(rng.choice(others, 3, replace=False)), colour
    elif kind == "shape":
        options, correct = list(SHAPES), shape
    else:
        # the true count and three other counts from 1-6
        options, correct = [str(len(targets))] + [str(v) for v in rng.choice(
            [v for v in range(1, 7) if v != len(targets)], 3, replace=False)], str(len(targets))
    options = [str(o) for o in rng.permutation(options)]  # shuffled: the letter of the answer is random
    question = str(rng.choice(_VSTAR_Q[kind])).format(colour=colour, shape=shape)
    question += "\n" + " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options)) + "\nAnswer with the letter."
    meta = {"level": kind, "targets": targets, "colour": colour, "shape": shape, "options": options}
    return question, [img], LETTERS[options.index(correct)], meta

# -----------------------------------------------------------------------------
# guiqa: an app screen with labelled fields in the small bitmap font

_FIRST = ["Ana", "Ben", "Carla", "Dmitri", "Eva", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena", "Mateo",
          "Nora"]
_LAST = ["Lee", "Okafor", "Novak", "Silva", "Berg", "Tanaka", "Moreau", "Singh", "Kowalski", "Haddad", "Reyes"]
_CITIES = ["Lisbon", "Osaka", "Nairobi", "Denver", "Krakow", "Quito", "Tallinn", "Perth", "Lyon", "Austin"]


def _digits(rng, k):
    return "".join(str(d) for d in rng.integers(0, 10, k))


_FIELDS = {
    "Order ID": lambda r: _digits(r, 5),
    "Customer": lambda r: f"{r.choice(_FIRST)} {r.choice(_LAST)}",
    "Email": lambda r: f"{r.choice(_FIRST).lower()}.{r.choice(_LAST).lower()}"
                       f"@{r.choice(['mail.com', 'example.org', 'post.net'])}",
    "Phone": lambda r: f"555-{_digits(r, 3)}-{_digits(r, 4)}",
    "City": lambda r: str(r.choice(_CITIES)),
    "Status": lambda r: str(r.choice(["Shipped", "Pending", "Delivered", "Cancelled", "On hold"])),
    "Amount": lambda r: f"${r.integers(1, 999)}.{_digits(r, 2)}",
    "Date": lambda r: f"2024-{r.integers(1, 13):02d}-{r.integers(1, 29):02d}",
    "Due Date": lambda r: f"2025-{r.integers(1, 13):02d}-{r.integers(1, 29):02d}",
    "Tracking No": lambda r: "TRK" + "".join(r.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ23456789"), 8)),
    "Account": lambda r: f"AC-{_digits(r, 6)}",
    "Plan": lambda r: str(r.choice(["Basic", "Pro", "Team", "Enterprise"])),
    "Zip Code": lambda r: _digits(r, 5),
    "Username": lambda r: f"{r.choice(_FIRST).lower()}{_digits(r, 2)}",
    "Ticket": lambda r: f"#{_digits(r, 4)}",
}
_TITLES = ["Order Details", "Customer Profile", "Shipping Form", "Account Settings", "Support Ticket", "Invoice"]
_GUI_Q = ["What is the value of the '{f}' field on this screen?",
          "Read the {f} shown in the form. Answer with the exact text.",
          "According to the app screen, what is the {f}?"]


def _guiqa(rng, split, size=(640, 480), fields=(4, 7)):
    w, h = size
    k = int(rng.integers(fields[0], fields[1] + 1))  # fields on the screen (4-7): the level
    names = [str(f) for f in rng.choice(list(_FIELDS), k, replace=False)]
    values = [_FIELDS[f](rng) for f in names]
    img = _texture(rng, h, w, (244, 245, 248), 6)
    d = ImageDraw.Draw(img)
    header = tuple(int(v) for v in rng.integers(185, 235, 3))  # light: OCR's ink is grey < 110
    d.rectangle([0, 0, w, 40], fill=header)  # a 40-px title bar
    draw_text(img, (16, 13), str(rng.choice(_TITLES)), (25, 25, 35), scale=2)
    draw_text(img, (w - 60, 17), "Help", (40, 40, 60))
    row = min(52, (h - 120) // k)  # px per field: the fields fit between the title bar and the buttons
    # the longest label ('Tracking No:') is 71 px wide, so a value starts 80+ px right of its label:
    # OCR splits them at a gap of more than 12 px
    label_x, box_x = 24, 24 + int(rng.integers(150, 190))
    for i, (name, value) in enumerate(zip(names, values)):
        y = 64 + i * row
        # the value's white box; the text sits 8 px below its top
        d.rectangle([box_x, y, w - 32, y + 22], fill=(255, 255, 255), outline=(185, 190, 200))
        draw_text(img, (label_x, y + 8), name + ":", (60, 60, 75))
        draw_text(img, (box_x + 6, y + 8), value, (20, 20, 25))
    for j, label in enumerate(["Save", "Cancel"]):
        bx = w - 200 + j * 90
        d.rectangle([bx, h - 40, bx + 70, h - 16], fill=(215, 225, 240), outline=(160, 175, 200))
        tw, _ = text_size(label)
        draw_text(img, (bx + 35 - tw // 2, h - 31), label, (30, 40, 70))  # centred on the 70-px button
    target = int(rng.integers(k))
    question = str(rng.choice(_GUI_Q)).format(f=names[target])
    return question, [img], values[target], {"level": k, "field": names[target]}

# -----------------------------------------------------------------------------
# the public API: generate, answer extraction, format check, score, save/load

_GENERATORS = {"vsp_nav": lambda r, s, **kw: _grid_task(r, s, False, **kw),
               "vsp_verify": lambda r, s, **kw: _grid_task(r, s, True, **kw),
               "jigsaw": _jigsaw, "vstar": _vstar, "guiqa": _guiqa}


def generate(task, n, split="test", seed=0, start=0, **knobs):
    """n examples of a task, indices start..start+n-1 of the (split, seed) stream; knobs go to the generator
    (sizes=, cell=, candidates=, canvas=, target_px=, objects=, size=, fields=)."""
    if task not in TASKS or split not in SPLITS:
        raise ValueError(f"unknown task {task!r} or split {split!r}; tasks: {TASKS}, splits: {list(SPLITS)}")
    return [_example(task, split, seed, i, **knobs) for i in range(start, start + n)]


def test_set(task_names, n):
    """The stages' own evaluations (TC's and TG's, --eval-n): n `test` examples per task under seed 0, whatever the
    run's --seed, so runs of every seed, before and after training, are scored on the same examples."""
    return [ex for task in task_names for ex in generate(task, n, split="test", seed=0)]


def _example(task, split, seed, i, **knobs):
    # one generator per example: example i is the same whatever n is, and no two tasks or splits share a stream
    rng = np.random.default_rng([SPLITS[split], TASKS.index(task), seed, i])
    question, images, answer, meta = _GENERATORS[task](rng, split, **knobs)
    return {"id": f"{task}-{split}-{seed}-{i}", "task": task, "question": question,
            "images": images, "answer": answer, "meta": meta}


def parse_id(example_id):
    """'vstar-train-3000-17' -> ('vstar', 'train', 3000, 17): a generated example's task, split, seed and index."""
    task, split, seed, i = (example_id.rsplit("-", 3) + ["", "", ""])[:4]
    if task not in TASKS or split not in SPLITS or not seed.isdigit() or not i.isdigit():
        raise ValueError(f"{example_id!r} is not the id of a generated example (TASK-SPLIT-SEED-INDEX)")
    return task, split, int(seed), int(i)


def regenerate(example_id):
    """The example generate() made under this id with its default knobs, made again from its seed: what TC data
    stores in place of an input image's pixels."""
    return _example(*parse_id(example_id))


SOURCE = "tasks:"  # a data file's image path that names a generated example's image ("tasks:ID#K") instead of a file


@functools.lru_cache(maxsize=4)  # a jigsaw record reads 3-4 images of one example in a row
def _example_images(example_id):
    return regenerate(example_id)["images"]


def parse_source(path):
    """'tasks:vstar-train-3000-17#0' -> ('vstar-train-3000-17', 0); a ValueError naming a malformed one."""
    example_id, _, k = path[len(SOURCE):].partition("#")
    parse_id(example_id)  # a ValueError naming the id
    if not k.isdigit():
        raise ValueError(f"image {path!r}: not {SOURCE}ID#K")
    return example_id, int(k)


def open_image(part, data_dir):
    """The PIL image of a data file's image part: a file under data_dir, or a generated example's image
    ("tasks:ID#K", made again and checked against the digest written with it)."""
    if not part["image"].startswith(SOURCE):
        with Image.open(os.path.join(data_dir, part["image"])) as im:
            return im.convert("RGB")  # loaded: the file closes
    example_id, k = parse_source(part["image"])
    image = _example_images(example_id)[k].convert("RGB")  # a copy: the cached one stays as made
    if image_digest(image) != part.get("sha256"):
        raise InputError(f"{os.path.join(data_dir, 'train.jsonl')}: image {part['image']} comes out with other "
                         f"pixels than it was curated with (tasks.py changed since?); delete {data_dir} and curate it "
                         "again")
    return image


def with_pil(messages, data_dir):
    """Messages of a data file with every image part's path replaced by its PIL image (what encode_conversation
    takes)."""
    return [{**m, "content": [{"type": "image", "image": open_image(p, data_dir)} if p["type"] == "image" else p
                              for p in m["content"]]} if isinstance(m["content"], list) else m
            for m in messages]


def image_digest(image):
    """A short hash of an image's pixels, size and mode: a regenerated image is checked against it."""
    h = hashlib.sha256(f"{image.mode} {image.width}x{image.height} ".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:16]


def extract_answer(text):
    """The last balanced \\boxed{...} inside the last <response>...</response>; None if absent."""
    responses = re.findall(r"<response>(.*?)</response>", text or "", re.S)
    if not responses:
        return None
    r = responses[-1]
    # from the last \boxed{ backwards: an unclosed last one falls back to an earlier balanced one
    for start in reversed([m.end() for m in re.finditer(r"\\boxed\{", r)]):
        depth = 1
        for j in range(start, len(r)):
            depth += {"{": 1, "}": -1}.get(r[j], 0)
            if depth == 0:
                return r[start:j].strip()
    return None


def is_format_valid(assistant_turns):
    """Each turn: one <think> block, then exactly one tool call (every turn but the last) or
    response (the last turn)."""
    if not assistant_turns:
        return False
    for i, turn in enumerate(assistant_turns):
        action = "response" if i == len(assistant_turns) - 1 else "tool_call"
        for tag in ("think", "tool_call", "response"):
            want = 1 if tag in ("think", action) else 0
            if turn.count(f"<{tag}>") != want or turn.count(f"</{tag}>") != want:
                return False
        # each tag occurs exactly once, so index() finds it: the think block must close before the action opens
        if not (turn.index("<think>") < turn.index("</think>") <= turn.index(f"<{action}>")
                < turn.index(f"</{action}>")):
            return False
    return True


def _norm(s):
    return " ".join(str(s).lower().split())


def _letter(s):
    # 'B', '(b)', 'B.', 'b:' -> 'B'; 'B because ...' -> None
    m = re.fullmatch(r"\(?\s*([a-d])\s*\)?[.:]?", s.strip().lower())
    return m.group(1).upper() if m else None


def score(example, answer):
    """1.0 for a correct answer, else 0.0; lenient about form, strict about content."""
    if answer is None:
        return 0.0
    task, meta = example["task"], example["meta"]
    if task == "vsp_nav":
        # any route that reaches the gift safely scores, not only the reference
        moves = parse_moves(str(answer))
        return float(moves is not None and replay(meta, moves, "stay"))
    if task == "vsp_verify":
        # 'Yes.' and 'yes!' count
        return float(_norm(answer).strip(".!") == example["answer"].lower())
    if task in ("jigsaw", "vstar"):
        options = [_norm(o) for o in meta.get("options", [])]  # vstar also accepts the option's text
        given = _letter(str(answer)) or (LETTERS[options.index(_norm(answer))] if _norm(answer) in options else None)
        return float(given == example["answer"])
    # guiqa: the field's exact value, up to case and runs of whitespace
    return float(_norm(answer) == _norm(example["answer"]))


def save_png(image, path):
    """Write `image` as a lossless PNG (to a path or a file object) at zlib level 1: on the tasks' noisy canvases PIL's
    default level 6 takes about 4x as long for files about 12% smaller."""
    image.save(path, format="PNG", compress_level=1)


def save(examples, dir):
    """examples.jsonl plus one PNG per image under images/ (paths relative to dir)."""
    os.makedirs(os.path.join(dir, "images"), exist_ok=True)
    with open(os.path.join(dir, "examples.jsonl"), "w", encoding="utf-8") as f:
        for ex in examples:
            paths = []  # relative to dir, so a saved dataset can be moved
            for k, img in enumerate(ex["images"]):
                paths.append(f"images/{ex['id']}_{k + 1}.png")
                save_png(img, os.path.join(dir, paths[-1]))
            f.write(json.dumps({**ex, "images": paths}) + "\n")


class InputError(ValueError):
    """Input the user can fix (a data file, a model directory, a checkpoint): the message names the file and what is
    wrong; a stage run from the command line prints it as one line and exits with status 2 (rollout.cli)."""


def read_jsonl(path, keys, parse):
    """parse(record) for every line of a JSONL file; a missing file or malformed line raises InputError naming both."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                record = json.loads(line)
                missing = set(keys) - set(record)
                if missing:
                    raise ValueError(f"missing keys {sorted(missing)}")
                out.append(parse(record))
            except (ValueError, KeyError, TypeError, OSError) as e:
                raise InputError(f"{path}, line {lineno}: malformed record: {e}") from None
    return out


def load(dir):
    """Examples with PIL images; a malformed record raises ValueError naming file and line."""
    def parse(ex):
        if ex["task"] not in TASKS or not isinstance(ex["images"], list):
            raise ValueError(f"bad task {ex['task']!r} or images {ex['images']!r}")
        images = []
        for p in ex["images"]:
            with Image.open(os.path.join(dir, p)) as im:
                images.append(im.convert("RGB"))
        return {**ex, "images": images}
    return read_jsonl(os.path.join(dir, "examples.jsonl"), ("id", "task", "question", "images", "answer", "meta"),
                      parse)

# -----------------------------------------------------------------------------
# The authors' RL data (a verl parquet: data_source, prompt, images, reward_model, extra_info) for the sources
# this project scores exactly: path_nav (a route replayed on the ground-truth map), path_ver (yes / no) and
# jigsaw* (the letter). Others need the authors' LLM judge and are skipped.

PARQUET_COLUMNS = ("data_source", "prompt", "images", "reward_model", "extra_info")


def map_meta(text):
    """A FrozenLake map as the parquet holds it ("[['F', 'S', ...], ...]": S start, G goal, H hole, F ice) -> our
    vsp_nav meta (square grid, cells as (column, row))."""
    import ast
    rows = ast.literal_eval(text)
    n = len(rows)
    if not n or any(len(r) != n for r in rows):
        raise ValueError(f"the map is not a square grid: {text[:80]}")
    cells = {(c, r): v for r, row in enumerate(rows) for c, v in enumerate(row)}  # (column, row) -> one of S, G, H, F
    find = [k for k, v in cells.items() if v == "S"], [k for k, v in cells.items() if v == "G"]
    if len(find[0]) != 1 or len(find[1]) != 1:
        raise ValueError(f"the map needs one S and one G: {text[:80]}")
    return {"grid": n, "start": find[0][0], "goal": find[1][0], "holes": [k for k, v in cells.items() if v == "H"],
            "level": n}


def read_parquet(path):
    """RL prompts from the authors' parquet -> (examples in this project's format, {skipped source: count}).
    The question is the user turn without its <image> placeholders; the images are decoded from their bytes."""
    import io
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's errors have no common base class worth naming
        raise InputError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    missing = [c for c in PARQUET_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: missing columns {missing} (the authors' RL layout has {list(PARQUET_COLUMNS)})")
    examples, skipped = [], {}
    for i, row in enumerate(table.to_pylist()):
        source = row["data_source"]
        # path_nav, path_ver and jigsaw* score exactly here; the others need the authors' LLM judge
        task = {"path_nav": "vsp_nav", "path_ver": "vsp_verify"}.get(source) or \
            ("jigsaw" if str(source).startswith("jigsaw") else None)
        if task is None:
            skipped[source] = skipped.get(source, 0) + 1
            continue
        try:
            # the first user turn: the question, with one <image> placeholder per image
            user = [m for m in row["prompt"] if m["role"] == "user"][0]["content"]
            images = [Image.open(io.BytesIO(im["bytes"])).convert("RGB") for im in row["images"]]
            if user.count("<image>") != len(images):
                raise ValueError(f"{user.count('<image>')} <image> placeholders but {len(images)} images")
            truth = str(row["reward_model"]["ground_truth"])
            info = row["extra_info"] or {}
            if task == "vsp_nav":  # the reference answer is a shortest route; any safe route scores
                meta = map_meta(truth)
                answer = ",".join(astar(meta["start"], meta["goal"], set(meta["holes"]), meta["grid"],
                                        meta["grid"]) or [])
            elif task == "vsp_verify":
                meta, answer = {"level": "parquet"}, {"yes": "Yes", "no": "No"}[truth.strip().lower()]
            else:
                # jigsaw: the option letter, from extra_info's answer or the ground truth
                meta, answer = {"level": "parquet"}, str(info.get("answer") or truth).strip().upper()[:1]
        except (ValueError, KeyError, TypeError, IndexError, OSError) as e:
            raise InputError(f"{path}, row {i} ({source}): malformed RL record: {e}") from None
        examples.append({"id": f"{source}-{info.get('index', i)}", "task": task, "images": images, "answer": answer,
                         "question": re.sub(r"\n?<image>", "", user).strip(), "meta": meta})
    return examples, skipped
