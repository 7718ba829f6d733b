"""
Adaptive Learning (ADL): hide what a tool is called so the model has to learn what it does.

A Mapping renames every tool and every parameter to a random 6-character string and swaps
every description for a hand-written paraphrase. Training sees a fresh mapping per trajectory
(or per GRPO group); evaluation can use one per sample or per run. The rollout maps a model's
call back with `to_canonical` before the tool runs and shows it the observation through
`observation`, so the model only ever sees the randomized vocabulary. `apply` rewrites a whole
TC record the same way, and `apply(record, mapping.inverse())` undoes it exactly.
"""

import json
import random
import re
import string
from dataclasses import asdict, dataclass

# the seven tools of tools.TOOLS; randomize never draws one of these as a new name
CANONICAL_TOOLS = ["Point", "Draw2DPath", "AStar", "DetectBlackArea", "InsertImage", "Crop", "OCR"]
ALPHABET = string.ascii_lowercase + string.digits  # 36 symbols: 36^6 ~ 2.2e9 names of NAME_LENGTH
NAME_LENGTH = 6

# -----------------------------------------------------------------------------
# Paraphrase pools. Same meaning, different wording and structure. A paraphrase never names a
# tool (not even "point" or "crop" as plain words): the description must carry the semantics
# on its own, or renaming would not test anything.

