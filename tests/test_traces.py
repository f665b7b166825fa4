"""The trace language against the release's golden demonstrations, and parser robustness."""

import pytest
from hypothesis import given, settings, strategies as st

from apr_jax.countdown import game, traces


def test_golden_apr_demonstrations_rebuild_byte_exact(golden_apr):
    """Child prompts, child returns, join blocks and parent continuations rebuilt by our format code equal
    the recorded text byte for byte (check_demonstration raises on the first difference)."""
    spawns = 0
    for rec in golden_apr:
        traces.check_demonstration(rec["trace_dict"])
        assert rec["search_path"] == rec["trace_dict"]["main_calls"][-1]
        spawns += len(rec["trace_dict"]["sub_calls"])
    assert spawns >= 30


def test_golden_child_prompt_example(golden_apr):
    rec = golden_apr[0]
    first = rec["trace_dict"]["main_calls"][0]
    items = traces.parse_spawn(first)
    assert [i.node_id for i in items] == ["0,1", "0,2", "0,0", "0,3", "0,4"]
    assert traces.child_prompt(first, "0,0") == (
        "Moving to Node #0,0\nCurrent State: 50:[4, 16, 46], Operations: ['30+16=46']")


def test_every_golden_call_round_trips_line_by_line(golden_apr, golden_sosp):
    texts = [t for r in golden_apr for _, t in traces.iter_calls(r["trace_dict"])]
    texts += [r["search_path"] for r in golden_sosp]
    for text in texts:
        assert traces.render_trace(traces.parse_trace(text)) == text


def test_golden_answers_verify(golden_apr, golden_sosp):
    solved = 0
    for rec in golden_apr + golden_sosp:
        path = traces.solution_path(rec["search_path"])
        if path is not None:
            solved += 1
            assert game.verify_path(rec["nums"], rec["target"], path).ok
    assert solved >= 30


def test_prompts_and_prefixes():
    assert traces.sosp_prompt([22, 26, 31, 53], 27) == "Current State: 27:[22, 26, 31, 53], Operations: []"
    assert traces.apr_prompt([22, 26], 27) == "Moving to Node #0\nCurrent State: 27:[22, 26], Operations: []"
    assert traces.token_budget(513, 4096) == 1024 and traces.token_budget(9000, 4096) == 4096
    assert traces.strip_condition_prefix("Sub Call Budget: 10 Moving") == ("Sub Call Budget: 10 ", "Moving")
    assert traces.strip_condition_prefix("Token Budget: 512 Current") == ("Token Budget: 512 ", "Current")


def test_spawn_errors_are_named():
    body = "Moving to Node #0\nGenerated Node #0,0: 5:[1, 4] Operation: 2+2=4\n"
    with pytest.raises(traces.TraceFormatError, match="never closed"):
        traces.parse_spawn(body + "<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,0\n")
    with pytest.raises(traces.TraceFormatError, match="no '<Calling Sub Searches>'"):
        traces.parse_spawn(body)
    with pytest.raises(traces.TraceFormatError, match="malformed spawn line"):
        traces.parse_spawn(body + "<Calling Sub Searches>\n<Start Sub Search 0 at lvl 1>\n<End Calling Sub Searches>\n")
    with pytest.raises(traces.TraceFormatError, match="never generated node"):
        traces.child_prompt(body, "0,7")


def test_join_block_and_continuation():
    call = ("Moving to Node #0\nCurrent State: 5:[1, 2, 2], Operations: []\n"
            "Exploring Operation: 2+2=4, Resulting Numbers: [1, 4]\nGenerated Node #0,0: 5:[1, 4] Operation: 2+2=4\n"
            "Exploring Operation: 1+2=3, Resulting Numbers: [2, 3]\nGenerated Node #0,1: 5:[2, 3] Operation: 1+2=3\n")
    spawn = call + traces.spawn_block(1, ["0,1", "0,0"])
    assert traces.ends_with_spawn(spawn)
    child = traces.child_prompt(call, "0,0")
    assert child == "Moving to Node #0,0\nCurrent State: 5:[1, 4], Operations: ['2+2=4']"
    path = ("Moving to Node #0,0\nCurrent State: 5:[1, 4], Operations: ['2+2=4']\n"
            "Exploring Operation: 1+4=5, Resulting Numbers: [5]\n5,5 equal: Goal Reached\n")
    child_text = child + "\nExploring Operation: 1+4=5, Resulting Numbers: [5]\n5,5 equal: Goal Reached\n" + path
    assert traces.child_return(child_text) == path
    assert traces.child_return(child + "\nNo solution found.\n") is None
    cont = traces.parent_continuation(spawn, [None, path])
    assert cont == call + ("<Sub Searches>\n<No Solution in Sub Search 0 at level 1 at Node #0,1>\n"
                           "<Goal Reached in Sub Search 1 at level 1 at Node #0,0>\n" + path + "<End Sub Searches>\n")
    with pytest.raises(ValueError, match="2 children spawned but 1"):
        traces.parent_continuation(spawn, [None])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_golden_calls_never_crash_the_parsers(golden_apr, data):
    rec = data.draw(st.sampled_from(golden_apr))
    text = data.draw(st.sampled_from(rec["trace_dict"]["main_calls"]))
    pos = data.draw(st.integers(0, len(text) - 1))
    cut = data.draw(st.booleans())
    junk = data.draw(st.text(alphabet="0123456789,#:[]<>\n abc", max_size=8))
    mutated = text[:pos] + junk + ("" if cut else text[pos + 1:])
    # each parser either returns a value or raises its own named error, never anything else
    for fn in (traces.parse_spawn, traces.child_prompts, traces.parse_trace):
        try:
            fn(mutated)
        except traces.TraceFormatError:
            pass
    assert traces.solution_path(mutated) is None or "Goal Reached" in mutated
    traces.ends_with_spawn(mutated)


def test_path_operations_reads_exploring_lines_and_skips_garbage():
    path = ("Exploring Operation: 53-22=31, Resulting Numbers: [26, 31, 31]\n}}}garbage\n"
            "Exploring Operation: 31/31=1, Resulting Numbers: [26, 1]\n27,27 equal: Goal Reached\n")
    assert traces.path_operations(path) == ("53-22=31", "31/31=1")
    assert traces.path_operations(None) == ()


def test_is_goal_line_matches_exactly_the_lines_solution_path_splits_on():
    assert traces.is_goal_line("31,31 equal: Goal Reached")
    assert not traces.is_goal_line("31,30 unequal: No Solution")
    assert not traces.is_goal_line("x,31 equal: Goal Reached")  # a model's garbage ending like a goal line
    assert not traces.is_goal_line("31,31 equal: Goal Reached\n")
    text = "a\n5,5 equal: Goal Reached\nb\n5,5 equal: Goal Reached\n"
    lines = text.split("\n")
    assert [i for i, line in enumerate(lines) if traces.is_goal_line(line)] == [1, 3]
    assert traces.solution_path(text) == "\n".join(lines[2:4]) + "\n"
