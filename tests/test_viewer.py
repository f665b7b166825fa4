"""The thread-tree viewer: HTML structure, escaping, timeline bars, record loading and file output."""

import json
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from apr_jax.inference import viewer

SPAWN = "<Calling Sub Searches>\n<Sub Search 0 nums [22, 26]>\n<End Calling Sub Searches>"


def _thread(id_, path, role, parent, call, slot, start, end, stop, answer=False, output=""):
    return {
        "id": id_, "path": path, "role": role, "parent": parent, "call": call,
        "prompt": f"Moving to Node #{path}\nCurrent State: 27:[22, 26, 31, 53]",
        "output": output or f"output of {path}", "prompt_tokens": 40, "tokens": end - start, "stop": stop,
        "slot": slot, "start_step": start, "end_step": end, "on_answer_path": answer,
    }  # fmt: skip


def apr_record():
    """Two parent calls, the first spawning two children; the threads are listed out of order."""
    threads = [
        _thread(3, "p1", "parent", None, 1, 0, 300, 420, "eos", answer=True),
        _thread(2, "p0.c1", "child", 0, 0, 2, 100, 290, "eos"),
        _thread(0, "p0", "parent", None, 0, 0, 0, 100, "spawn", answer=True, output=SPAWN),
        _thread(1, "p0.c0", "child", 0, 0, 1, 100, 300, "eos", answer=True),
    ]
    return {
        "problem": {"id": 3, "nums": [22, 26, 31, 53], "target": 27}, "mode": "apr",
        "answer": "Moving to Node #0,0\n27,27 equal: Goal Reached", "correct": True, "reason": "ok",
        "total_tokens": 620, "sequential_tokens": 420, "children": 2, "spawns": 1, "wall_s": 1.7,
        "threads": threads,
    }  # fmt: skip


def sc_record():
    """Self-consistency samples; one never got a slot, one never got decode steps."""
    threads = [
        _thread(0, "s0", "sample", None, None, 0, 0, 80, "eos", answer=True),
        _thread(1, "s1", "sample", None, None, None, 80, 150, "thread_limit"),
        {"id": 2, "path": "s2", "role": "sample", "parent": None, "stop": "problem_budget"},
    ]
    return {"problem": {"id": 7, "nums": [1, 2], "target": 3}, "mode": "sc", "answer": None,
            "correct": False, "reason": "no <answer> found", "threads": threads}  # fmt: skip


def empty_record():
    return {"problem": {"id": 0, "nums": [4, 5], "target": 9}, "mode": "sosp", "answer": None,
            "correct": False, "reason": "prompt_too_long", "threads": []}  # fmt: skip