# tool -> 8 paraphrases of its description, one drawn per mapping; each must match what the tool in
# tools.py returns, since the model learns the tool from this text alone
TOOL_POOL = {
    "Point": [  # tools.point: {'points': [[x, y], ...]}, pixel centres in reading order
        "Finds every object in an image that matches a short text description and returns the pixel centre [x, y] of "
        "each match; an empty list means nothing matched. Knows the scene words elf/player/start, gift/goal/present, "
        "hole/ice hole/obstacle, and colour and shape words.",
        "Object locator: give it an image and a phrase such as 'gift', 'ice hole' or 'red triangle', and it lists the "
        "[x, y] pixel centres of all matching objects (none found gives an empty list). Synonyms understood: elf = "
        "player = start, gift = goal = present, hole = ice hole = obstacle; colours and shapes too.",
        "Looks for objects described in words and reports where they are: a list of [x, y] centres in pixels, one per "
        "object found, or [] if there are none. It understands the game vocabulary (elf, player, start; gift, goal, "
        "present; hole, ice hole, obstacle) as well as colour and shape names.",
        "Use this to get the positions of things you can name. Returns the centre pixel [x, y] of each object that "
        "fits the description, possibly an empty list. Recognized terms: elf/player/start, gift/goal/present, hole/ice "
        "hole/obstacle, plus colours (red, green, blue, ...) and shapes (circle, square, triangle, ...).",
        "Returns pixel coordinates [[x, y], ...] of the centres of all objects in the image fitting a textual "
        "description. Vocabulary: the player (elf, start), the target (gift, goal, present), hazards (hole, ice hole, "
        "obstacle), and any colour or shape word. No match yields an empty list.",
        "Text-to-location search. Describe an object ('elf', 'present', 'obstacle', 'blue square') and receive the "
        "centre of every instance as [x, y] pixels; nothing matching gives []. Treats elf/player/start, "
        "gift/goal/present and hole/ice hole/obstacle as synonyms and understands colours and shapes.",
        "Given a picture and a description, marks where the described objects are by returning their centre positions "
        "in pixels ([x, y] each). Understands: elf, player, start; gift, goal, present; hole, ice hole, obstacle; "
        "colour words; shape words. Empty result when nothing fits.",
        "Where is it? This function answers that for any object you can describe: it returns the [x, y] pixel centre "
        "of each matching object, or an empty list. Scene words it knows: elf/player/start, gift/goal/present, "
        "hole/ice hole/obstacle; it also matches by colour and by shape.",
    ],
    "Draw2DPath": [  # tools.draw_2d_path: a new image, arrows of `step` px (default 64, one cell)
        "Draws a route on an image as arrows: starting from a pixel position it follows comma-separated moves (L, R, "
        "U, D), each a fixed number of pixels long, and returns a new image so the route can be checked visually.",
        "Visualizes a sequence of moves. Give a start position [x, y], moves like 'R,R,D' and optionally the step "
        "length and colour; you get back a copy of the image with the path drawn as arrows.",
        "Renders a path onto a picture. Each move (L = left, R = right, U = up, D = down) advances the pen by one step "
        "of pixels from the given start position; the result is a new image showing the arrows.",
        "Sketches a move sequence on top of an image and returns the annotated copy, useful to see whether a planned "
        "route crosses a hazard or reaches the target. Moves are comma-separated letters L/R/U/D starting at an [x, y] "
        "pixel position.",
        "Produces a new image with arrows drawn from a starting pixel along the listed moves (left, right, up, down as "
        "L, R, U, D), one step length per move. Use it to inspect a route before committing to it.",
        "Path overlay: starting at [x, y], draw one arrow per move in the comma-separated list 'L,R,U,D,...', each "
        "arrow as long as the step size, on a copy of the image, and return that copy.",
        "Draws arrows on a copy of an image tracing moves from a start location. Moves are given as text such as "
        "'D,D,R', the distance per move in pixels is configurable, and so is the line colour. Returns the new image.",
        "Turns a list of moves into a picture: the image is copied, a chain of arrows is drawn from the start pixel "
        "following each L/R/U/D move with a fixed stride, and the copy is returned for visual checking.",
    ],
    "AStar": [  # tools.astar_tool: {'path': 'R,R,D'}; pixel points -> cells of cell_size px
        "Plans the shortest route on a grid from a start to a goal while avoiding obstacles. Positions are pixels and "
        "are converted to grid cells; the answer is a move string like 'R,R,D' (4-connected moves), or an error if the "
        "goal cannot be reached.",
        "Shortest-path planner: give the start and goal pixel positions and the pixel positions of cells to avoid; it "
        "returns the moves (L, R, U, D, comma-separated) of a shortest obstacle-free route through the grid, or "
        "reports that no route exists.",
        "Computes a minimal sequence of left/right/up/down moves between two grid cells, never entering an obstacle "
        "cell. Inputs are [x, y] pixel positions; output is a path such as 'D,R,R'. Errors out when the goal is "
        "unreachable.",
        "Route finder for grid worlds. Converts start, goal and obstacle pixel positions to cells, searches for the "
        "fewest 4-connected moves from start to goal around the obstacles, and returns them as text ('U,U,L', ...). An "
        "unreachable goal gives an error.",
        "Returns the shortest obstacle-avoiding path between two positions on a grid, as comma-separated moves L, R, "
        "U, D. Positions and obstacles are given in image pixels; cell size and grid size can be set. Fails with a "
        "message if no path exists.",
        "Finds how to get from a start cell to a goal cell in as few steps as possible, moving only horizontally or "
        "vertically and skipping blocked cells. Give it pixel positions; it gives back the moves like 'R,D,D' or an "
        "error when the goal is cut off.",
        "Grid path search: from the start position to the goal, avoiding every listed obstacle, using "
        "up/down/left/right steps only. The result is the shortest such path written as moves ('L,L,D'); if the goal "
        "is enclosed it reports that it is unreachable.",
        "Given where you are, where you want to go and what to avoid (all in pixel coordinates), this returns an "
        "optimal move string over the grid cells, e.g. 'R,R,U'. Moves are 4-connected; when no route exists it returns "
        "an error instead.",
    ],
    "DetectBlackArea": [  # tools.detect_black_area: {'bounding_boxes': [[x1, y1, x2, y2], ...]}
        "Finds uniform black regions in an image (for example a blacked-out missing piece) and returns their bounding "
        "boxes [x1, y1, x2, y2] in pixels.",
        "Detects solid black areas and lists their boxes as [x1, y1, x2, y2]. Useful for locating a hole or blank slot "
        "in a picture.",
        "Scans an image for connected regions of near-black pixels and reports each region's bounding box in pixel "
        "coordinates; small specks below a minimum area are ignored.",
        "Returns the bounding boxes of all dark, uniform patches in the image, e.g. the empty cell of a puzzle, as a "
        "list of [x1, y1, x2, y2].",
        "Black-region detector: pixels darker than a threshold are grouped into regions, and the box [x1, y1, x2, y2] "
        "of every sufficiently large region is returned.",
        "Locates blacked-out parts of a picture. The output is a list of rectangles, each [left, top, right, bottom] "
        "in pixels, one per black area found.",
        "Which parts of this image are solid black? This answers with one bounding box [x1, y1, x2, y2] per black "
        "region, ignoring regions smaller than a set area.",
        "Gives the pixel rectangles that enclose uniform black areas of an image, such as a missing tile. Sensitivity "
        "(darkness threshold, minimum size) is adjustable.",
    ],
    "InsertImage": [  # tools.insert_image: a new image; an exact fit is pasted untouched, else resized
        "Pastes one image into another: the inserted image is resized to fill the box [x1, y1, x2, y2] of the base "
        "image, and the result is returned as a new image (for example to test whether a candidate piece fits a hole).",
        "Composites an image onto a base image inside a given rectangle, scaling it to fit the rectangle exactly. "
        "Returns the combined picture.",
        "Places a second picture into a region of the first one. The region is a pixel box [x1, y1, x2, y2]; the "
        "inserted picture is stretched to that box; a new image comes back.",
        "Fills a rectangular area of a base image with another image (resized to the area) and returns the composite, "
        "so you can see how a piece looks in place.",
        "Image paste tool: resize the image to insert to the target box on the base image, paste it there, and return "
        "the new composed image.",
        "Try a piece in a slot: this puts the given image into the box [x1, y1, x2, y2] of the base image, resizing it "
        "to match, and gives back the result.",
        "Returns a copy of the base image in which the box [x1, y1, x2, y2] has been covered by another image scaled "
        "to the box size.",
        "Overlays one image on another at a chosen rectangle (pixel coordinates of the base image); the overlay is "
        "resized to fill the rectangle. Output: the new image.",
    ],
    "Crop": [  # tools.crop: a new image, zoomed until its short side is >= 224 px
        "Cuts out the rectangle [x1, y1, x2, y2] of an image and enlarges it so small details become readable; returns "
        "the zoomed region as a new image.",
        "Zooms into a region: extracts the pixel box [x1, y1, x2, y2] and upscales it, giving a new, larger image of "
        "just that area.",
        "Extracts part of a picture given by a bounding box in pixels and magnifies it. Use it when objects or text "
        "are too small to see at full-image scale.",
        "Returns a new image containing only the selected box of the original, scaled up so its shorter side reaches a "
        "minimum size.",
        "Region magnifier. Specify a rectangle (left, top, right, bottom in pixels); the tool cuts it out, upsamples "
        "it and returns the result for a closer look.",
        "Take a closer look at one area: the box [x1, y1, x2, y2] is trimmed out of the image and resized upward, "
        "producing a new image.",
        "Keeps only the pixels inside a given box, then enlarges that piece so fine details are visible. The output is "
        "a new image.",
        "Gives a zoomed-in view of a rectangular sub-region of an image, specified by its corner pixels "
        "[x1, y1, x2, y2].",
    ],
    "OCR": [  # tools.ocr: {'detections': [{'text', 'bbox'}, ...]}, one per text line or label
        "Reads the text in an image (the synthetic app screens' font) and returns each detected piece of text with its "
        "bounding box [x1, y1, x2, y2].",
        "Text recognition: finds all written words and labels in a screen image and returns a list of {text, bbox} "
        "entries.",
        "Extracts printed text from a picture of an app screen, reporting what each text line says and where it is "
        "(pixel box).",
        "Returns the strings visible in an image together with their positions; it understands the font used by the "
        "rendered app screens.",
        "Transcribes text from an image. Output: a list of detections, each with the recognized text and its box in "
        "pixels.",
        "Use this to read labels and values in a screenshot-like image: every piece of text is returned with the "
        "rectangle that encloses it.",
        "Converts rendered text in the image into strings, one detection per text segment, each with the segment's "
        "bounding box.",
        "What does the screen say? This reads every text field of a synthetic app screen and returns the text plus its "
        "[x1, y1, x2, y2] location.",
    ],
}

