"""The journey drawn as a graph: server-side SVG, a layered layout of the document's steps.

Each step is a box in a row (layer) below every step that can jump forward to it; edges
that go back (loops, ``goto`` an earlier step) are drawn as curves on the right side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape

from markupsafe import Markup

from models.journey import JourneyDocument

NODE_W, NODE_H = 230, 74
GAP_X, GAP_Y = 36, 52
MARGIN = 24
LEFT_MARGIN = 90  # room for the arrows that skip layers
# Steps that go on to the next step when done (others jump, or end the run).
FALLS_THROUGH = {"wait", "email", "sms", "update_contact", "crm", "webhook", "enroll"}
COLOURS = {
    "email": "#2563eb",
    "sms": "#0891b2",
    "wait": "#64748b",
    "wait_for": "#7c3aed",
    "branch": "#d97706",
    "split": "#db2777",
    "exit": "#dc2626",
}


@dataclass
class Edge:
    source: str
    target: str
    label: str = ""


@dataclass
class Node:
    id: str
    type: str
    detail: str
    lines: list[str] = field(default_factory=list)
    layer: int = 0
    x: float = 0
    y: float = 0


def _detail(step: object) -> str:
    for name in ("template", "duration", "event", "journey", "step", "action"):
        value = getattr(step, name, None)
        if isinstance(value, str) and value:
            return f"{name}: {value}"
    return ""


def edges_of(document: JourneyDocument) -> list[Edge]:
    steps = document.steps
    edges: list[Edge] = []
    for index, step in enumerate(steps):
        following = steps[index + 1].id if index + 1 < len(steps) else None
        kind = step.type
        if kind == "wait_for":
            on_event = getattr(step, "on_event", None) or following
            if on_event:
                edges.append(Edge(step.id, on_event, getattr(step, "event", None) or "met"))
            if getattr(step, "timeout", None):
                on_timeout = getattr(step, "on_timeout", None) or following
                if on_timeout:
                    edges.append(Edge(step.id, on_timeout, "timeout"))
        elif kind == "branch":
            for number, case in enumerate(getattr(step, "cases", []), start=1):
                edges.append(Edge(step.id, case.goto, f"case {number}"))
            otherwise = getattr(step, "else_", None) or following
            if otherwise:
                edges.append(Edge(step.id, otherwise, "else"))
        elif kind == "split":
            for variant in getattr(step, "variants", []):
                edges.append(Edge(step.id, variant.goto, f"{variant.variant} ({variant.weight}%)"))
        elif kind == "goto":
            edges.append(Edge(step.id, step.step))  # type: ignore[union-attr]
        elif kind in FALLS_THROUGH and following:
            edges.append(Edge(step.id, following))
    # One arrow per pair of steps, naming every way along it ("purchase / timeout").
    merged: dict[tuple[str, str], Edge] = {}
    for edge in edges:
        seen = merged.get((edge.source, edge.target))
        if seen is None:
            merged[(edge.source, edge.target)] = edge
        elif edge.label and edge.label not in seen.label.split(" / "):
            seen.label = f"{seen.label} / {edge.label}" if seen.label else edge.label
    return list(merged.values())


def layout(document: JourneyDocument, lines: dict[str, list[str]]) -> tuple[list[Node], list[Edge]]:
    order = {step.id: i for i, step in enumerate(document.steps)}
    nodes = {
        step.id: Node(step.id, step.type, _detail(step), lines.get(step.id, []))
        for step in document.steps
    }
    edges = [e for e in edges_of(document) if e.target in nodes]
    # Forward edges go to a later step: processing steps in order gives longest-path layers.
    for step in document.steps:
        for edge in edges:
            if edge.source == step.id and order[edge.target] > order[step.id]:
                target = nodes[edge.target]
                target.layer = max(target.layer, nodes[step.id].layer + 1)
    layers: dict[int, list[Node]] = {}
    for node in nodes.values():
        layers.setdefault(node.layer, []).append(node)
    widest = max(len(row) for row in layers.values())
    width = widest * NODE_W + (widest - 1) * GAP_X
    for layer, row in layers.items():
        row_width = len(row) * NODE_W + (len(row) - 1) * GAP_X
        left = LEFT_MARGIN + (width - row_width) / 2
        for column, node in enumerate(row):
            node.x = left + column * (NODE_W + GAP_X)
            node.y = MARGIN + layer * (NODE_H + GAP_Y)
    return list(nodes.values()), edges


def journey_svg(document: JourneyDocument, lines: dict[str, list[str]]) -> Markup:
    """The SVG of the journey; ``lines`` are the counts shown in each step's box."""
    nodes, edges = layout(document, lines)
    by_id = {n.id: n for n in nodes}
    width = max(n.x for n in nodes) + NODE_W + MARGIN + 80
    left_lane = min(n.x for n in nodes) - 30
    right_lane = max(n.x for n in nodes) + NODE_W + 30
    centre = (left_lane + right_lane) / 2
    height = max(n.y for n in nodes) + NODE_H + MARGIN
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="journey-graph" role="img" '
        f'aria-label="Journey {escape(document.key)}" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'width="{width:.0f}" height="{height:.0f}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#94a3b8"/></marker></defs>',
    ]
    for edge in edges:
        a, b = by_id[edge.source], by_id[edge.target]
        if b.layer > a.layer + 1:  # skips layers: along a side, clear of the boxes between
            right = a.x + NODE_W / 2 > centre + 1  # a box right of centre takes the right lane
            x1, y1 = (a.x + NODE_W if right else a.x), a.y + NODE_H / 2
            x2, y2 = (b.x + NODE_W if right else b.x), b.y + NODE_H / 2
            lane = right_lane if right else min(left_lane, x1 - 30, x2 - 30)
            path = (
                f"M{x1:.0f},{y1:.0f} C{lane:.0f},{y1:.0f} {lane:.0f},{y1:.0f} {lane:.0f},"
                f"{(y1 + y2) / 2:.0f} S{lane:.0f},{y2:.0f} {x2:.0f},{y2:.0f}"
            )
            lx, ly = lane + 4, (y1 + y2) / 2
        elif b.layer > a.layer:
            x1, y1 = a.x + NODE_W / 2, a.y + NODE_H
            x2, y2 = b.x + NODE_W / 2, b.y
            mid = (y1 + y2) / 2
            path = f"M{x1:.0f},{y1:.0f} C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f} {x2:.0f},{y2:.0f}"
            lx, ly = (x1 + x2) / 2, mid
        else:  # back edge (loop) or jump within a layer: around the right side
            x1, y1 = a.x + NODE_W, a.y + NODE_H / 2
            x2, y2 = b.x + NODE_W, b.y + NODE_H / 2
            bulge = max(x1, x2) + 60
            path = (
                f"M{x1:.0f},{y1:.0f} C{bulge:.0f},{y1:.0f} {bulge:.0f},{y2:.0f} {x2:.0f},{y2:.0f}"
            )
            lx, ly = bulge - 10, (y1 + y2) / 2
        parts.append(
            f'<path class="edge" data-from="{escape(edge.source)}" data-to="{escape(edge.target)}"'
            f' d="{path}" fill="none" stroke="#94a3b8" stroke-width="1.6" '
            'marker-end="url(#arrow)"/>'
        )
        if edge.label:
            parts.append(
                f'<text x="{lx:.0f}" y="{ly - 3:.0f}" font-size="11" fill="#475569" '
                f'text-anchor="middle" paint-order="stroke" stroke="#fff" stroke-width="3">'
                f"{escape(edge.label)}</text>"
            )
    for node in nodes:
        colour = COLOURS.get(node.type, "#0f766e")
        parts.append(
            f'<g class="step" data-step="{escape(node.id)}" data-type="{escape(node.type)}" '
            f'transform="translate({node.x:.0f},{node.y:.0f})">'
            f'<rect width="{NODE_W}" height="{NODE_H}" rx="8" fill="#fff" stroke="{colour}" '
            'stroke-width="1.6"/>'
            f'<rect width="6" height="{NODE_H}" rx="3" fill="{colour}"/>'
            f'<text x="16" y="20" font-size="13" font-weight="600" fill="#0f172a">'
            f"{escape(node.id)}</text>"
            f'<text x="{NODE_W - 10}" y="20" font-size="11" fill="{colour}" text-anchor="end">'
            f"{escape(node.type)}</text>"
            f'<text x="16" y="37" font-size="11" fill="#475569">{escape(node.detail[:34])}</text>'
        )
        for number, line in enumerate(node.lines[:2]):
            parts.append(
                f'<text class="count" x="16" y="{54 + number * 14}" font-size="11" '
                f'fill="#0f172a">{escape(line)}</text>'
            )
        parts.append("</g>")
    parts.append("</svg>")
    return Markup("".join(parts))
