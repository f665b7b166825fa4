"""Thread-tree viewer: one inference record rendered as a self-contained HTML page (or a PNG timeline).

Input is one line of an inference results file (JSON Lines, one object per problem) as written by the
engine: problem facts, outcome, token counts and a flat ``threads`` list. Each thread carries ``id``,
``path``, ``role`` ("parent" | "child" | "sample"), ``parent`` (id of the spawning parent-call thread,
``null`` for roots), ``call``, ``prompt``, ``output``, token counts, ``stop``, its engine ``slot``, the
decode steps ``start_step`` .. ``end_step`` and ``on_answer_path``. Every field is optional here.

The HTML page has three parts, top to bottom, with inline CSS and SVG only (no script, no network):

1. **Header**: nums, target, mode, answer, verified / not verified, reason, token counts, children,
   wall seconds.
2. **Tree**: root threads (parent calls in call order, or the samples of "sc" mode), each followed by
   the threads it spawned, nested as a list under it. A node shows role, path, tokens, stop reason,
   slot and steps, with the prompt and output in collapsible ``<details>`` blocks. Threads on the
   answer path get a green border and an "answer path" badge. Threads whose parent id is unknown are
   shown as roots, so no thread is ever dropped.
3. **Timeline**: an SVG Gantt chart, x = engine decode step, one row per slot (threads with no slot
   in a last "unscheduled" row), one bar per thread coloured by role, answer-path bars outlined
   thick, each with a ``<title>`` tooltip.

:func:`write_view` writes that page, or for a ``.png`` target draws the same timeline (same rows and
bars) with matplotlib next to a text box of the header facts.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from pathlib import Path
from typing import Any

ROLE_COLORS = {"parent": "#4c78a8", "child": "#f58518", "sample": "#b279a2"}
OTHER_COLOR = "#9d9d9d"
ANSWER_COLOR = "#1a7f37"
UNSCHEDULED = "unscheduled"

# SVG timeline geometry (pixels)
_SVG_WIDTH, _SVG_LEFT, _SVG_RIGHT, _SVG_TOP, _SVG_BOTTOM = 960, 100, 20, 10, 40
_ROW_HEIGHT, _BAR_HEIGHT = 26, 18

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dl.facts dt { font-weight: bold; } dl.facts dd { margin: 0; }
pre { background: #f6f8fa; padding: .5em; overflow-x: auto; white-space: pre-wrap; margin: .3em 0; }
.verified { color: #fff; background: #1a7f37; padding: 0 .4em; border-radius: 3px; }
.not-verified { color: #fff; background: #cf222e; padding: 0 .4em; border-radius: 3px; }
ul.tree { list-style: none; padding-left: 1.5em; border-left: 1px dashed #bbb; }
ul.tree.roots { padding-left: 0; border-left: none; }
div.node { border: 1px solid #ccc; border-radius: 4px; padding: .3em .6em; margin: .4em 0; }
div.node.on-answer { border: 3px solid #1a7f37; }
.role { color: #fff; padding: 0 .4em; border-radius: 3px; font-size: .9em; }
.badge { background: #1a7f37; color: #fff; padding: 0 .4em; border-radius: 3px; font-weight: bold; }
.meta { color: #555; } code { font-weight: bold; }
details summary { cursor: pointer; color: #0969da; }
.empty { color: #888; font-style: italic; }
svg text { font-family: system-ui, sans-serif; font-size: 11px; }
.legend span { display: inline-block; margin-right: 1em; }
.swatch { display: inline-block; width: .9em; height: .9em; vertical-align: middle; margin-right: .3em; }
"""


# ---------------------------------------------------------------------------------------------- loading


def load_result(path: str | Path, problem: int) -> dict:
    """The record of ``problem`` in the JSON Lines file ``path``.

    Records are matched on ``record["problem"]["id"]``. Only when no record has an id at all is
    ``problem`` taken as the 0-based index among the (non-blank) lines. Raises ``ValueError`` naming
    the file and 1-based line number for a line that is not a JSON object, ``KeyError`` when the
    problem is not there.
    """
    path = Path(path)
    records: list[dict] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            records.append(record)

    ids = [_problem(r).get("id") for r in records]
    for record, id_ in zip(records, ids):
        if id_ is not None and id_ == problem:
            return record
    known = [i for i in ids if i is not None]
    if known:
        shown = ", ".join(str(i) for i in known[:10])
        if len(known) > 10:
            shown += f", ... ({len(known)} in all)"
        raise KeyError(f"problem id {problem} not in {path}; available ids: {shown}")
    if 0 <= problem < len(records):
        return records[problem]
    raise KeyError(f"problem {problem} not in {path}: records have no ids and there are {len(records)}")


# ------------------------------------------------------------------------------------- shared helpers