# Every tool that takes an image by name shares this meaning, so it shares the pool.
IMAGE_POOL = [
    "Name of the image to use, e.g. 'img_1'.",
    "Which image to work on, given by its name such as img_1 or img_2.",
    "The input image, referred to by name (img_1 is the first image of the task).",
    "Image name (img_k) of the picture this operates on.",
    "Reference to an image in the conversation, like 'img_2'.",
    "The picture to process; pass its name, e.g. img_1.",
    "Identifier of the source image: 'img_' followed by its number in order of appearance.",
    "Target image, named as in the conversation (img_1, img_2, ...).",
]

# tool -> parameter -> 8 paraphrases; every parameter of every schema needs its pool (randomize
# raises KeyError otherwise), and a shared meaning shares a pool (IMAGE_POOL)
PARAM_POOL = {
    "Point": {
        "image": IMAGE_POOL,
        "description": [  # free text of at most 500 characters (tools.MAX_TEXT)
            "What to look for, in words, e.g. 'gift', 'ice hole' or 'red circle'.",
            "Text describing the objects to find.",
            "A short phrase naming the object: a scene word (elf, gift, hole, ...) or a colour and shape.",
            "Description of the target objects, such as 'player' or 'blue square'.",
            "The kind of object to locate, written as plain text.",
            "Words that identify the objects of interest (e.g. 'present', 'obstacle', 'green triangle').",
            "Query text: which objects should be found.",
            "Name or visual description (colour, shape) of the things to search for.",
        ],
    },
    "Draw2DPath": {
        "image": IMAGE_POOL,
        "start_point": [  # [x, y] pixels, inside the image
            "Pixel position [x, y] where the path begins.",
            "Starting location of the route, as [x, y] in pixels.",
            "[x, y] coordinates (pixels) of the first arrow's origin, typically the centre of the start cell.",
            "Where to start drawing: an [x, y] pixel pair.",
            "The route's origin in image pixels, written [x, y].",
            "Start position [x, y]; the first move is drawn from here.",
            "Pixel coordinates of the path's starting spot, e.g. [32, 32].",
            "Absolute [x, y] position (origin top-left) at which the path starts.",
        ],
        "directions": [  # read by tools.parse_moves: 'R,R,D', 'RRD' and 'right, down' all work
            "Comma-separated moves, each one of L, R, U, D, e.g. 'R,R,D'.",
            "The moves to draw, as letters L (left), R (right), U (up), D (down) separated by commas.",
            "Move sequence such as 'D,D,R,U'.",
            "Route as text: one letter per step (L/R/U/D), comma-separated.",
            "List of steps to trace, e.g. 'U,L,L'; L = left, R = right, U = up, D = down.",
            "Which way to go at each step, written like 'R,D,D'.",
            "Comma-separated direction letters (L, R, U or D) in the order they are taken.",
            "The path to render, given as moves: left L, right R, up U, down D, joined by commas.",
        ],
        "step": [  # 1-1024 px, default 64
            "Optional: pixels travelled per move (e.g. the grid cell size).",
            "Length of one move in pixels; optional.",
            "Optional stride, in pixels, for each arrow.",
            "How far each move goes, in pixels (optional; set it to the cell size on a grid).",
            "Optional: the distance covered by a single step, in pixels.",
            "Pixel length of each arrow. May be omitted.",
            "Per-move displacement in pixels, if the default does not fit.",
            "Optional number of pixels between consecutive positions of the path.",
        ],
        "line_color": [  # a colour name or '#rrggbb', default magenta
            "Optional colour of the arrows, e.g. 'red'.",
            "Arrow colour (optional), such as 'blue' or 'green'.",
            "Optional: which colour to draw the path in.",
            "The drawing colour, given as a colour name; optional.",
            "Colour used for the path's lines and arrowheads (optional).",
            "Optional: pick a colour that stands out from the picture, e.g. 'magenta'.",
            "Name of the colour for the drawn route. Can be left out.",
            "Stroke colour of the arrows; defaults to a visible colour if omitted.",
        ],
    },
    "AStar": {
        "start": [  # [x, y] pixels -> the cell (x // cell_size, y // cell_size)
            "Start position [x, y] in pixels.",
            "Where the route begins, as an [x, y] pixel position.",
            "Pixel coordinates [x, y] of the starting cell (any pixel inside it works).",
            "The origin of the route: [x, y] in image pixels.",
            "[x, y] of the place to start from, e.g. the player's centre.",
            "Starting location, given as pixel coordinates [x, y].",
            "Initial position of the walker in pixels, [x, y].",
            "Position [x, y] (pixels, origin top-left) the path leaves from.",
        ],
        "goal": [
            "Goal position [x, y] in pixels.",
            "Where the route must end, as an [x, y] pixel position.",
            "Pixel coordinates [x, y] of the target cell.",
            "The destination: [x, y] in image pixels.",
            "[x, y] of the place to reach, e.g. the centre of the target object.",
            "Target location, given as pixel coordinates [x, y].",
            "Final position the path should arrive at, in pixels.",
            "Position [x, y] (pixels, origin top-left) the path ends at.",
        ],
        "obstacles": [  # at most 4096 [x, y] points
            "List of [x, y] pixel positions of cells that must be avoided.",
            "Blocked cells, each as an [x, y] pixel position, e.g. the centres of holes.",
            "Positions the route may not enter: [[x, y], ...] in pixels.",
            "Pixel coordinates of every obstacle, as a list of [x, y] pairs.",
            "The cells to stay out of, given as a list of pixel positions.",
            "Forbidden locations [[x1, y1], [x2, y2], ...]; an empty list means no obstacles.",
            "Where the hazards are: a list of [x, y] pixel centres.",
            "Array of [x, y] positions (pixels) whose grid cells are impassable.",
        ],
        "cell_size": [  # 1-4096 px, default 64 (tasks.CELL)
            "Optional: size of one grid cell in pixels.",
            "Width and height of a grid cell, in pixels (optional).",
            "Optional pixel size of each square cell, used to convert positions to cells.",
            "How many pixels one cell spans; may be omitted.",
            "Optional: edge length of a cell in pixels.",
            "Cell dimension in pixels for converting [x, y] positions into grid cells. Optional.",
            "Pixels per grid cell (optional).",
            "Side length of a single square of the grid, in pixels; optional.",
        ],
        "grid_size": [  # up to 256 cells a side; without it the farthest point bounds the grid
            "Optional: the grid's size in cells, [cols, rows], or one integer for a square grid.",
            "How many cells the grid has across and down ([cols, rows]); a single number means square. Optional.",
            "Optional: grid dimensions in cells, normally the image size divided by the cell size.",
            "Number of columns and rows of cells, as [cols, rows] or one integer; may be omitted.",
            "Optional: the board's extent in cells, which bounds the search so it is not guessed from the farthest "
            "position.",
            "[cols, rows] of the map, counted in cells (an integer n means n by n). Optional.",
            "Optional size of the grid measured in cells: a pair [columns, rows] or a single side length.",
            "Cells per row and per column of the grid (optional); moves may not leave it.",
        ],
    },
    "DetectBlackArea": {
        "image": IMAGE_POOL,
        "threshold": [  # 0-255, default 10 (the official tool's: 1)
            "Optional: brightness (0-255) at or below which a pixel counts as black.",
            "Darkness cutoff for a pixel to be treated as black, 0 to 255; optional.",
            "Optional intensity limit: pixels no brighter than this are considered black.",
            "Maximum pixel value that still counts as black (optional).",
            "Optional: how dark a pixel must be (0-255 scale) to belong to a black region.",
            "Black-level threshold on a 0-255 scale. Can be left out.",
            "Pixel intensity threshold for blackness; lower is stricter. Optional.",
            "Optional grey-level bound below which pixels are classed as black.",
        ],
        "min_area": [  # default 100 px (the official tool's: 200)
            "Optional: smallest region, in pixels, to report.",
            "Minimum area in pixels for a black region to be returned (optional).",
            "Optional: regions with fewer pixels than this are ignored.",
            "Size filter: only black areas of at least this many pixels are kept; optional.",
            "Optional lower bound on region size, counted in pixels.",
            "Smallest pixel count a region needs to be listed. May be omitted.",
            "Ignore dark specks smaller than this many pixels (optional).",
            "Optional minimum pixel area of a reported black region.",
        ],
    },
    "InsertImage": {
        "base_image": [
            "Name of the image to paste into, e.g. 'img_1'.",
            "The background image (by name) that receives the insert.",
            "Image name of the picture being modified.",
            "Which image to place the other one onto, like img_1.",
            "The destination picture, referred to by name.",
            "Name (img_k) of the image that provides the canvas.",
            "Receiving image; the result is a modified copy of it.",
            "The image whose box gets filled, given by its name.",
        ],
        "image_to_insert": [
            "Name of the image to paste, e.g. 'img_2'.",
            "The image (by name) that is placed into the box.",
            "Image name of the piece to put in.",
            "Which image to paste onto the other one, like img_3.",
            "The picture that fills the box, referred to by name.",
            "Name (img_k) of the image that gets resized and inserted.",
            "Source image for the patch, e.g. a candidate piece.",
            "The overlay image, given by its name.",
        ],
        "coordinates": [  # [x1, y1, x2, y2] inside the base image, x2 and y2 exclusive
            "Box [x1, y1, x2, y2] in the base image where the insert goes.",
            "Target rectangle in pixels of the receiving image, as [x1, y1, x2, y2].",
            "Where to paste: left, top, right, bottom in base-image pixels.",
            "Pixel box [x1, y1, x2, y2] that the inserted image is resized to fill.",
            "The region to cover, e.g. a black hole found earlier, as [x1, y1, x2, y2].",
            "Corners of the destination rectangle on the base image: [x1, y1, x2, y2].",
            "Placement box (absolute pixels, origin top-left) for the pasted image.",
            "Rectangle [x1, y1, x2, y2] of the background that gets replaced.",
        ],
    },
    "Crop": {
        "image": IMAGE_POOL,
        # [x1, y1, x2, y2] inside the image, x2 and y2 exclusive; or [x, y]: the 40-px square around it ("point"
        # names a tool, so the pools say position, pixel or centre)
        "coordinates": [
            "Box [x1, y1, x2, y2] to cut out, in pixels of the image; a position [x, y] cuts the 40-px square "
            "around it.",
            "The region to keep: left, top, right, bottom in pixels, or just a centre [x, y] for a 40x40 zoom.",
            "Pixel rectangle [x1, y1, x2, y2] to zoom into, or one pixel [x, y] to zoom on its 40-pixel neighbourhood.",
            "Corners of the area of interest as [x1, y1, x2, y2]; with two numbers [x, y], a 40 px square "
            "centred there.",
            "Bounding box of the part to extract (absolute pixels, origin top-left), or a location whose 40x40 "
            "surroundings are extracted.",
            "[x1, y1, x2, y2]: the rectangle that will be enlarged. [x, y]: the 40-pixel square around that pixel.",
            "Which area to magnify, given as a pixel box, or as a single pixel [x, y] at the centre of a 40 px square.",
            "Rectangle in the image's own pixels, written [left, top, right, bottom]; or a position [x, y] (40x40 "
            "around it).",
        ],
    },
    "OCR": {
        "image": IMAGE_POOL,
    },
}

