"""Where the shipped workflows' nodes sit on the ComfyUI canvas, and the checks a layout must pass.

Units are LiteGraph canvas units (1 unit = 1 px at zoom 1). A node's `pos` is the top-left corner of its body;
its title bar (TITLE_H, LiteGraph's NODE_TITLE_HEIGHT) is drawn above `pos`, so a node covers
`[x, y - TITLE_H, x + w, y + h]`. The frontend draws the canvas under its own chrome (frontend 1.32, measured in
headless Chromium at 1920x1080: a side bar 60 px wide on the left, a top bar and workflow tabs down to y = 80 px,
the workflow's name in a box down to y = 140 px on the left), and maps a canvas point p to the screen as
`(p + ds.offset) * ds.scale` (LiteGraph's DragAndScale). `saved_view` picks the `extra.ds` that puts the
graph's top-left corner at SCREEN_ORIGIN, well clear of all of that.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

TITLE_H = 30.0
FRONTEND_CHROME = {"left": 60.0, "top": 140.0}  # screen px the frontend's bars and boxes cover (see above)
GAP_X = 80.0  # between columns: room for the wires to leave one node and enter the next
GAP_Y = 40.0  # between the bottom of a node and the title bar of the one below
SCREEN_ORIGIN = (110.0, 190.0)  # screen px of the graph's top-left corner (title bar included)
SCREEN_WIDTH = 1920.0  # the window the saved zoom is fitted to (a full-HD screen)
SCALE_RANGE = (0.6, 0.8)  # readable zooms: the saved view never goes below or above these

Box = tuple[tuple[float, float], tuple[float, float]]  # (pos, size)


def place(columns: Sequence[Sequence[Sequence[int]]], sizes: dict[int, tuple[float, float]]
          ) -> dict[int, tuple[float, float]]:
    """Node id -> pos for `columns` laid out left to right.

    columns: each a list of one or two stacks of node ids, stacked top to bottom. The first stack of every
    column starts at y = 0; every second stack starts at one common height (below the lowest first stack of
    the columns that have a second one), so a row of inputs lines up with the nodes they feed. A column is as
    wide as its widest node; columns are GAP_X apart. sizes: node id -> (width, height) without the title bar.
    Raises ValueError when a column has more than two stacks or a node is placed twice.
    """
    def bottom(stack: Sequence[int], top: float) -> float:
        return top + sum(sizes[i][1] + TITLE_H + GAP_Y for i in stack)

    if any(len(col) > 2 for col in columns):
        raise ValueError("columns: each column holds at most two stacks (top and row)")
    row_y = max((bottom(col[0], 0.0) for col in columns if len(col) == 2 and col[1]), default=0.0)
    pos: dict[int, tuple[float, float]] = {}
    x = 0.0
    for col in columns:
        for stack, top in zip(col, (0.0, row_y)):
            y = top
            for node_id in stack:
                if node_id in pos:
                    raise ValueError(f"node {node_id} is placed twice")
                pos[node_id] = (x, y)
                y += sizes[node_id][1] + TITLE_H + GAP_Y
        x += max((sizes[i][0] for stack in col for i in stack), default=0.0) + GAP_X
    return pos


def bounds(boxes: Iterable[Box]) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the nodes, title bars included."""
    rects = [rect(p, s) for p, s in boxes]
    return (min(r[0] for r in rects), min(r[1] for r in rects), max(r[2] for r in rects), max(r[3] for r in rects))


def rect(pos: Sequence[float], size: Sequence[float]) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of one node, its title bar included."""
    return (pos[0], pos[1] - TITLE_H, pos[0] + size[0], pos[1] + size[1])


def saved_view(boxes: Iterable[Box]) -> dict:
    """The workflow's `extra.ds`: a zoom that fits the graph's width into a SCREEN_WIDTH window (kept within
    SCALE_RANGE, rounded down to 0.05) and an offset that puts its top-left corner at SCREEN_ORIGIN."""
    left, top, right, _ = bounds(boxes)
    usable = SCREEN_WIDTH - SCREEN_ORIGIN[0] - 40.0
    scale = min(max(usable / (right - left), SCALE_RANGE[0]), SCALE_RANGE[1])
    scale = int(scale * 20) / 20
    offset = [round(SCREEN_ORIGIN[0] / scale - left, 1), round(SCREEN_ORIGIN[1] / scale - top, 1)]
    return {"scale": scale, "offset": offset}


def layout_problems(nodes: dict[int, tuple[str, Box]], links: Iterable[tuple[int, int]],
                    margin: float = 20.0) -> list[str]:
    """What is wrong with a layout, in words (empty when nothing is).

    nodes: id -> (title, (pos, size)); links: (source id, target id). Two nodes overlap when their rectangles,
    title bars included, come closer than `margin`; a link goes backwards unless its source's right edge is at
    least `margin` left of its target's left edge (the wire runs left to right without looping back).
    """
    problems = []
    items = sorted(nodes.items())
    for k, (a, (title_a, box_a)) in enumerate(items):
        ra = rect(*box_a)
        for b, (title_b, box_b) in items[k + 1:]:
            rb = rect(*box_b)
            if ra[0] < rb[2] + margin and rb[0] < ra[2] + margin and ra[1] < rb[3] + margin and rb[1] < ra[3] + margin:
                problems.append(f"{title_a!r} ({a}) and {title_b!r} ({b}) overlap or are closer than {margin:g}")
    for src, dst in links:
        (title_s, box_s), (title_d, box_d) = nodes[src], nodes[dst]
        if rect(*box_s)[2] + margin > box_d[0][0]:
            problems.append(f"the link {title_s!r} ({src}) -> {title_d!r} ({dst}) does not run left to right")
    return problems