def _problem(record: dict) -> dict:
    problem = record.get("problem")
    return problem if isinstance(problem, dict) else {}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fmt(x: Any, none: str = "—") -> str:
    if x is None:
        return none
    if isinstance(x, float):
        return f"{x:.2f}"
    return str(x)


def _facts(record: dict) -> list[tuple[str, str]]:
    """The header facts as (label, text), in display order; the answer comes last."""
    problem = _problem(record)
    nums = problem.get("nums", record.get("nums"))
    return [
        ("nums", ", ".join(str(n) for n in nums) if isinstance(nums, list) else _fmt(nums)),
        ("target", _fmt(problem.get("target", record.get("target")))),
        ("mode", _fmt(record.get("mode"))),
        ("correct", "verified" if record.get("correct") else "not verified"),
        ("reason", _fmt(record.get("reason"))),
        ("total tokens", _fmt(record.get("total_tokens"))),
        ("sequential tokens", _fmt(record.get("sequential_tokens"))),
        ("children", _fmt(record.get("children"))),
        ("wall seconds", _fmt(record.get("wall_s"))),
        ("answer", _fmt(record.get("answer"), none="none")),
    ]


def _threads(record: dict) -> list[dict]:
    threads = record.get("threads")
    return [t for t in threads if isinstance(t, dict)] if isinstance(threads, list) else []


def _label(thread: dict, index: int) -> str:
    return str(thread.get("path") or f"#{thread.get('id', index)}")


def _color(thread: dict) -> str:
    return ROLE_COLORS.get(str(thread.get("role")), OTHER_COLOR)


def _tooltip(thread: dict, index: int) -> str:
    tokens, stop = _fmt(thread.get("tokens")), _fmt(thread.get("stop"))
    return f"{_label(thread, index)} · {tokens} tokens · stop {stop}"


@dataclasses.dataclass(frozen=True)
class _Bar:
    row: int
    start: float
    end: float
    thread: dict
    index: int  # position in record["threads"]


@dataclasses.dataclass(frozen=True)
class _Timeline:
    rows: list[str]  # row labels, top to bottom: "slot N" ..., then "unscheduled" if any thread has no slot
    bars: list[_Bar]
    undrawn: list[str]  # labels of threads without both decode steps
    lo: float
    hi: float


def _timeline(threads: list[dict]) -> _Timeline:
    """Rows and bars of the timeline, shared by the SVG and the PNG."""
    slots = sorted({t["slot"] for t in threads if _is_number(t.get("slot"))})
    rows = [f"slot {s}" for s in slots]
    if any(not _is_number(t.get("slot")) for t in threads):
        rows.append(UNSCHEDULED)
    row_of = {s: i for i, s in enumerate(slots)}
    bars: list[_Bar] = []
    undrawn: list[str] = []
    for i, t in enumerate(threads):
        start, end = t.get("start_step"), t.get("end_step")
        if not (_is_number(start) and _is_number(end)):
            undrawn.append(_label(t, i))
            continue
        row = row_of[t["slot"]] if _is_number(t.get("slot")) else len(rows) - 1
        bars.append(_Bar(row=row, start=float(start), end=float(max(start, end)), thread=t, index=i))
    lo = min((b.start for b in bars), default=0.0)
    hi = max((b.end for b in bars), default=1.0)
    return _Timeline(rows=rows, bars=bars, undrawn=undrawn, lo=lo, hi=max(hi, lo + 1))