# -----------------------------------------------------------------------------
# The mapping


@dataclass
class Mapping:
    """One randomization, keyed by the vocabulary it maps *from* (canonical, unless inverted)."""
    names: dict         # tool name -> new tool name
    params: dict        # tool name -> {parameter name -> new parameter name}
    descriptions: list  # [tool, parameter or None for the tool itself, old text, new text]

    def inverse(self):
        return Mapping(
            names={new: old for old, new in self.names.items()},
            # keyed by the new tool names: the inverse maps *from* them
            params={self.names[t]: {new: old for old, new in ps.items()} for t, ps in self.params.items()},
            # the same entries under the new names, old and new text swapped
            descriptions=[[self.names[t], p if p is None else self.params[t][p], new, old]
                          for t, p, old, new in self.descriptions],
        )

    def from_canonical(self, call):
        # Leaves anything it does not know alone: a malformed call reaches the tool as written
        # and the tool's error says what is wrong.
        name, out = call.get("name"), dict(call)  # a copy: the caller's call stays as it was
        if isinstance(name, str):
            out["name"] = self.names.get(name, name)
            if isinstance(call.get("parameters"), dict):
                ps = self.params.get(name, {})  # an unknown tool: its parameters stay as written
                # an unknown parameter passes through, for the tool to reject by name
                out["parameters"] = {ps.get(k, k): v for k, v in call["parameters"].items()}
        return out

    def to_canonical(self, call):
        return self.inverse().from_canonical(call)  # rebuilt per call: seven tools, cheap

    def rename_words(self, text, tool=None):
        """Rename in free text: tool names as whole words ('Point' but not 'PointCloud'), and the
        parameters of `tool` only where quoted ('coordinates'), since bare ones are English words."""
        # tool names bare and quoted, this tool's parameters quoted only
        quoted = {f"'{old}'": f"'{new}'" for old, new in {**self.names, **self.params.get(tool, {})}.items()}
        words = {**self.names, **quoted}
        # one pass over the tokens, quoted ones tried first: a replacement is never itself replaced
        return re.sub(r"'\w+'|\w+", lambda m: words.get(m.group(), m.group()), text)

    def schema(self, schema):
        f, props = schema["function"], schema["function"]["parameters"]["properties"]
        tool = f["name"]
        ps = self.params.get(tool, {})
        # A kept description may still name tools; renaming them keeps the switches independent.
        new = {p: text for t, p, _, text in self.descriptions if t == tool}

        def describe(p, old):  # the paraphrase if there is one, else the old text with tool names renamed
            return new.get(p, self.rename_words(old, tool))

        # new dicts throughout (the schema passed in is not changed): renamed keys, the same types
        parameters = {**f["parameters"],
                      "properties": {ps.get(p, p): {**spec, "description": describe(p, spec["description"])}
                                     for p, spec in props.items()}}
        if "required" in parameters:  # it lists parameter names: rename them too
            parameters["required"] = [ps.get(p, p) for p in parameters["required"]]
        return {**schema, "function": {**f, "name": self.names.get(tool, tool),
                                       "description": describe(None, f["description"]),
                                       "parameters": parameters}}

    def observation(self, text):
        """Rewrite an observation: its "name" field and the names inside its error message."""
        head, newline, rest = text.partition("\n")  # the JSON line, then an optional image line
        obs = _json_dict(head)
        # not one of this protocol's observations (the question, an official observation): left as is
        if obs is None or not isinstance(obs.get("name"), str):
            return text
        tool = obs["name"]
        # error messages name tools and quote parameters ('coordinates'): both get renamed
        if isinstance(obs.get("error"), str):
            obs["error"] = self.rename_words(obs["error"], tool)
        obs["name"] = self.names.get(tool, tool)
        return json.dumps(obs, ensure_ascii=False) + newline + rest  # as tools.observation writes it

    def to_json(self):
        return asdict(self)

    @classmethod
    def from_json(cls, d):
        return cls(**d)


