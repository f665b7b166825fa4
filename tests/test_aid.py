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
