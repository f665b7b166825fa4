"""Countdown rules and the exact verifier."""

import random

from hypothesis import given, settings, strategies as st

from apr_jax.countdown import game, traces
from apr_jax.countdown.heuristics import mult_heuristic, sum_heuristic


def test_combine_order_and_forms():
    assert game.combine(53, 22) == [(75, "53+22=75"), (1166, "53*22=1166"), (31, "53-22=31")]
    assert game.combine(8, 40) == [(48, "8+40=48"), (320, "8*40=320"), (32, "40-8=32"), (5, "40/8=5")]
    assert game.combine(31, 31)[2:] == [(0, "31-31=0"), (1, "31/31=1")]
    assert game.combine(0, 7) == [(7, "0+7=7"), (0, "0*7=0"), (7, "7-0=7")]  # no division by zero


def test_successors_append_result_at_end_in_pair_order():
    succ = game.successors([22, 26, 31])
    assert succ[0] == ([31, 48], "22+26=48")
    assert [s[1] for s in succ if s[1].startswith("22+31")] == ["22+31=53"]
    assert succ[-1][0] == [22, 5]  # last pair (26, 31), subtraction is its last legal result
    assert len(succ) == 3 * 3  # no exact division among these pairs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=2, max_size=4), st.integers(2, 60))
def test_solvable_agrees_with_exhaustive_search(nums, target):
    solution = game.solve(nums, target)
    assert game.solvable(nums, target) == (solution is not None)
    if solution:
        cur = list(nums)
        for op in solution:  # replay with the game's own move generator
            cur = next(n for n, o in game.successors(cur) if o == op)
        assert cur == [target]


def test_heuristics():
    assert sum_heuristic([10, 30], 20) == 10
    assert sum_heuristic([25], 20) == 5
    # factors of 12 in 2..12: 2, 3, 4, 6, 12
    assert mult_heuristic([5, 7, 13, 1], 12) == 1 + 1 + 1 + 1
    assert mult_heuristic([100], 12) == 88


GOOD = (
    "Moving to Node #0\n"
    "Current State: 27:[22, 26, 31, 53], Operations: []\n"
    "Exploring Operation: 53-22=31, Resulting Numbers: [26, 31, 31]\n"
    "Generated Node #0,0: 27:[26, 31, 31] Operation: 53-22=31\n"
    "Moving to Node #0,0\n"
    "Current State: 27:[26, 31, 31], Operations: ['53-22=31']\n"
    "Exploring Operation: 31/31=1, Resulting Numbers: [26, 1]\n"
    "Generated Node #0,0,0: 27:[26, 1] Operation: 31/31=1\n"
    "Moving to Node #0,0,0\n"
    "Current State: 27:[26, 1], Operations: ['53-22=31', '31/31=1']\n"
    "Exploring Operation: 26+1=27, Resulting Numbers: [27]\n"
    "27,27 equal: Goal Reached\n"
)
NUMS, TARGET = [22, 26, 31, 53], 27


def test_verifier_accepts_a_correct_path():
    assert game.verify_path(NUMS, TARGET, GOOD).ok


def _bad(old, new):
    assert old in GOOD
    return game.verify_path(NUMS, TARGET, GOOD.replace(old, new))


def test_verifier_rejects_each_class_of_wrong_answer():
    v = _bad("53-22=31, Resulting Numbers: [26, 31, 31]", "54-22=32, Resulting Numbers: [26, 31, 32]")
    assert not v.ok and "not in current numbers" in v.reason
    v = _bad("26+1=27, Resulting", "26+1=28, Resulting")
    assert not v.ok and "wrong arithmetic" in v.reason
    v = game.verify_path([7, 2, 3], 6, "Current State: 6:[7, 2, 3], Operations: []\n"
                         "Exploring Operation: 7/2=3, Resulting Numbers: [3, 3]\n")
    assert not v.ok and "inexact division" in v.reason
    v = _bad("Resulting Numbers: [26, 1]\n", "Resulting Numbers: [26, 2]\n")
    assert not v.ok and "resulting numbers" in v.reason
    v = game.verify_path(NUMS, 28, GOOD)
    assert not v.ok and "target" in v.reason
    v = game.verify_path(NUMS, TARGET, GOOD[: GOOD.index("27,27 equal")])
    assert not v.ok and "truncated" in v.reason
    v = game.verify_path(NUMS, TARGET, GOOD.replace("26+1=27, Resulting Numbers: [27]", "1-26=25, Resulting Numbers: [25]"))
    assert not v.ok and "negative" in v.reason


def test_verifier_rejects_goal_with_numbers_left():
    path = ("Current State: 27:[22, 26, 31, 53], Operations: []\n"
            "Exploring Operation: 53-26=27, Resulting Numbers: [22, 31, 27]\n27,27 equal: Goal Reached\n")
    v = game.verify_path(NUMS, TARGET, path)
    assert not v.ok and "not [27]" in v.reason


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_verifier_never_raises_on_garbage(text):
    v = game.verify_path(NUMS, TARGET, text)
    assert isinstance(v.reason, str) and not v.ok


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(GOOD) - 1), st.characters(min_codepoint=32, max_codepoint=126))
def test_verifier_on_mutated_paths_never_raises(pos, ch):
    mutated = GOOD[:pos] + ch + GOOD[pos + 1:]
    v = game.verify_path(NUMS, TARGET, mutated)
    if v.ok:  # only changes that leave every operation and the goal line intact may verify
        def semantic(text):
            return [ln for ln in text.split("\n") if ln.startswith("Exploring") or "Goal Reached" in ln]
        assert semantic(mutated) == semantic(GOOD)


def test_replay_operations():
    assert game.replay_operations([22, 26, 31, 53], ["53-22=31", "31/31=1"]) == [1, 26]
    assert game.replay_operations([22, 26, 31, 53], []) == [22, 26, 31, 53]
    assert game.replay_operations([22, 26, 31, 53], ["53-22=30"]) is None  # wrong result
    assert game.replay_operations([22, 26, 31, 53], ["22-53=-31"]) is None  # outside the grammar
    assert game.replay_operations([22, 26, 31, 53], ["7+1=8"]) is None  # numbers not there
    assert game.replay_operations([22, 26], ["26/22=1"]) is None  # inexact division
