import pytest

from convforge.builder.training.config import TrainConfig, recipe_model
from convforge.errors import UserError


def test_defaults_resolve_by_optimizer():
    sgd = TrainConfig().resolved()
    assert sgd.lr == pytest.approx(0.1) and sgd.weight_decay == 5e-4
    adamw = TrainConfig(optimizer="adamw").resolved()
    assert adamw.lr == 1e-3 and adamw.weight_decay == 0.05


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"optimizer": "adam"}, "unknown --optimizer 'adam'; choose one of: sgd, adamw"),
        ({"schedule": "linear"}, "unknown --schedule 'linear'"),
        ({"amp": "fp8"}, "unknown --amp 'fp8'"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"batch_size": -1}, "--batch-size must be a positive integer"),
        ({"label_smoothing": 1.0}, "label smoothing must be in [0, 1)"),
        ({"ema_decay": 1.5}, "EMA decay must be in [0, 1)"),
        ({"lr": -0.1}, "learning rate must be positive"),
        ({"patience": -2}, "patience must be an integer >= 0"),
    ],
)
def test_bad_values_are_one_line_errors(kwargs, message):
    with pytest.raises(UserError) as e:
        TrainConfig(**kwargs).resolved()
    assert message in str(e.value)


def test_recipe_model_picks_stem_and_width_by_input_size():
    small = recipe_model("resnet18", 32).resolved()
    assert small.stem == "small" and small.options == {"base_width": 16}
    big = recipe_model("resnet50", 224).resolved()
    assert big.stem == "imagenet" and big.options == {"base_width": 64}
    assert recipe_model("resnet18", 32, options={"base_width": 64}).options["base_width"] == 64
    assert recipe_model("vgg11_bn", 32).resolved().options == {}
