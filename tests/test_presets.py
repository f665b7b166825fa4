"""Presets: every name loads, and the mini3 side preset keeps the mini model so checkpoints transfer."""

import pytest

from apr_jax import presets


@pytest.mark.parametrize("name", presets.PRESET_NAMES)
def test_every_preset_loads_under_its_own_name(name):
    preset = presets.load(name)
    assert preset.name == name
    assert preset.data.num_train > preset.data.num_val >= 0


def test_mini3_is_the_mini_model_on_three_numbers():
    mini, mini3 = presets.load("mini"), presets.load("mini3")
    assert (mini3.data.num_inputs, mini3.data.max_num) == (3, 30)
    assert (mini3.data.apr_max_beam, mini.data.apr_max_beam) == (4, 10)  # mini3's one change to the solvers
    assert mini3.model == mini.model  # same vocabulary and shapes: an SFT run of one initialises the other
    assert mini3.data.number_mode == mini.data.number_mode == "integers"


def test_unknown_preset_is_named_in_the_error():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        presets.load("huge")


def test_command_line_strings_take_the_type_of_fields_left_unset():
    train = presets.load("tiny").train
    assert train.eval_batch_size is None and train.packing_bins is None and train.dtype is None
    changed = presets.override(train, eval_batch_size="3", packing_bins="4", dtype="bfloat16")
    assert (changed.eval_batch_size, changed.packing_bins, changed.dtype) == (3, 4, "bfloat16")
    with pytest.raises(ValueError, match="packing_bins: expected a Python literal"):
        presets.override(train, packing_bins="four")


def test_an_optional_field_can_be_unset_so_epochs_can_replace_steps():
    train = presets.load("tiny").train
    assert train.steps is not None and train.epochs is None
    changed = presets.override(train, steps="None", epochs="2.5")
    assert (changed.steps, changed.epochs) == (None, 2.5)
    with pytest.raises(ValueError, match="set exactly one of steps and epochs.*--epochs E"):
        presets.override(train, epochs="2")
    with pytest.raises(ValueError, match="batch_size: expected int, got 'None'"):
        presets.override(train, batch_size="None")


def test_train_takes_steps_or_epochs_not_both():
    from apr_jax import cli

    args = cli.build_parser().parse_args(["train", "--data", "d", "--method", "sosp", "--out", "o", "--epochs", "3"])
    assert (args.epochs, args.steps) == (3.0, None)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--data", "d", "--method", "sosp", "--out", "o",
                                       "--epochs", "3", "--steps", "9"])