class _Nodes(HTMLParser):
    """Tree nodes in document order: (data-path, classes, nesting depth in <ul>), plus the badge count."""

    def __init__(self):
        super().__init__()
        self.depth, self.nodes, self.badges = 0, [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        if tag == "ul":
            self.depth += 1
        elif tag == "div" and "node" in classes:
            self.nodes.append((attrs["data-path"], classes, self.depth))
        elif tag == "span" and "badge" in classes:
            self.badges += 1

    def handle_endtag(self, tag):
        if tag == "ul":
            self.depth -= 1


def _nodes(page):
    parser = _Nodes()
    parser.feed(page)
    return parser


def _bars(page):
    """(classes, tooltip) of every thread bar in the SVG."""
    bars = re.findall(r'<rect class="(bar[^"]*)"[^>]*><title>([^<]*)</title></rect>', page)
    return [(set(classes.split()), title) for classes, title in bars]


def test_viewer_does_not_import_jax():
    code = "import sys, apr_jax.inference.viewer; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_apr_page_is_standalone_and_complete():
    record = apr_record()
    page = viewer.render_html(record)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    for thread in record["threads"]:
        assert f'data-path="{thread["path"]}"' in page
    header = page[: page.index("<h2>")]
    for fact in ("22, 26, 31, 53", "27", "apr", "Goal Reached", "verified", "ok", "620", "420", "1.70"):
        assert fact in header
    assert 'class="verified"' in header and "not verified" not in header


def test_model_output_is_escaped():
    page = viewer.render_html(apr_record())
    assert "&lt;Calling Sub Searches&gt;" in page and "&lt;End Calling Sub Searches&gt;" in page
    assert "<Calling Sub Searches>" not in page and "<Sub Search" not in page


def test_children_nest_under_their_parent_call_in_call_order():
    nodes = _nodes(viewer.render_html(apr_record())).nodes
    assert [(path, depth) for path, _, depth in nodes] == [("p0", 1), ("p0.c0", 2), ("p0.c1", 2), ("p1", 1)]


def test_answer_path_marks_only_answer_threads():
    record = apr_record()
    expected = {t["path"] for t in record["threads"] if t["on_answer_path"]}
    assert expected == {"p0", "p0.c0", "p1"}
    page = viewer.render_html(record)
    parsed = _nodes(page)
    assert {path for path, classes, _ in parsed.nodes if "on-answer" in classes} == expected
    assert parsed.badges == len(expected)
    assert {title.split(" · ")[0] for classes, title in _bars(page) if "on-answer" in classes} == expected


def test_timeline_has_one_titled_bar_per_thread():
    record = apr_record()
    page = viewer.render_html(record)
    bars = _bars(page)
    assert sorted(title for _, title in bars) == sorted(
        f"{t['path']} · {t['tokens']} tokens · stop {t['stop']}" for t in record["threads"]
    )
    roles = {c for classes, _ in bars for c in classes if c.startswith("role-")}
    assert roles == {"role-parent", "role-child"}
    for label in ("slot 0", "slot 1", "slot 2", "decode step"):
        assert f">{label}</text>" in page
    assert "unscheduled" not in page
    ticks = [float(x) for x in re.findall(r'text-anchor="middle" fill="#222">([\d.]+)</text>', page)]
    assert ticks[0] == 0 and ticks[-1] <= 420 and len(ticks) >= 3


def test_sc_samples_are_roots_and_unscheduled_threads_get_a_row():
    page = viewer.render_html(sc_record())
    nodes = _nodes(page).nodes
    assert [(path, depth) for path, _, depth in nodes] == [("s0", 1), ("s1", 1), ("s2", 1)]
    assert ">unscheduled</text>" in page and ">slot 0</text>" in page
    assert sorted(title.split(" · ")[0] for _, title in _bars(page)) == ["s0", "s1"]
    assert "not drawn (no decode steps): s2" in page
    assert "not verified" in page and "no &lt;answer&gt; found" in page
    assert "<dt>answer</dt><dd>none</dd>" in page


def test_no_thread_is_dropped_from_the_tree():
    threads = [
        {"id": 0, "path": "a", "parent": 1},  # a and b point at each other
        {"id": 1, "path": "b", "parent": 0},
        {"id": 2, "path": "orphan", "role": "child", "parent": 99, "prompt": None},
    ]
    nodes = _nodes(viewer.render_html({"threads": threads})).nodes
    assert sorted(path for path, _, _ in nodes) == ["a", "b", "orphan"]


def test_record_without_threads():
    page = viewer.render_html(empty_record())
    assert page.count("no threads") == 2  # tree and timeline
    assert "<svg" not in page and not _bars(page) and not _nodes(page).nodes


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_load_result_by_id(tmp_path):
    records = [dict(apr_record(), problem={"id": i, "nums": [i], "target": i}) for i in (5, 3, 9)]
    path = _write_jsonl(tmp_path / "r.jsonl", records)
    assert viewer.load_result(path, 3)["problem"]["id"] == 3
    assert viewer.load_result(path, 9) == records[2]
    with pytest.raises(KeyError, match=r"problem id 1 not in .*r\.jsonl; available ids: 5, 3, 9"):
        viewer.load_result(path, 1)  # index 1 exists, but records have ids


def test_load_result_lists_at_most_ten_ids(tmp_path):
    path = _write_jsonl(tmp_path / "r.jsonl", [{"problem": {"id": 100 + i}} for i in range(12)])
    with pytest.raises(KeyError) as info:
        viewer.load_result(path, 0)
    message = str(info.value)
    assert "100, 101" in message and "109" in message and "110" not in message and "12 in all" in message


def test_load_result_by_index_without_ids(tmp_path):
    path = _write_jsonl(tmp_path / "r.jsonl", [{"mode": "apr"}, {"mode": "sc"}])
    assert viewer.load_result(path, 1) == {"mode": "sc"}
    with pytest.raises(KeyError, match="no ids"):
        viewer.load_result(path, 2)


def test_load_result_malformed_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": {"id": 0}}\n\n{"problem": {"id": 1\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        viewer.load_result(path, 0)


@pytest.mark.parametrize("make", [apr_record, empty_record])
def test_write_view(tmp_path, make):
    record = make()
    path = _write_jsonl(tmp_path / "r.jsonl", [record])
    pid = record["problem"]["id"]
    html_out = viewer.write_view(path, pid, tmp_path / "out" / "view.html")
    assert html_out == tmp_path / "out" / "view.html"
    assert html_out.read_text() == viewer.render_html(record)
    png_out = viewer.write_view(path, pid, tmp_path / "view.png")
    assert png_out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"\.txt"):
        viewer.write_view(path, pid, tmp_path / "view.txt")
