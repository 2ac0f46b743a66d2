"""The typed recipe: every key's type, range and choices checked up front, one line and exit 2 for
each bad value, and the dataclass tree round-tripping through what run directories store."""

import dataclasses

import pytest

from qat_sadam.cli import main
from qat_sadam.errors import RecipeError
from qat_sadam.train.recipe import Recipe, load_recipe

# Each value here trained silently or ended in a traceback before the recipe was typed (issue 51).
BAD = [
    ("grad_clip=-1", "recipe key 'grad_clip' must be greater than 0, got -1"),
    ("schedule.warmup_epochs=-1", "recipe key 'schedule.warmup_epochs' must be at least 0, got -1"),
    ("schedule.min_lr=-1", "recipe key 'schedule.min_lr' must be at least 0, got -1"),
    ("max_steps=-1", "recipe key 'max_steps' must be at least 1, got -1"),
    ("max_steps=0", "recipe key 'max_steps' must be at least 1, got 0"),
    ("model.width=-4", "recipe key 'model.width' must be at least 1, got -4"),
    ("data.image_size=-8", "recipe key 'data.image_size' must be at least 1, got -8"),
    ("data.image_size=0", "recipe key 'data.image_size' must be at least 1, got 0"),
    ("model.dropout=1.5", "recipe key 'model.dropout' must be in [0, 1), got 1.5"),
    ("model.widths=[x]", "recipe key 'model.widths' must be a list of positive integers, got ['x']"),
    ("data.subset=0", "recipe key 'data.subset' must be at least 1, got 0"),
    ("data.subset=-5", "recipe key 'data.subset' must be at least 1, got -5"),
    ("data.test_subset=0", "recipe key 'data.test_subset' must be at least 1, got 0"),
    ("epochs=.inf", "recipe key 'epochs' must be an integer, got float inf"),
    ("grad_clip=.nan", "recipe key 'grad_clip' must be a finite number, got nan"),
    ("distill.temperature=0", "recipe key 'distill.temperature' must be greater than 0, got 0"),
    ("quant.bits=9", "recipe key 'quant.bits' must be one of 2, 3, 4, 5, 6, 7, 8, got 9"),
    ("data.eval_on=train", "recipe key 'data.eval_on' must be one of test, val, got 'train'"),
    ("model.unknown=1", "unknown recipe key 'model.unknown'"),
    ("data=3", "recipe key 'data' must be a mapping"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_each_bad_value_is_one_line_and_exit_2(override, message, capsys):
    assert main(["recipe", "show", "quickstart", "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_a_recipe_round_trips_through_what_a_run_stores():
    r = load_recipe("quickstart_finetune", ["model.checkpoint=."])
    again = Recipe.from_saved(r.to_dict())
    assert again == r and again.quant.config() == r.quant.config()
    assert r.bn_reestimate_batches == 32 and r.starts_trained and r.quantized  # the fine-tune default


def test_a_saved_recipe_from_before_a_key_existed_gets_its_default():
    saved = load_recipe("quickstart").to_dict()
    del saved["data"]["augment"], saved["host_memory"]
    old = Recipe.from_saved(saved)
    assert old.host_memory == "auto" and old.data.augment.crop_padding == 0


def test_a_float_recipe_refuses_quantizer_settings_it_would_ignore():
    with pytest.raises(RecipeError, match="'quant.bits' has no effect with quant.enabled: false"):
        load_recipe("quickstart_float", ["quant.bits=4"])


def test_every_key_has_a_meaning_for_the_reference():
    def keys(cls):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                keys(f.default_factory)

    keys(Recipe)


def test_bits_set_weights_and_activations_together_or_apart():
    w4a4 = load_recipe("quickstart_float", ["quant.enabled=true"], bits="4").quant.config()
    w4a8 = load_recipe("quickstart_float", ["quant.enabled=true"], bits="W4A8").quant.config()
    assert (w4a4.weight.bits, w4a4.activation.bits) == (4, 4)
    assert (w4a8.weight.bits, w4a8.activation.bits, w4a8.first_last_bits) == (4, 8, 8)
    # over a recipe's own quant.bits, W{w}A{a} wins on both sides
    assert load_recipe("quickstart", bits="W8A4").quant.config().weight.bits == 8


OPTIONS = [
    (
        ["sensitivity", "quickstart_finetune", "--samples", "0"],
        "argument --samples: expected a positive whole number, got 0",
    ),
    (["sensitivity", "quickstart_finetune", "--budget", "nan"], "must be >= 1, got nan"),
    (["sensitivity", "quickstart_finetune", "--budget", "inf"], "must be >= 1, got inf"),
    (["export", "runs/x", "--samples", "-1"], "argument --samples: expected a positive whole number, got -1"),
    (["validate", "m.onnx", "--samples", "ten"], "argument --samples: expected a positive whole number, got 'ten'"),
    (["compare", "quickstart", "--optimizers", "adamw", "--seeds", "0"], "argument --seeds: expected a positive"),
]


@pytest.mark.parametrize("argv,message", OPTIONS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in OPTIONS])
def test_each_bad_command_option_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
