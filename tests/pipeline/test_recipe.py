"""Recipes: every shipped recipe loads, and every kind of mistake is one line naming the key."""

from pathlib import Path

import pytest

from convforge.cli import main
from convforge.errors import UserError
from convforge.pipeline.recipe import Recipe, load_recipe

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.model_config().resolved().arch == recipe.model["arch"]


def test_default_yaml_is_the_built_in_default():
    """`convforge demo` (Recipe()) and `make demo` (recipes/default.yaml) run the same thing."""
    assert load_recipe(RECIPES / "default.yaml") == Recipe()


def test_transfer_recipe_has_both_halves():
    recipe = load_recipe(RECIPES / "transfer.yaml")
    assert recipe.pretrain.dataset.startswith("synthetic") and recipe.train.dataset == "digits"
    assert recipe.finetune.strategy == "auto"


def test_values_take_their_types(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: r\nmodel: {arch: vgg11_bn, stem: small}\n"
        "train: {epochs: 2, lr: 1, augment: {preset: strong, mixup: 0.2}}\n"
        "tune: {batch_sizes: [1, 4], backends: [ort-cpu]}\nbench: {seconds: 1}\n"
    )
    recipe = load_recipe(path)
    assert recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float)
    assert recipe.train.augment.preset == "strong" and recipe.train.augment.mixup == 0.2
    assert recipe.tune.settings.batch_sizes == (1, 4) and recipe.tune.backends == ["ort-cpu"]
    assert recipe.bench.settings.seconds == 1.0 and recipe.bench.backends is None
    # Unset sections keep the default recipe's values, not the command line's.
    assert recipe.tune.settings.budget_seconds == Recipe().tune.settings.budget_seconds


ERRORS = [
    ("bogus: 1\n", "unknown key bogus; accepted: name, description, model"),
    ("train: {epoch: 3}\n", "unknown key train.epoch; accepted: dataset, input_size"),
    ("train: {augment: {flips: true}}\n", "unknown key train.augment.flips; accepted: preset"),
    ("train: {epochs: ten}\n", "train.epochs must be an integer, got str 'ten'"),
    ("train: {epochs: true}\n", "train.epochs must be an integer, got bool True"),
    ("train: {epochs: 0}\n", "train: epochs must be a positive integer, got 0"),
    ("train: {channels_last: 1}\n", "train.channels_last must be true or false, got int 1"),
    ("train: {optimizer: adam}\n", "train: unknown optimizer 'adam'; choose one of: sgd, adamw"),
    ("train: {dataset: imagenet}\n", "train.dataset: unknown dataset 'imagenet'; choose one of:"),
    ("train: {dataset: 'synthetic:colors=3'}\n", "train.dataset: bad synthetic option"),
    ("train: {dataset: cifar10}\n", "train.dataset: dataset 'cifar10' needs a folder"),
    ("train: {augment: {preset: wild}}\n", "train.augment: unknown augmentation preset 'wild'"),
    ("model: {arch: resnet19}\n", "model.arch: unknown model 'resnet19'; choose one of:"),
    ("model: {stem: small}\n", "model.arch is missing"),
    ("model: {arch: resnet18, options: {depth: 3}}\n", "model 'resnet18' has no option depth"),
    ("model: {arch: resnet18, num_classes: 3}\n", "unknown key model.num_classes"),
    ("model: resnet18\n", "model must be a mapping of keys to values, got str 'resnet18'"),
    ("tune: {batch_sizes: 8}\n", "tune.batch_sizes must be a non-empty list, e.g. [1, 8]"),
    ("tune: {batch_sizes: [1, x]}\n", "tune.batch_sizes entry must be an integer, got str 'x'"),
    ("tune: {max_drop: -1}\n", "tune: tune needs max_drop >= 0"),
    ("bench: {backends: [ort-gpu]}\n", "unknown backend in bench.backends 'ort-gpu'"),
    ("bench: {batch_sizes: [0]}\n", "bench.batch_sizes entry must be a positive integer"),
    ("export: {input_format: rgb}\n", "export: unknown --input-format 'rgb'"),
    ("export: {triton_repo: x}\n", "unknown key export.triton_repo"),
    ("report: {samples: 0}\n", "report.samples must be a positive integer, got 0"),
    ("pretrain: {epochs: 1}\n", "pretrain and finetune come together"),
    ("pretrain: {}\nfinetune: {strategy: all}\n", "finetune.strategy: unknown strategy 'all'"),
    ("finetune: {}\npretrain: {}\ntrain: {dataset: digits}\nname: a/b\n", "plain folder name"),
    ("- a\n- b\n", "the recipe must be a mapping of keys to values, got list"),
    ("train: [1, 2\n", "is not valid YAML at line"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[e[1][:40] for e in ERRORS])
def test_each_mistake_is_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_recipe(path)
    assert message in str(e.value)
    assert str(e.value).startswith(f"{path}: ") or "not valid YAML" in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="recipe .*nope.yaml does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_cli_reports_a_recipe_mistake_in_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {epoch: 3}\n")
    assert main(["pipeline", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key train.epoch" in err
    assert not (tmp_path / "run").exists()  # nothing ran
