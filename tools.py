"""
The seven visual tools of AdaReasoner, their JSON schemas, argument validation and call_tool.

Every tool computes from the pixels of the images it is given and from its arguments,
never from a task's hidden metadata. A tool call never raises and never hangs: everything
that goes wrong becomes a ToolResult(status="error") whose message names (in single
quotes) the argument or tool to fix. `python bench.py tools` prints each tool's latency.
"""
import copy
import heapq
import json
import math
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

MAX_SIDE = 1024        # longest side of any image a tool returns
CROP_MIN_SIDE = 224    # Crop zooms until the short side is at least this (the model's input side)
CROP_POINT_SIDE = 40   # Crop given a point [x, y]: the side of the square cut around it (a vstar target is 14-22 px)
MAX_COORD = 100_000    # pixel coordinates beyond this are a model's typo, not a real image
MAX_TEXT = 500         # longest free-text argument

# -----------------------------------------------------------------------------
# the project's bitmap font: 5x7 glyphs, drawn by tasks.py and read back by OCR

FONT_W, FONT_H = 5, 7
_GLYPHS = """
A .###. #...# #...# ##### #...# #...# #...#
B ####. #...# #...# ####. #...# #...# ####.
C .###. #...# #.... #.... #.... #...# .###.
D ####. #...# #...# #...# #...# #...# ####.
E ##### #.... #.... ####. #.... #.... #####
F ##### #.... #.... ####. #.... #.... #....
G .###. #...# #.... #.### #...# #...# .####
H #...# #...# #...# ##### #...# #...# #...#
I .###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.
J ..### ...#. ...#. ...#. ...#. #..#. .##..
K #...# #..#. #.#.. ##... #.#.. #..#. #...#
L #.... #.... #.... #.... #.... #.... #####
M #...# ##.## #.#.# #.#.# #...# #...# #...#
N #...# #...# ##..# #.#.# #..## #...# #...#
O .###. #...# #...# #...# #...# #...# .###.
P ####. #...# #...# ####. #.... #.... #....
Q .###. #...# #...# #...# #.#.# #..#. .##.#
R ####. #...# #...# ####. #.#.. #..#. #...#
S .#### #.... #.... .###. ....# ....# ####.
T ##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..
U #...# #...# #...# #...# #...# #...# .###.
V #...# #...# #...# #...# #...# .#.#. ..#..
W #...# #...# #...# #.#.# #.#.# #.#.# .#.#.
X #...# #...# .#.#. ..#.. .#.#. #...# #...#
Y #...# #...# .#.#. ..#.. ..#.. ..#.. ..#..
Z ##### ....# ...#. ..#.. .#... #.... #####
a ..... ..... .###. ....# .#### #...# .####
b #.... #.... #.##. ##..# #...# #...# ####.
c ..... ..... .###. #.... #.... #...# .###.
d ....# ....# .##.# #..## #...# #...# .####
e ..... ..... .###. #...# ##### #.... .###.
f ..##. .#..# .#... ###.. .#... .#... .#...
g ..... .#### #...# #...# .#### ....# .###.
h #.... #.... #.##. ##..# #...# #...# #...#
i ..#.. ..... .##.. ..#.. ..#.. ..#.. .###.
j ...#. ..... ..##. ...#. ...#. #..#. .##..
k #.... #.... #..#. #.#.. ##... #.#.. #..#.
l .##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.
m ..... ..... ##.#. #.#.# #.#.# #...# #...#
n ..... ..... #.##. ##..# #...# #...# #...#
o ..... ..... .###. #...# #...# #...# .###.
p ..... ..... ####. #...# ####. #.... #....
q ..... ..... .##.# #..## .#### ....# ....#
r ..... ..... #.##. ##..# #.... #.... #....
s ..... ..... .###. #.... .###. ....# ####.
t .#... .#... ###.. .#... .#... .#..# ..##.
u ..... ..... #...# #...# #...# #..## .##.#
v ..... ..... #...# #...# #...# .#.#. ..#..
w ..... ..... #...# #...# #.#.# #.#.# .#.#.
x ..... ..... #...# .#.#. ..#.. .#.#. #...#
y ..... ..... #...# #...# .#### ....# .###.
z ..... ..... ##### ...#. ..#.. .#... #####
0 .###. #...# #..## #.#.# ##..# #...# .###.
1 ..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.
2 .###. #...# ....# ...#. ..#.. .#... #####
3 ##### ...#. ..#.. ...#. ....# #...# .###.
4 ...#. ..##. .#.#. #..#. ##### ...#. ...#.
5 ##### #.... ####. ....# ....# #...# .###.
6 ..##. .#... #.... ####. #...# #...# .###.
7 ##### ....# ...#. ..#.. .#... .#... .#...
8 .###. #...# #...# .###. #...# #...# .###.
9 .###. #...# #...# .#### ....# ...#. .##..
. ..... ..... ..... ..... ..... .##.. .##..
, ..... ..... ..... ..... .##.. ..#.. .#...
: ..... .##.. .##.. ..... .##.. .##.. .....
; ..... .##.. .##.. ..... .##.. ..#.. .#...
- ..... ..... ..... ##### ..... ..... .....
_ ..... ..... ..... ..... ..... ..... #####
/ ..... ....# ...#. ..#.. .#... #.... .....
@ .###. #...# #.### #.#.# #.### #.... .###.
# .#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.
$ ..#.. .#### #.#.. .###. ..#.# ####. ..#..
% ##... ##..# ...#. ..#.. .#... #..## ...##
( ...#. ..#.. .#... .#... .#... ..#.. ...#.
) .#... ..#.. ...#. ...#. ...#. ..#.. .#...
' ..#.. ..#.. .#... ..... ..... ..... .....
+ ..... ..#.. ..#.. ##### ..#.. ..#.. .....
& .##.. #..#. #.#.. .#... #.#.# #..#. .##.#
! ..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..
? .###. #...# ....# ...#. ..#.. ..... ..#..
= ..... ..... ##### ..... ##### ..... .....
"""
# FONT[i] is the glyph of FONT_CHARS[i]: draw_text and OCR both index glyphs by that position
FONT_CHARS = " " + "".join(line[0] for line in _GLYPHS.strip().splitlines())
FONT = np.zeros((len(FONT_CHARS), FONT_H, FONT_W), dtype=bool)  # index 0 is the space
# each _GLYPHS line: its character, then 7 rows of 5 columns, '#' ink and '.' blank
for _i, _line in enumerate(_GLYPHS.strip().splitlines(), start=1):
    FONT[_i] = [[c == "#" for c in row] for row in _line[2:].split()]