def _json_dict(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None  # only a JSON object counts, not prose, a list or a number


def randomize(schemas, rng: random.Random, names=True, params=True, descriptions=True):
    """Draw a fresh mapping for these (canonical) schemas; each switch is an ablation on its own."""
    # every real tool and parameter name is taken: a random name equal to a real one would make
    # to_canonical ambiguous, and two random names must differ too (fresh adds each to `taken`)
    taken = set(CANONICAL_TOOLS) | {s["function"]["name"] for s in schemas}
    taken |= {p for s in schemas for p in s["function"]["parameters"]["properties"]}

    def fresh():
        while True:
            name = "".join(rng.choices(ALPHABET, k=NAME_LENGTH))
            if name not in taken:
                taken.add(name)
                return name

    mapping = Mapping(names={}, params={}, descriptions=[])
    for s in schemas:
        f = s["function"]
        tool, props = f["name"], f["parameters"]["properties"]
        # the draw order (name, parameters, then descriptions, tool by tool) fixes what a seed gives:
        # reordering it changes every seeded mapping (adl.plan, grpo's per-group ones)
        mapping.names[tool] = fresh() if names else tool
        mapping.params[tool] = {p: fresh() if params else p for p in props}
        if descriptions:
            # None: the tool's own description
            mapping.descriptions.append([tool, None, f["description"], rng.choice(TOOL_POOL[tool])])
            mapping.descriptions += [[tool, p, spec["description"], rng.choice(PARAM_POOL[tool][p])]
                                     for p, spec in props.items()]
    return [mapping.schema(s) for s in schemas], mapping  # the schemas the prompt shows, and the way back


# -----------------------------------------------------------------------------
# Rewriting a whole TC record


def _rewrite_system(text, mapping):
    # rollout.system_prompt writes one JSON schema per line; every other line is prose
    def line(s):
        schema = _json_dict(s)
        if schema is not None and schema.get("type") == "function":
            return json.dumps(mapping.schema(schema), ensure_ascii=False)
        return mapping.rename_words(s)  # the prose may name tools
    return "\n".join(line(s) for s in text.split("\n"))


def _rewrite_assistant(text, mapping):
    # re.split with a group keeps the call bodies at the odd positions, the prose around them even.
    pieces = re.split(r"<tool_call>(.*?)</tool_call>", text, flags=re.S)
    for i, piece in enumerate(pieces):
        call = _json_dict(piece) if i % 2 else None
        if call is not None:
            piece = json.dumps(mapping.from_canonical(call), ensure_ascii=False)
        else:  # thinking, the response, or a call too malformed to parse
            piece = mapping.rename_words(piece)
        pieces[i] = f"<tool_call>{piece}</tool_call>" if i % 2 else piece
    return "".join(pieces)


def _rewrite_content(content, fn):
    if isinstance(content, str):
        return fn(content)
    # multimodal content: the text parts are rewritten, the image parts kept
    return [{**part, "text": fn(part["text"])} if part.get("type") == "text" else part for part in content]


def apply(record, mapping):
    """A new record in the mapping's vocabulary; apply(apply(r, m), m.inverse()) == r."""
    # user turns (the question, tool observations) go through mapping.observation, which changes
    # nothing but an observation's JSON line
    rewrite = {
        "system": lambda t: _rewrite_system(t, mapping),
        "assistant": lambda t: _rewrite_assistant(t, mapping),
    }
    messages = [{**m, "content": _rewrite_content(m["content"], rewrite.get(m["role"], mapping.observation))}
                for m in record["messages"]]
    # Undoing the record's own mapping brings it back to canonical names, which ADL marks as None.
    undoing = record.get("adl_mapping") == mapping.inverse().to_json()
    return {**record, "tools": [mapping.schema(s) for s in record["tools"]], "messages": messages,
            "adl_mapping": None if undoing else mapping.to_json()}


def plan(examples, schemas, mode, seed):
    """The ADL of an evaluation: one (randomized schemas, Mapping) pair per example, as randomize returns it, or
    None. mode: 'off' | 'per-sample' (a pair seeded by --seed and the example id, so every model sees the same names
    on the same example) | 'per-run' (one pair for all)."""
    if mode == "off" or not schemas:
        return None
    if mode == "per-run":
        return [randomize(schemas, random.Random(seed))] * len(examples)  # one (schemas, mapping), shared
    # a str seed is hashed deterministically (not by PYTHONHASHSEED): the same mapping in every process
    return [randomize(schemas, random.Random(f"{seed}:{ex['id']}")) for ex in examples]