def _ticks(lo: float, hi: float, target: int = 8) -> list[float]:
    """Round tick positions (integer steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    raw = (hi - lo) / target
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    step = max(1, next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw))
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) // step) + 1)]


# ---------------------------------------------------------------------------------------------- HTML


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _header_html(record: dict) -> str:
    items = []
    for label, value in _facts(record):
        if label == "correct":
            cls = "verified" if record.get("correct") else "not-verified"
            body = f'<span class="{cls}">{_e(value)}</span>'
        elif label == "answer" and record.get("answer") is not None:
            body = f'<pre class="answer">{_e(value)}</pre>'
        else:
            body = _e(value)
        items.append(f"<dt>{_e(label)}</dt><dd>{body}</dd>")
    return '<dl class="facts">\n' + "\n".join(items) + "\n</dl>"


def _node_html(thread: dict, index: int) -> str:
    role = str(thread.get("role") or "thread")
    on_answer = bool(thread.get("on_answer_path"))
    title = f"call {thread['call']}" if role == "parent" and thread.get("call") is not None else ""
    meta = [
        f"{_fmt(thread.get('tokens'))} tokens",
        f"prompt {_fmt(thread.get('prompt_tokens'))} tokens",
        f"stop: {_fmt(thread.get('stop'))}",
        f"slot {_fmt(thread.get('slot'), none=UNSCHEDULED)}",
        f"steps {_fmt(thread.get('start_step'))}–{_fmt(thread.get('end_step'))}",
    ]
    head = " ".join(
        part
        for part in (
            f'<span class="role" style="background:{_color(thread)}">{_e(role)}</span>',
            f"<b>{_e(title)}</b>" if title else "",
            f"<code>{_e(_label(thread, index))}</code>",
            '<span class="badge">answer path</span>' if on_answer else "",
            f'<span class="meta">{_e(" · ".join(meta))}</span>',
        )
        if part
    )
    cls = "node on-answer" if on_answer else "node"
    return (
        f'<div class="{cls}" data-path="{_e(_label(thread, index))}">{head}\n'
        f"<details><summary>prompt</summary><pre>{_e(thread.get('prompt') or '')}</pre></details>\n"
        f"<details><summary>output</summary><pre>{_e(thread.get('output') or '')}</pre></details>\n"
        "</div>"
    )


def _tree_html(threads: list[dict]) -> str:
    """Roots in call order, each followed by a nested list of the threads it spawned (recursively)."""
    if not threads:
        return '<p class="empty">no threads</p>'
    position: dict[Any, int] = {}
    for i, t in enumerate(threads):
        if t.get("id") is not None:
            position.setdefault(t["id"], i)
    children: dict[int, list[int]] = {}
    roots = []
    for i, t in enumerate(threads):
        parent = position.get(t.get("parent")) if t.get("parent") is not None else None
        if parent is None or parent == i:
            roots.append(i)
        else:
            children.setdefault(parent, []).append(i)

    def order(i: int) -> tuple[bool, float, bool, float, int]:
        """Call, then id, then file position; siblings share their call, so they go by id."""
        call, id_ = threads[i].get("call"), threads[i].get("id")
        call_known, id_known = _is_number(call), _is_number(id_)
        return (not call_known, call if call_known else 0, not id_known, id_ if id_known else 0, i)

    seen: set[int] = set()

    def subtree(i: int) -> str:
        seen.add(i)
        kids = [k for k in sorted(children.get(i, []), key=order) if k not in seen]
        nested = "".join(f"<li>{subtree(k)}</li>" for k in kids)
        return _node_html(threads[i], i) + (f'\n<ul class="tree">{nested}</ul>' if nested else "")

    items = [f"<li>{subtree(i)}</li>" for i in sorted(roots, key=order)]
    # threads caught in a parent cycle are reachable from no root; show them as roots too
    items += [f"<li>{subtree(i)}</li>" for i in range(len(threads)) if i not in seen]
    return '<ul class="tree roots">\n' + "\n".join(items) + "\n</ul>"


def _svg_text(x: float, y: float, text: str, anchor: str = "start", fill: str = "#222") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{fill}">{_e(text)}</text>'


def _timeline_svg(threads: list[dict]) -> str:
    if not threads:
        return '<p class="empty">no threads</p>'
    tl = _timeline(threads)
    if not tl.bars:
        return f'<p class="empty">no thread has decode steps; not drawn: {_e(", ".join(tl.undrawn))}</p>'
    plot_w = _SVG_WIDTH - _SVG_LEFT - _SVG_RIGHT
    height = _SVG_TOP + _ROW_HEIGHT * len(tl.rows) + _SVG_BOTTOM
    axis_y = _SVG_TOP + _ROW_HEIGHT * len(tl.rows)

    def x(step: float) -> float:
        return _SVG_LEFT + (step - tl.lo) / (tl.hi - tl.lo) * plot_w

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_SVG_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_SVG_WIDTH} {height}" role="img" aria-label="thread timeline">'
    ]
    for r, label in enumerate(tl.rows):
        y = _SVG_TOP + r * _ROW_HEIGHT
        fill = "#f4f4f4" if r % 2 == 0 else "#ffffff"
        parts.append(
            f'<rect class="row" x="{_SVG_LEFT}" y="{y}" width="{plot_w}" height="{_ROW_HEIGHT}" fill="{fill}"/>'
        )
        parts.append(_svg_text(_SVG_LEFT - 8, y + _ROW_HEIGHT / 2 + 4, label, anchor="end"))
    for tick in _ticks(tl.lo, tl.hi):
        tx = x(tick)
        parts.append(f'<line x1="{tx:.1f}" y1="{_SVG_TOP}" x2="{tx:.1f}" y2="{axis_y + 5}" stroke="#ddd"/>')
        parts.append(_svg_text(tx, axis_y + 17, f"{tick:g}", anchor="middle"))
    parts.append(f'<line x1="{_SVG_LEFT}" y1="{axis_y}" x2="{_SVG_LEFT + plot_w}" y2="{axis_y}" stroke="#333"/>')
    parts.append(_svg_text(_SVG_LEFT + plot_w / 2, axis_y + 34, "decode step", anchor="middle"))
    for bar in tl.bars:
        t = bar.thread
        on_answer = bool(t.get("on_answer_path"))
        bx, bw = x(bar.start), max(x(bar.end) - x(bar.start), 1.0)
        by = _SVG_TOP + bar.row * _ROW_HEIGHT + (_ROW_HEIGHT - _BAR_HEIGHT) / 2
        stroke = f'stroke="{ANSWER_COLOR}" stroke-width="3"' if on_answer else 'stroke="#333" stroke-width=".5"'
        cls = f"bar role-{_e(t.get('role') or 'thread')}" + (" on-answer" if on_answer else "")
        parts.append(
            f'<rect class="{cls}" x="{bx:.1f}" y="{by:.1f}" width="{bw:.1f}" height="{_BAR_HEIGHT}" '
            f'fill="{_color(t)}" {stroke}><title>{_e(_tooltip(t, bar.index))}</title></rect>'
        )
        label = _label(t, bar.index)
        if bw > 7 * len(label) + 6:  # path inside the bar when it fits
            parts.append(_svg_text(bx + 4, by + _BAR_HEIGHT / 2 + 4, label, fill="#fff"))
    parts.append("</svg>")
    legend = " ".join(
        f'<span><span class="swatch" style="background:{c}"></span>{_e(role)}</span>'
        for role, c in [*ROLE_COLORS.items(), ("other", OTHER_COLOR)]
    )
    legend += f' <span><span class="swatch" style="border:3px solid {ANSWER_COLOR}"></span>answer path</span>'
    note = ""
    if tl.undrawn:
        note = f'<p class="empty">not drawn (no decode steps): {_e(", ".join(tl.undrawn))}</p>'
    return "\n".join(parts) + f'\n<p class="legend">{legend}</p>{note}'


def render_html(record: dict) -> str:
    """A complete standalone HTML document (inline CSS and SVG, no script) viewing one record."""
    threads = _threads(record)
    problem = _problem(record)
    title = f"Problem {_fmt(problem.get('id'), none='?')} — {_fmt(record.get('mode'))}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n{_header_html(record)}\n"
        f"<h2>Threads ({len(threads)})</h2>\n{_tree_html(threads)}\n"
        f"<h2>Timeline</h2>\n{_timeline_svg(threads)}\n"
        "</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------------------------- PNG


def _write_png(record: dict, out_path: Path) -> None:
    """The timeline as a matplotlib Gantt chart beside a text box of the header facts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    threads = _threads(record)
    tl = _timeline(threads)
    rows = max(len(tl.rows), 1)
    fig = Figure(figsize=(13, 2.5 + 0.4 * rows))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 2, width_ratios=[3, 1])
    ax, text_ax = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])

    for bar in tl.bars:
        on_answer = bool(bar.thread.get("on_answer_path"))
        ax.barh(
            bar.row,
            bar.end - bar.start,
            left=bar.start,
            height=0.7,
            color=_color(bar.thread),
            edgecolor=ANSWER_COLOR if on_answer else "#333333",
            linewidth=2.5 if on_answer else 0.5,
        )
    if tl.bars:
        ax.set_yticks(range(len(tl.rows)), tl.rows)
        ax.set_ylim(len(tl.rows) - 0.5, -0.5)  # first slot on top
        ax.set_xlim(tl.lo, tl.hi)
        handles = [Patch(color=c, label=role) for role, c in [*ROLE_COLORS.items(), ("other", OTHER_COLOR)]]
        handles.append(Patch(facecolor="white", edgecolor=ANSWER_COLOR, linewidth=2.5, label="answer path"))
        ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1), ncol=5, fontsize=8, frameon=False)
    else:
        ax.set_yticks([])
        empty = "no thread has decode steps" if threads else "no threads"
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("decode step")
    ax.set_title("thread timeline", loc="right")

    lines = []
    for label, value in _facts(record):
        if label == "answer" and "\n" in value:  # the last line of a solution path carries the result
            value = "… " + value.strip().splitlines()[-1]
        lines.append(f"{label}: {value}")
    text_ax.axis("off")
    text_ax.text(
        0, 1, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8, wrap=True,
        bbox={"boxstyle": "round", "facecolor": "#f6f8fa", "edgecolor": "#cccccc"},
    )
    fig.tight_layout()
    fig.savefig(out_path, format="png", dpi=100)


def write_view(result_path: str | Path, problem: int, out_path: str | Path) -> Path:
    """Render ``problem`` of the results file to ``out_path`` (``.html`` page or ``.png`` timeline)."""
    out_path = Path(out_path)
    suffix = out_path.suffix.lower()
    if suffix not in (".html", ".png"):
        raise ValueError(f"unsupported output type {out_path.suffix!r} for {out_path}: use .html or .png")
    record = load_result(result_path, problem)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".html":
        out_path.write_text(render_html(record), encoding="utf-8")
    else:
        _write_png(record, out_path)
    return out_path