def text_size(text, scale=1):
    """(width, height) in pixels of a line drawn by draw_text: one blank column between glyphs."""
    return (len(text) * (FONT_W + 1) - 1) * scale, FONT_H * scale


def draw_text(img, xy, text, color=(0, 0, 0), scale=1):
    """Draw one line of text with the bitmap font into a PIL RGB image, crisp (no antialiasing)."""
    missing = set(text) - set(FONT_CHARS)
    assert not missing, f"characters {sorted(missing)} are not in the font"
    cells = FONT[[FONT_CHARS.index(c) for c in text]]                   # (n, 7, 5)
    cells = np.pad(cells, ((0, 0), (0, 0), (0, 1)))                      # the gap column
    # glyphs side by side, (7, n * 6) minus the trailing gap column: exactly text_size wide
    mask = cells.transpose(1, 0, 2).reshape(FONT_H, -1)[:, :-1]
    mask = np.kron(mask, np.ones((scale, scale), dtype=bool))  # one font pixel -> a scale x scale block
    # the mask as paste's alpha: only ink pixels change, the background stays
    img.paste(tuple(color), xy, Image.fromarray(mask.astype(np.uint8) * 255))

# -----------------------------------------------------------------------------
# the vocabulary Point understands; tasks.py paints its scenes with these colours

COLOURS = {  # the search scenes (vstar); similar pairs on purpose: red/orange/pink, blue/purple
    "red": (215, 40, 40), "orange": (240, 140, 20), "yellow": (230, 200, 20),
    "green": (40, 160, 60), "blue": (40, 90, 215), "purple": (135, 60, 190),
    "pink": (235, 110, 170), "brown": (130, 80, 40),
}
SHAPES = ("circle", "square", "triangle", "star")
SCENE = {  # FrozenLake objects: each is painted in a few colours, all of which belong to it
    "elf": [(40, 140, 70), (240, 195, 150)],        # tunic, face
    "gift": [(200, 30, 45), (245, 200, 40)],        # box, ribbon
    "hole": [(20, 50, 95), (45, 85, 135)],          # water, ripples
}
# a word Point accepts for a scene object -> the SCENE key whose paint colours it looks for
SYNONYMS = {
    "elf": "elf", "player": "elf", "start": "elf", "person": "elf", "character": "elf", "agent": "elf",
    "gift": "gift", "goal": "gift", "present": "gift", "box": "gift", "treasure": "gift",
    "hole": "hole", "obstacle": "hole", "water": "hole", "trap": "hole",
}
# 'rectangle' counts as a square: the search scenes draw no other rectangle
_SHAPE_WORDS = {"circle": "circle", "dot": "circle", "disk": "circle", "ball": "circle",
                "square": "square", "rectangle": "square", "triangle": "triangle", "star": "star"}

# -----------------------------------------------------------------------------
# helpers: argument validation (ToolError -> an error result) and connected components


class ToolError(Exception):
    """A problem the model can fix; the message goes back to it verbatim."""


@dataclass
class ToolResult:
    status: str                        # "success" | "error"
    data: dict = field(default_factory=dict)  # JSON fields, merged into the observation next to name and status
    image: Image.Image | None = None  # a tool-made image: the rollout appends it as img_{k+1}
    error: str | None = None


def _short(v, n=60):
    # errors quote the value the model sent, cut to n characters so a huge argument cannot flood the context
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[:n] + "..."


def _numbers(args, name, count):
    """A list of `count` finite numbers; models also send them as a string "[x1, y1, x2, y2]"."""
    v = args[name]
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            raise ToolError(f"argument '{name}' must be a list of {count} numbers; got {_short(args[name])}")
    # bool is a subclass of int: True must not pass as the coordinate 1, nor NaN or inf as a pixel
    ok = isinstance(v, (list, tuple)) and len(v) == count and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    if not ok:
        raise ToolError(f"argument '{name}' must be a list of {count} finite numbers; got {_short(args[name])}")
    if any(x < 0 or x > MAX_COORD for x in v):
        raise ToolError(f"argument '{name}' must hold pixel coordinates between 0 and {MAX_COORD}; got {_short(v)}")
    return [int(round(x)) for x in v]  # fractional pixels round to the nearest whole pixel


def _image(args, name, images):
    v = args[name]
    # img_1..img_N, 1-based, in the order images joined the trajectory: the inputs, then each tool-made one
    m = re.fullmatch(r"\s*img_(\d+)\s*", v) if isinstance(v, str) else None
    if not m or not 1 <= int(m.group(1)) <= len(images):
        have = f"img_1 to img_{len(images)}" if images else "no images yet"
        raise ToolError(f"argument '{name}' must name an image ({have}); got {_short(v)}")
    img = images[int(m.group(1)) - 1]
    return img if img.mode == "RGB" else img.convert("RGB")  # the tools read pixels as (h, w, 3) arrays


def _box(args, name, img, img_name):
    x1, y1, x2, y2 = _numbers(args, name, 4)
    w, h = img.size
    # x2, y2 exclusive (PIL's crop box): a box may touch the right and bottom edge but never be empty
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise ToolError(f"argument '{name}' must be [x1, y1, x2, y2] with x1 < x2, y1 < y2 inside "
                        f"{img_name} ({w}x{h}); got {_short(args[name])}")
    return x1, y1, x2, y2


def _int(args, name, default, lo, hi):
    v = args.get(name, default)
    if isinstance(v, float) and v.is_integer():  # models write 64.0 for 64 as often as not
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ToolError(f"argument '{name}' must be an integer from {lo} to {hi}; got {_short(v)}")
    return v


