"""The arithmetic decoding aid: what it writes after '=' and after ', Resulting Numbers: ', and when it stays silent."""

import pytest

from apr_jax.countdown import game, traces
from apr_jax.data.tokenizer import BOS_ID, EOS_ID, build_tokenizer
from apr_jax.inference.aid import ArithmeticAid, apply_op, make_aid
from apr_jax.inference.runtime import Codec

STATE = "Moving to Node #0\nCurrent State: 69:[5, 35, 50, 94], Operations: []\n"


@pytest.fixture(scope="module", params=["digits", "integers"])
def codec(request):
    return Codec(build_tokenizer(request.param, 3), BOS_ID, EOS_ID)


def forced_text(codec, text):
    aid = ArithmeticAid(codec)
    ids = codec.prompt_ids(text)
    assert ids[-1] in aid.triggers
    return codec.text(aid.force(ids))


@pytest.mark.parametrize("op,expected", [("94-35=", "59"), ("5*50=", "250"), ("35+94=", "129"), ("50/5=", "10")])
def test_result_after_an_operation(codec, op, expected):
    assert forced_text(codec, STATE + traces.EXPLORING + op) == expected


@pytest.mark.parametrize("op", ["35-94=", "50/3=", "7/0="])
def test_no_result_for_an_operation_outside_the_rules(codec, op):
    assert forced_text(codec, STATE + traces.EXPLORING + op) == ""


def test_resulting_numbers_match_the_games_successors(codec):
    for new_nums, op in game.successors([5, 35, 50, 94]):
        text = STATE + traces.EXPLORING + op + traces.RESULTING
        assert forced_text(codec, text) == traces.fmt_nums(new_nums)


def test_resulting_numbers_use_the_latest_state_and_need_its_numbers(codec):
    later = STATE + "Moving to Node #0,0\nCurrent State: 69:[5, 50, 59], Operations: ['94-35=59']\n"
    assert forced_text(codec, later + traces.EXPLORING + "59-50=9" + traces.RESULTING) == "[5, 9]"
    assert forced_text(codec, later + traces.EXPLORING + "94-35=59" + traces.RESULTING) == ""  # 94 is gone
    assert forced_text(codec, traces.EXPLORING + "59-50=9" + traces.RESULTING) == ""  # no state line
    garbled = "Current State: 69:[5, , 50], Operations: []\n"
    assert forced_text(codec, garbled + traces.EXPLORING + "50-5=45" + traces.RESULTING) == ""


def test_apply_op_and_make_aid():
    assert [apply_op(8, o, 2) for o in "+-*/"] == [10, 6, 16, 4]
    assert apply_op(2, "-", 8) is None and apply_op(9, "/", 2) is None
    codec = Codec(build_tokenizer("digits"), BOS_ID, EOS_ID)
    assert make_aid("none", codec) is None
    with pytest.raises(ValueError, match="aid must be one of"):
        make_aid("calculator", codec)


ROOT = "Sub Call Budget: 2 Moving to Node #0\nCurrent State: 31:[12, 26, 17], Operations: []\n"
LINES = ["Exploring Operation: 12+17=29, Resulting Numbers: [26, 29]\n",
         "Generated Node #0,0: 31:[26, 29] Operation: 12+17=29\n",
         "Exploring Operation: 26-12=14, Resulting Numbers: [17, 14]\n",
         "Generated Node #0,1: 31:[17, 14] Operation: 26-12=14\n"]


def spawn_forced(codec, text):
    aid = make_aid("spawn", codec)
    ids = codec.prompt_ids(text)
    assert ids[-1] in aid.triggers
    forced = aid.force(ids)
    if forced:
        assert forced[-1] == codec.eos_id
    return codec.text(forced)


def upto_operation(line):  # a Generated Node line up to and including its ' Operation: ' trigger
    return line[:line.index(traces.OPERATION) + len(traces.OPERATION)]


def test_spawn_aid_ends_the_root_expansion_at_the_budget(codec):
    assert spawn_forced(codec, ROOT + LINES[0] + upto_operation(LINES[1])) == ""  # 1 of 2 nodes
    text = ROOT + "".join(LINES[:3]) + upto_operation(LINES[3])
    block = "26-12=14\n" + traces.spawn_block(1, ["0,0", "0,1"])
    assert spawn_forced(codec, text) == block
    full = text + block  # what the runtime then parses: a well-formed spawn naming both nodes
    assert [p for _, p in traces.child_prompts(full)] == [
        "Moving to Node #0,0\nCurrent State: 31:[26, 29], Operations: ['12+17=29']",
        "Moving to Node #0,1\nCurrent State: 31:[17, 14], Operations: ['26-12=14']"]


def test_spawn_aid_leaves_everything_else_to_the_model(codec):
    second = upto_operation(LINES[3])
    plain_root = ROOT.split(" ", 4)[-1]  # no 'Sub Call Budget' prefix
    assert spawn_forced(codec, plain_root + "".join(LINES[:3]) + second) == ""
    repeat = LINES[2] + "Generated Node #0,0: 31:[17, 14] Operation: "  # a repeated node id
    assert spawn_forced(codec, ROOT + "".join(LINES[:2]) + repeat) == ""
    moved = ROOT + "".join(LINES[:2]) + "Moving to Node #0,0\nCurrent State: 31:[26, 29], Operations: ['12+17=29']\n"
    assert spawn_forced(codec, moved + LINES[2] + second) == ""  # past the root's expansion
    joined = ROOT + "".join(LINES) + "<Sub Searches>\n<End Sub Searches>\n" + LINES[2]
    assert spawn_forced(codec, joined + second) == ""  # a continuation call


def test_combined_aid_routes_each_trigger():
    codec = Codec(build_tokenizer("integers", 3), BOS_ID, EOS_ID)
    both = make_aid("arithmetic+spawn", codec)
    assert both.name == "arithmetic+spawn"
    assert codec.text(both.force(codec.prompt_ids(STATE + traces.EXPLORING + "94-35="))) == "59"
    text = ROOT + "".join(LINES[:3]) + upto_operation(LINES[3])
    assert codec.text(both.force(codec.prompt_ids(text))).startswith("26-12=14\n<Calling Sub Searches>\n")


def test_spawn_aid_needs_a_positive_budget_and_a_well_formed_line(codec):
    text = "".join(LINES[:3]) + upto_operation(LINES[3])
    assert spawn_forced(codec, ROOT.replace("Budget: 2", "Budget: 0") + text) == ""  # 0: no spawn asked for
    assert spawn_forced(codec, ROOT.replace("Budget: 2", "Budget: 1") + LINES[0] + upto_operation(LINES[1])) != ""
    garbled = LINES[2] + "Generated Node #0,1: 31:[17, Operation: "  # the finished line would not parse
    assert spawn_forced(codec, ROOT + "".join(LINES[:2]) + garbled) == ""