def _text(args, name, default=None):
    v = args.get(name, default)
    if not isinstance(v, str) or not v.strip() or len(v) > MAX_TEXT:
        raise ToolError(f"argument '{name}' must be a non-empty string of at most {MAX_TEXT} characters; got "
                        f"{_short(v)}")
    return v


def components(mask, min_area=1):
    """Boxes [x1, y1, x2, y2] (x2, y2 exclusive) and areas of the 8-connected components of
    a boolean mask, in reading order. Union-find over horizontal runs: a few hundred runs
    per scene, so a Python loop over them is fast where a per-pixel one would not be."""
    h, w = mask.shape
    # a False column padded on each side, so every run has both edges; d is (h, w + 1): +1 at a run's first
    # column, -1 one past its last
    d = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    ys, xs = np.divmod(np.flatnonzero(d), w + 1)            # row-major: start, end, start, end...
    ry, rx0, rx1 = ys[0::2], xs[0::2], xs[1::2]  # per run: row, first column, end column (exclusive)
    parent = list(range(len(ry)))  # union-find over runs, not pixels

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving: trees stay flat without recursion
            i = parent[i]
        return i
    # the runs of row y are row_start[y]:row_start[y + 1] (ry is sorted: runs come in row-major order)
    row_start = np.searchsorted(ry, np.arange(h + 1))
    # join every run to the runs of the row above that touch it; both rows are sorted left to right, so `a`
    # only moves forward and each pair of rows is one linear sweep
    for y in range(1, h):
        a, b = row_start[y - 1], row_start[y]
        for j in range(b, row_start[y + 1]):
            while a < b and rx1[a] < rx0[j]:  # runs above that end left of this one, diagonals included
                a += 1
            k = a
            while k < b and rx0[k] <= rx1[j]:  # starts at most one column past this run: touching
                parent[find(k)] = find(j)
                k += 1
    if not parent:
        return []
    # roots -> dense labels 0..n-1, one per component; run i belongs to component label[i]
    _, label = np.unique([find(i) for i in range(len(ry))], return_inverse=True)
    n = label.max() + 1
    area = np.bincount(label, rx1 - rx0, n)  # pixels per component: its run lengths summed
    # bounding boxes by scattered min / max over each component's runs; y2 is the last row + 1, exclusive like x2
    x1, y1 = np.full(n, w), np.full(n, h)
    x2, y2 = np.zeros(n, int), np.zeros(n, int)
    np.minimum.at(x1, label, rx0), np.minimum.at(y1, label, ry)
    np.maximum.at(x2, label, rx1), np.maximum.at(y2, label, ry + 1)
    boxes = [([int(x1[i]), int(y1[i]), int(x2[i]), int(y2[i])], int(area[i])) for i in range(n) if area[i] >= min_area]
    boxes.sort(key=lambda b: (b[0][1], b[0][0]))  # reading order: top edge, then left edge
    return boxes


# -----------------------------------------------------------------------------
# Point: ground the scene vocabulary in pixels


def _words(description):
    out = []
    for w in re.findall(r"[a-z]+", description.lower()):
        # the word, then without a plural 's' or 'es' ('holes', 'boxes'): the first known form counts
        for cand in (w, w[:-1] if w.endswith("s") else None, w[:-2] if w.endswith("es") else None):
            if cand and (cand in SYNONYMS or cand in COLOURS or cand in _SHAPE_WORDS):
                out.append(cand)
                break
    return out


def _shape_of(mask_crop):
    """Upright shapes differ in how much of their bounding box they fill; a triangle and a
    star fill about as much, but only the triangle stands on a full bottom row."""
    fill = mask_crop.mean()
    if fill >= 0.66:  # a disc fills pi / 4 = 0.79 of its box, a square ~1, a triangle 0.5
        return "square" if fill >= 0.9 else "circle"
    return "triangle" if mask_crop[-1].mean() > 0.7 else "star"  # a star's bottom row: two tips


def point(args, images):
    img = _image(args, "image", images)
    description = _text(args, "description")
    words = _words(description)
    objects = [SYNONYMS[w] for w in words if w in SYNONYMS]
    colours = [w for w in words if w in COLOURS]
    shapes = [_SHAPE_WORDS[w] for w in words if w in _SHAPE_WORDS]
    if not (objects or colours or shapes):
        raise ToolError(f"argument 'description' names nothing 'Point' knows ({_short(description)}); use "
                        "elf/player/start, gift/goal/present, hole/obstacle, or colour and shape words")
    a = np.asarray(img)
    # every colour Point knows is saturated, the ice and canvas backgrounds are not: measure
    # colour distances only where a pixel is saturated, a few percent of a large canvas
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    ys, xs = np.divmod(np.flatnonzero(np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b) > 40),
                       a.shape[1])
    px = a[ys, xs].T.astype(np.int32)[:, :, None]                       # (3, pixels, 1)

    def dist2(colours):                                                  # (pixels, colours)
        return sum((px[k] - np.array(colours)[:, k]) ** 2 for k in range(3))
    if objects:  # a scene object: every pixel close to one of its paint colours
        hit = (dist2([c for o in objects for c in SCENE[o]]) < 45 ** 2).any(-1)
        min_area = 60  # pixels: a fringe of stray pixels is not one of the 56-px objects
    else:        # search scenes: nearest palette colour, so that similar colours stay apart
        d = dist2(list(COLOURS.values()))
        hit = d.min(-1) < 60 ** 2
        if colours:
            # a colour word keeps the pixels whose nearest palette colour is that one: orange never passes as red
            hit &= np.isin(d.argmin(-1), [list(COLOURS).index(c) for c in colours])
        min_area = 12  # vstar objects are 12-26 px a side, their areas far above this
    # the hits back on a full (h, w) mask, for the connected components
    mask = np.zeros(a.shape[:2], bool)
    mask[ys[hit], xs[hit]] = True
    points = []
    for (x1, y1, x2, y2), _ in components(mask, min_area):
        # a shape word filters the search scenes only, and only the first one counts
        if shapes and not objects and _shape_of(mask[y1:y2, x1:x2]) != shapes[0]:
            continue
        points.append([(x1 + x2) // 2, (y1 + y2) // 2])  # the box centre, [x, y] in pixels
    return ToolResult("success", {"points": sorted(points, key=lambda p: (p[1], p[0]))})

# -----------------------------------------------------------------------------
# AStar: shortest 4-connected path on a grid of cells

MOVES = {"R": (1, 0), "D": (0, 1), "L": (-1, 0), "U": (0, -1)}


def astar(start, goal, blocked, cols, rows):
    """Shortest path of moves from cell start to cell goal ((col, row) tuples), None if unreachable."""
    # heap of (f = g + Manhattan distance to the goal, g, cell): among equal f the smaller g pops first
    frontier = [(abs(goal[0] - start[0]) + abs(goal[1] - start[1]), 0, start)]
    came = {start: None}  # cell -> (previous cell, move); a cell is claimed when first pushed
    while frontier:
        _, g, cell = heapq.heappop(frontier)
        if cell == goal:
            path = []
            # follow the back-pointers from the goal to the start, then reverse
            while came[cell]:
                cell, move = came[cell]
                path.append(move)
            return path[::-1]
        for move, (dx, dy) in MOVES.items():
            nxt = (cell[0] + dx, cell[1] + dy)
            if 0 <= nxt[0] < cols and 0 <= nxt[1] < rows and nxt not in blocked and nxt not in came:
                came[nxt] = (cell, move)
                h = abs(goal[0] - nxt[0]) + abs(goal[1] - nxt[1])
                heapq.heappush(frontier, (g + 1 + h, g + 1, nxt))
    return None


def astar_tool(args, images):
    cell = _int(args, "cell_size", 64, 1, 4096)  # pixels per cell; 64 is tasks.CELL
    # pixel [x, y] -> cell (column, row) by integer division: any pixel inside a cell names that cell
    start, goal = (tuple(v // cell for v in _numbers(args, k, 2)) for k in ("start", "goal"))
    obstacles = args["obstacles"]
    if isinstance(obstacles, str):
        try:
            obstacles = json.loads(obstacles)
        except ValueError:
            pass  # not JSON: the list check below reports it
    if not isinstance(obstacles, list) or len(obstacles) > 4096:
        raise ToolError("argument 'obstacles' must be a list of [x, y] pixel points (at most 4096); got "
                        f"{_short(args['obstacles'])}")
    blocked = set()
    for i, o in enumerate(obstacles):
        try:
            blocked.add(tuple(v // cell for v in _numbers({"o": o}, "o", 2)))
        except ToolError:
            raise ToolError(f"argument 'obstacles' must be a list of [x, y] pixel points; item {i} is {_short(o)}")
    if "grid_size" in args:
        g = args["grid_size"]
        # one number: a square grid
        g = [g, g] if isinstance(g, (int, float)) and not isinstance(g, bool) else g
        cols, rows = _numbers({"grid_size": g}, "grid_size", 2) if isinstance(g, (list, str)) else (None, None)
        # 256 cells a side bounds the search's time and memory; 0 or a non-list lands here too
        if not cols or not rows or cols > 256 or rows > 256:
            raise ToolError("argument 'grid_size' must be an integer or [cols, rows] from 1 to 256 cells; got "
                            f"{_short(args['grid_size'])}")
    else:
        # no grid_size: the grid ends at the farthest cell named, so the path cannot detour beyond it
        cells = [start, goal, *blocked]
        cols, rows = max(c[0] for c in cells) + 1, max(c[1] for c in cells) + 1
        if cols > 256 or rows > 256:
            raise ToolError(f"points span more than 256 cells of 'cell_size' {cell}; pass 'grid_size' or a larger "
                            "'cell_size'")
    for name, c in (("start", start), ("goal", goal)):
        if not (c[0] < cols and c[1] < rows):
            raise ToolError(f"argument '{name}' lies in cell {list(c)}, outside the {cols}x{rows} grid of 'grid_size'")
        if c in blocked:
            raise ToolError(f"argument '{name}' lies in cell {list(c)}, which is also listed in 'obstacles'")
    path = astar(start, goal, blocked, cols, rows)
    if path is None:
        raise ToolError(f"the 'goal' cell {list(goal)} is unreachable from the 'start' cell {list(start)}: "
                        f"the 'obstacles' block every path on the {cols}x{rows} grid")
    return ToolResult("success", {"path": ",".join(path)})

# -----------------------------------------------------------------------------
# Draw2DPath: draw a move sequence as arrows


def parse_moves(text):
    """'R,R,D', 'RRD', 'r r d', 'right, down' -> ['R', 'R', 'D']; None if anything else is in it."""
    # whole words first ('right' -> 'r'), then every separator models write: spaces, commas, arrows, brackets
    s = re.sub(r"right|left|up|down", lambda m: m.group(0)[0], text.lower())
    s = re.sub(r"[\s,;>→\-\[\]()'\"]+", "", s)
    return list(s.upper()) if re.fullmatch(r"[lrud]*", s) else None


# magenta is the default: no scene object is painted in it, so Point still works on a drawn image
LINE_COLOURS = {**COLOURS, "magenta": (255, 0, 255), "black": (0, 0, 0), "white": (255, 255, 255)}


def _colour(v):
    if v.strip().lower() in LINE_COLOURS:
        return LINE_COLOURS[v.strip().lower()]
    m = re.fullmatch(r"#([0-9a-fA-F]{6})", v.strip())
    if not m:
        raise ToolError(f"argument 'line_color' must be a colour name ({', '.join(LINE_COLOURS)}) or '#rrggbb'; got "
                        f"{_short(v)}")
    return tuple(int(m.group(1)[i:i + 2], 16) for i in (0, 2, 4))  # '#rrggbb' -> (r, g, b)


def draw_2d_path(args, images):
    img = _image(args, "image", images).copy()
    x, y = _numbers(args, "start_point", 2)
    # only the start must be inside; later moves may leave the image (PIL clips what it draws)
    if not (x < img.width and y < img.height):
        raise ToolError(f"argument 'start_point' must lie inside {args['image']} ({img.width}x{img.height}); got "
                        f"{[x, y]}")
    moves = parse_moves(_text(args, "directions"))
    if not moves:
        raise ToolError("argument 'directions' must be moves like 'R,R,D' (R right, L left, U up, D down); got "
                        f"{_short(args['directions'])}")
    step = _int(args, "step", 64, 1, 1024)
    colour = _colour(_text(args, "line_color", "magenta"))
    draw = ImageDraw.Draw(img)
    width = max(2, step // 16)  # pixels: 4 for 64-px cells
    for m in moves:
        dx, dy = MOVES[m]
        nx, ny = x + dx * step, y + dy * step
        draw.line([(x, y), (nx, ny)], fill=colour, width=width)
        head = max(4, step // 5)  # arrowhead: two short strokes back from the tip
        # each stroke: `head` px back along the move and head / 2 px out to one side ((dy, dx) is perpendicular)
        for side in (1, -1):
            draw.line([(nx, ny), (nx - dx * head + side * dy * head // 2, ny - dy * head + side * dx * head // 2)],
                      fill=colour, width=width)
        x, y = nx, ny
    return ToolResult("success", {"end_point": [x, y], "moves": len(moves)}, img)

# -----------------------------------------------------------------------------
# DetectBlackArea, InsertImage, Crop


def detect_black_area(args, images):
    img = _image(args, "image", images)
    threshold = _int(args, "threshold", 10, 0, 255)
    min_area = _int(args, "min_area", 100, 1, 10 ** 8)
    a = np.asarray(img)
    # every channel at most threshold: the jigsaw hole is 0, its picture never darker than 27 (tasks._picture)
    mask = (a[..., 0] <= threshold) & (a[..., 1] <= threshold) & (a[..., 2] <= threshold)
    boxes = [b for b, _ in components(mask, min_area)]  # [x1, y1, x2, y2], x2 and y2 exclusive
    return ToolResult("success", {"bounding_boxes": boxes})


def insert_image(args, images):
    base = _image(args, "base_image", images).copy()
    piece = _image(args, "image_to_insert", images)
    x1, y1, x2, y2 = _box(args, "coordinates", base, args["base_image"])
    if piece.size != (x2 - x1, y2 - y1):  # an exact fit is pasted untouched, so pixels survive
        piece = piece.resize((x2 - x1, y2 - y1), Image.BICUBIC)
    base.paste(piece, (x1, y1))
    return ToolResult("success", {"inserted_at": [x1, y1, x2, y2]}, base)


def crop(args, images):
    img = _image(args, "image", images)
    v = args["coordinates"]
    if isinstance(v, str):  # models send lists as strings too; _numbers parses them again below
        try:
            v = json.loads(v)
        except ValueError:
            pass
    if isinstance(v, (list, tuple)) and len(v) == 2:
        # a point, e.g. copied from Point's result: the square of CROP_POINT_SIDE px around it, clipped to the image.
        # A model that cannot do arithmetic (the tiny default) can still zoom on what it found, by copying.
        x, y = _numbers(args, "coordinates", 2)
        w, h = img.size
        if not (0 <= x < w and 0 <= y < h):
            raise ToolError(f"argument 'coordinates' as a point [x, y] must lie inside {args['image']} ({w}x{h}); "
                            f"got {_short(args['coordinates'])}")
        half = CROP_POINT_SIDE // 2
        x1, y1, x2, y2 = max(0, x - half), max(0, y - half), min(w, x + half), min(h, y + half)
    else:
        x1, y1, x2, y2 = _box(args, "coordinates", img, args["image"])
    out = img.crop((x1, y1, x2, y2))
    zoom = max(1.0, CROP_MIN_SIDE / min(out.size))  # upscale only: a large box keeps its pixels
    if zoom > 1:
        out = out.resize((round(out.width * zoom), round(out.height * zoom)), Image.BICUBIC)
    # call_tool then caps the long side at MAX_SIDE, which undoes part of the zoom of a long thin box
    return ToolResult("success", {"box": [x1, y1, x2, y2], "zoom": round(zoom, 2)}, out)

# -----------------------------------------------------------------------------
# OCR: find text lines, then match glyph templates at every plausible alignment


def _read(ink):
    """Decode one text line (a tight boolean box); the alignment whose glyphs explain the ink
    exactly wins. Returns (text, cost)."""
    h, w = ink.shape
    scale = 1 if h <= FONT_H else 2  # guiqa draws text at scale 1 (7 px tall) or 2 (14 px)
    best = ("", 1 << 30)  # (text, cost): cost counts the pixels the decoding gets wrong
    pitch = (FONT_W + 1) * scale  # pixels per glyph cell: 5 columns and the gap
    for dy in range(0, FONT_H - -(-h // scale) + 1):     # glyph rows above the top ink row
        for dx in range(0, FONT_W):                      # glyph columns left of the first ink column
            n = -(-(w + dx * scale) // pitch)  # glyph cells the line spans at this offset (ceil)
            # the ink placed at this offset in a glyph-aligned blank canvas, (7 * scale, n * pitch)
            region = np.zeros((FONT_H * scale, n * pitch), bool)
            region[dy * scale:dy * scale + h, dx * scale:dx * scale + w] = ink
            # the centre pixel of every scale x scale block: one sample per font pixel, (7, n, 6)
            cells = region.reshape(FONT_H, scale, n, FONT_W + 1, scale)[:, scale // 2, :, :, scale // 2]
            cells = cells.transpose(1, 0, 2)             # (n, 7, 6): 5 glyph columns + the gap
            # (n, characters): font pixels that differ from each glyph
            dist = (cells[:, None, :, :FONT_W] != FONT[None]).sum((2, 3))
            idx = dist.argmin(1)  # nearest glyph per cell; a blank cell reads as the space
            # re-render the decoding at full size: the cost also sees ink in gap columns and between the samples
            ideal = np.pad(FONT[idx], ((0, 0), (0, 0), (0, 1))).transpose(1, 0, 2).reshape(FONT_H, -1)
            cost = int((np.kron(ideal, np.ones((scale, scale), bool)) != region).sum())
            if cost < best[1]:
                best = ("".join(FONT_CHARS[i] for i in idx).strip(), cost)
            if cost == 0:  # an exact match: no other alignment can beat it
                return best
    return best


def ocr(args, images):
    img = _image(args, "image", images)
    ink = np.asarray(img.convert("L")) < 110  # dark text; the boxes, outlines and header (grey >= 185) stay out
    detections = []
    rows = np.flatnonzero(ink.any(1))
    # text lines: runs of ink rows; a glyph's own blank row (the 'i' dot, ':') is at most 2 px
    bands = np.split(rows, np.flatnonzero(np.diff(rows) > 3) + 1) if rows.size else []
    for band in bands:
        y1, y2 = band[0], band[-1] + 1  # y2 exclusive
        # the band's scale only sets the gap that splits it into segments; _read finds each segment's own
        scale = 1 if y2 - y1 <= FONT_H else 2
        cols = np.flatnonzero(ink[y1:y2].any(0))
        # labels and values on one row are further apart than any two words (space + glyph sides)
        for seg in np.split(cols, np.flatnonzero(np.diff(cols) > 12 * scale) + 1):
            x1, x2 = seg[0], seg[-1] + 1
            sub = ink[y1:y2, x1:x2]
            # a segment can be shorter than its band ('Help' beside the 2x title): trim it to its own ink rows
            ys = np.flatnonzero(sub.any(1))
            text, cost = _read(sub[ys[0]:ys[-1] + 1])
            if text and cost <= 2 * scale * scale:  # about two font pixels wrong at most
                detections.append({"text": text, "bbox": [int(x1), int(y1 + ys[0]), int(x2), int(y1 + ys[-1] + 1)]})
    return ToolResult("success", {"detections": detections})

# -----------------------------------------------------------------------------
# the registry, schemas and the entry point


def _schema(name, description, params, required):
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object",
                       "properties": {p: {"type": t, "description": d} for p, (t, d) in params.items()},
                       "required": required}}}


_IMG = "name of an image, e.g. 'img_1'"
_BOX = "[x1, y1, x2, y2] box in absolute pixels of the image, origin top-left"
# canonical name -> (the JSON schema the model sees, the implementation (args, images) -> ToolResult);
# this order is the order of schemas() and of the system prompt's tool list
TOOLS = {
    "Point": (_schema(
        "Point", "Find every object matching a description and return the pixel centres of each "
        "(an empty list when there is none). Understands: elf / player / start / person, "
        "gift / goal / present / box, hole / ice hole / obstacle / water, and colour words ("
        + ", ".join(COLOURS) + ") with shape words (" + ", ".join(SHAPES) + "), e.g. 'small red triangle'.",
        {"image": ("string", _IMG), "description": ("string", "what to find, e.g. 'elf', 'holes', 'blue star'")},
        ["image", "description"]), point),
    "Draw2DPath": (_schema(
        "Draw2DPath", "Draw a path of moves as arrows on an image, starting at a pixel point; returns the new image.",
        {"image": ("string", _IMG), "start_point": ("array", "[x, y] pixel where the path starts"),
         "directions": ("string", "moves separated by commas, R right, L left, U up, D down, e.g. 'R,R,D'"),
         "step": ("integer", "pixels per move (default 64, one grid cell)"),
         "line_color": ("string", "colour name or '#rrggbb' (default 'magenta')")},
        ["image", "start_point", "directions"]), draw_2d_path),
    "AStar": (_schema(
        "AStar", "Shortest path on a grid from start to goal avoiding obstacles (A* search, moves R/L/U/D). "
        "Points are pixel coordinates, mapped to cells of 'cell_size' pixels; pass 'grid_size' "
        "(the image size divided by the cell size) so the grid is not guessed from the farthest point. "
        "Returns the moves, e.g. 'R,R,D', or an error when the goal is unreachable.",
        {"start": ("array", "[x, y] pixel of the start"), "goal": ("array", "[x, y] pixel of the goal"),
         "obstacles": ("array", "list of [x, y] pixels of obstacles"),
         "cell_size": ("integer", "pixels per grid cell (default 64)"),
         "grid_size": ("array", "[cols, rows] of the grid in cells, or one integer for a square grid")},
        ["start", "goal", "obstacles"]), astar_tool),
    "DetectBlackArea": (_schema(
        "DetectBlackArea", "Find uniform black regions (e.g. a missing puzzle piece) and return their bounding boxes.",
        {"image": ("string", _IMG),
         "threshold": ("integer", "a pixel is black when every channel is at most this (default 10)"),
         "min_area": ("integer", "smallest region in pixels to report (default 100)")},
        ["image"]), detect_black_area),
    "InsertImage": (_schema(
        "InsertImage", "Paste an image into a box of another image (resized to fit the box); returns the new image.",
        {"base_image": ("string", _IMG + ", the image to paste into"),
         "image_to_insert": ("string", _IMG + ", the image to paste"),
         "coordinates": ("array", _BOX + " of the base image")},
        ["base_image", "image_to_insert", "coordinates"]), insert_image),
    "Crop": (_schema(
        "Crop", f"Cut a box out of an image and zoom it so its short side is at least {CROP_MIN_SIDE} pixels.",
        {"image": ("string", _IMG), "coordinates": ("array", _BOX + f", or a point [x, y] to zoom on the "
                                                    f"{CROP_POINT_SIDE}x{CROP_POINT_SIDE} px square around it")},
        ["image", "coordinates"]), crop),
    "OCR": (_schema(
        "OCR", "Read the text of a synthetic app screen (the project's 5x7 pixel font, dark text on a light "
        "background); returns one detection per text line or label with its bounding box, in reading order.",
        {"image": ("string", _IMG)}, ["image"]), ocr),
}


def tool_list(spec):
    """--tools and every tool mode: 'all' | 'none' (the direct-answer prompt) | names joined by ',' or '+' -> the
    canonical names offered, in the order given. An unknown name raises ValueError listing the known ones."""
    names = list(TOOLS) if spec == "all" else [] if spec == "none" else [t.strip() for t in re.split(r"[,+]", spec)
                                                                         if t.strip()]
    unknown = [t for t in names if t not in TOOLS]
    if unknown:
        raise ValueError(f"unknown tools {unknown}; tools are {list(TOOLS)}")
    return names


def schemas(names=None):
    """The JSON function schemas of the named tools (all by default), in registry order."""
    # copies: a caller may edit what it gets, the registry stays as written
    return [copy.deepcopy(s) for n, (s, _) in TOOLS.items() if names is None or n in names]


def _run(name, params, images):
    if name not in TOOLS:
        raise ToolError(f"unknown tool {_short(name)}; available: " + ", ".join(f"'{n}'" for n in TOOLS))
    schema, impl = TOOLS[name]
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except ValueError:
            raise ToolError(f"the parameters of '{name}' must be a JSON object; got {_short(params)}")
    if not isinstance(params, dict):
        raise ToolError(f"the parameters of '{name}' must be a JSON object; got {_short(params)}")
    # missing and unknown arguments are checked here for every tool; each tool checks its own values
    spec = schema["function"]["parameters"]
    missing = [p for p in spec["required"] if p not in params]
    extra = [p for p in params if p not in spec["properties"]]
    if missing or extra:
        expected = ", ".join(f"'{p}'" for p in spec["properties"])
        what = "; ".join(s for s in (
            missing and "missing argument " + ", ".join(f"'{p}'" for p in missing),
            extra and "unknown argument " + ", ".join(f"'{p}'" for p in extra)) if s)
        raise ToolError(f"{what} for tool '{name}'; it takes {expected}")
    return impl(params, images)


MAX_TOOL_THREADS = 16  # tool threads alive at once, those still running past their limit included
TOOL_SLOTS = threading.BoundedSemaphore(MAX_TOOL_THREADS)


def call_tool(name, params, images, timeout=5.0):
    """Run a tool on the trajectory's images (img_1 is images[0]). Never raises, never runs
    past `timeout` seconds (a worker thread does the work; we stop waiting for it).
    Python cannot stop a thread, so a call past its limit keeps its thread until the tool returns; each thread holds
    one of MAX_TOOL_THREADS slots until then, so hung tools can never pile up threads: with every slot held, a
    call waits up to `timeout` for one and otherwise reports that the tools are busy."""
    box = {}  # the worker writes here; a write after the timeout is never read

    def work():
        try:
            box["result"] = _run(name, params, images)
        except ToolError as e:
            box["result"] = ToolResult("error", error=str(e))
        except Exception as e:  # a bug or an input we did not foresee: still the model's turn to react
            box["result"] = ToolResult("error", error=f"tool {_short(name)} failed on these arguments: "
                                       f"{type(e).__name__}: {e}"[:500])
        finally:
            TOOL_SLOTS.release()  # only now: a hung call holds its slot for as long as its thread lives
    t0 = time.perf_counter()
    if not TOOL_SLOTS.acquire(timeout=timeout):
        return ToolResult("error", error=f"tool {_short(name)} timed out after {timeout} s: {MAX_TOOL_THREADS} earlier "
                                         "tool calls are still running past their limit")
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    # the wait for a slot counts against the same `timeout`
    worker.join(max(0.0, timeout - (time.perf_counter() - t0)))
    result = box.get("result")
    if result is None:  # still running: abandoned; its slot frees when it ends
        return ToolResult("error", error=f"tool {_short(name)} timed out after {timeout} s")
    if not isinstance(result, ToolResult):
        return ToolResult("error", error=f"tool {_short(name)} returned no result")
    # thumbnail() works in place and keeps the aspect ratio; copy first
    if result.image is not None and max(result.image.size) > MAX_SIDE:
        result.image = result.image.copy()
        result.image.thumbnail((MAX_SIDE, MAX_SIDE), Image.BICUBIC)
    return result


def observation(name, result, image_name=None):
    """The protocol's tool observation text for a result."""
    # one JSON line first (adl.Mapping.observation parses exactly that line), then the image's name
    if result.status == "success":
        text = json.dumps({"name": name, "status": "success", **result.data}, ensure_ascii=False)
    else:
        text = json.dumps({"name": name, "status": "error", "error": result.error}, ensure_ascii=False)
    if result.image is not None and image_name:
        text += "\nNew image generated and saved as: " + image_name
    return text


# -----------------------------------------------------------------------------
# The official protocol: the same seven tools as the authors' release shows them to its checkpoints (names,
# parameters, result fields), read from their public code (github.com/ssmisya/AdaReasoner, tool_server/
# tool_workers). Only the interface changes: every call runs the tool above that computes it.

OFFICIAL_NAMES = {"AStar": "AStarWithPixelCoordinate"}  # canonical -> official; the other six keep their names
_OFF_IMG = "The identifier of the image to analyze, e.g., 'img_1'"
_OFF_COORDS = ("string", "Coordinates in format '[x_min, y_min, x_max, y_max]', eg., '[100, 100, 200, 200]'. Only "
               "absolute pixel values (integers) are supported.")
OFFICIAL_SCHEMAS = {  # canonical name -> (description, {param: (type, description)}, required)
    "Point": ("Identify a point in the image based on a natural language description.",
              {"image": ("string", "The identifier of the image to edit, e.g., 'img_1'"),
               "description": ("string", "A natural language description of the point of interest, e.g., 'the "
                                         "dog's nose', 'center of the clock', 'the tallest tree'.")},
              ["image", "description"]),
    "Draw2DPath": ("Draw a path on an image following a sequence of directional commands",
                   {"image": ("string", "The image to draw on (image identifier)"),
                    "start_point": ("array", "Starting point coordinates [x, y]"),
                    "directions": ("string", "Direction sequence with 'u'=up, 'd'=down, 'l'=left, 'r'=right. "
                                             "Accepts both 'rruldd' format and comma-separated 'R,R,U,L,D,D' format."),
                    "step": ("integer", "Step size in pixels for each direction (default: 64)"),
                    "pixel_coordinate": ("boolean", "If true, start_point is in pixel coordinates; if false, in "
                                                    "grid coordinates (default: true)"),
                    "line_width": ("integer", "Width of the drawn line (default: 3)"),
                    "line_color": ("string", "Color of the line (default: 'red')")},
                   ["image", "start_point", "directions"]),
    "AStar": ("Find the shortest path from start to goal while avoiding obstacles using A* algorithm",
              {"start": ("array", "Starting point coordinates [x, y] in pixels, e.g., [100, 200]"),
               "goal": ("array", "Goal point coordinates [x, y] in pixels, e.g., [300, 400]"),
               "obstacles": ("array", "Array of obstacle coordinates [[x1, y1], [x2, y2], ...] in pixels, e.g., "
                                      "[[150, 150], [200, 250], [300, 300]]")},
              ["start", "goal", "obstacles"]),
    "DetectBlackArea": ("Detect pure black areas in an image and return their bounding boxes, prioritizing "
                        "rectangular regions",
                        {"image": ("string", "The image to analyze (image identifier)"),
                         "threshold": ("integer", "Brightness threshold (0-255) below which pixels are considered "
                                                  "black (default: 1)"),
                         "min_area": ("integer", "Minimum area (in pixels) for a region to be considered "
                                                 "(default: 200)")},
                        ["image"]),
    "InsertImage": ("Insert an image into a base image at a specified position defined by a bounding box",
                    {"base_image": ("string", "The base image to insert into (image identifier)"),
                     "image_to_insert": ("string", "The image to be inserted (image identifier)"),
                     "coordinates": _OFF_COORDS},
                    ["base_image", "image_to_insert", "coordinates"]),
    "Crop": ("Crop an image using specified bounding box coordinates. This tool returns the cropped image in base64 "
             "format along with its dimensions.",
             {"image": ("string", "The identifier of the image to crop, e.g., 'img_1'."), "coordinates": _OFF_COORDS},
             ["image", "coordinates"]),
    "OCR": ("Extracts and localizes text from the given image using OCR. Returns bounding boxes, recognized text, "
            "and confidence scores.", {"image": ("string", _OFF_IMG)}, ["image"]),
}
# what the official tools default to where ours differ (a call that leaves them out gets these)
OFFICIAL_DEFAULTS = {"Draw2DPath": {"line_color": "red"}, "DetectBlackArea": {"threshold": 1, "min_area": 200}}


def official_schemas(names=None):
    """The official function schemas of the named canonical tools (all by default), in registry order."""
    return [_schema(OFFICIAL_NAMES.get(n, n), *OFFICIAL_SCHEMAS[n]) for n in TOOLS if names is None or n in names]


def _official_params(canonical, params):
    """An official call's parameters -> ours: the official defaults, grid start points converted to pixels, and
    the parameters our tools do not take (line_width, pixel_coordinate, rect_similarity, resize) dropped."""
    if not isinstance(params, dict):
        return params  # ours reports the error
    p = {**OFFICIAL_DEFAULTS.get(canonical, {}), **params}  # the call's own values win
    if canonical == "Draw2DPath" and p.get("pixel_coordinate") is False:  # 1-based grid cell -> its centre pixel
        step = p.get("step", 64)
        p["start_point"] = [(c - 1) * step + step // 2 for c in p["start_point"]]
    # 'bbox' is taken as another name of Crop's box
    if canonical == "Crop" and "bbox" in p and "coordinates" not in p:
        p["coordinates"] = p.pop("bbox")
    known = TOOLS[canonical][0]["function"]["parameters"]["properties"]
    return {k: v for k, v in p.items() if k in known}


def _size(image):
    return {"width": image.width, "height": image.height}


def official_result(name, result, images, params):
    """Our result -> the official result fields (success: the tool's own fields, error_code 0; failure: status
    'failed', a message and an error code: 205 a missing argument, 201 another bad argument, 203 a failed run)."""
    if result.status != "success":
        err = result.error or ""
        code = 205 if "missing argument" in err else 201 if "argument" in err else 203
        return ToolResult("error", {"tool_response_from": name, "status": "failed", "message": err,
                                    "error_code": code}, error=err)
    d, image = result.data, result.image
    fields = {}  # the official field names, per tool
    if name == "Point":
        fields["points"] = [{"x": x, "y": y} for x, y in d["points"]]
        if not d["points"]:
            fields["message"] = "No valid points detected in the response."
        # the size of the image searched (Point returns no image)
        fields["image_dimensions_pixels"] = _size(_image(params, "image", images))
    elif name == "AStarWithPixelCoordinate":
        fields["path"] = d["path"]
    elif name == "Draw2DPath":
        fields["message"] = "Path drawn successfully"
    elif name == "DetectBlackArea":  # boxes as strings, as the official tool writes them
        fields["bounding_boxes"] = [str(list(b)) for b in d["bounding_boxes"]]
        fields["message"] = f"Found {len(d['bounding_boxes'])} black areas"
    elif name == "InsertImage":
        fields["message"] = "Image inserted successfully"
    elif name == "Crop":
        fields.update(message="Image cropped successfully using absolute coordinates.", image_dimensions_pixels=
                      _size(image))
    elif name == "OCR":  # our reader matches glyph templates exactly: confidence 1.0
        fields["detections"] = [{"label": x["text"], "confidence": 1.0, "pixel_bbox": dict(zip(
            ("x_min", "y_min", "x_max", "y_max"), x["bbox"]))} for x in d["detections"]]
        fields["image_dimensions_pixels"] = _size(_image(params, "image", images))
    return ToolResult("success", {"tool_response_from": name, "status": "success", **fields, "error_code": 0}, image)


def official_call(name, params, images, timeout=5.0):
    """Run a call written in the official protocol (its tool names and parameters) -> a ToolResult whose data are
    the official result fields. An unknown name fails as ours does."""
    # official name -> canonical; only AStar's differs
    canonical = {v: k for k, v in OFFICIAL_NAMES.items()}.get(name, name)
    if canonical not in TOOLS or name in OFFICIAL_NAMES:  # 'AStar' is our name, not an official one
        return official_result(name, ToolResult("error", error=f"Tool {_short(name)} not found."), images, params)
    result = call_tool(canonical, _official_params(canonical, params), images, timeout)
    return official_result(name, result, images, params)


def official_observation(name, result, image_name=None):
    """The official RL observation: the result's Python dict repr after a newline; a returned image adds the line
    naming it (the engine appends the image itself)."""
    # a result without official fields (rollout's own errors: an unparsable call, a too elongated image)
    # reads as error 201, a bad argument
    d = result.data if result.data else {"tool_response_from": name, "status": "failed", "message": result.error,
                                         "error_code": 201}
    text = f"\n{d!r}"
    if result.image is not None and image_name:
        text += f"\nNew image generated and saved as: {image_name}\n"
    return text
