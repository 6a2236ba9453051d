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
    assert recipe.bench.settings.iters == Recipe().bench.settings.iters  # the recipe's, not 50
    # Unset sections keep the default recipe's values, not the command line's.
    assert recipe.tune.settings.budget_seconds == Recipe().tune.settings.budget_seconds


ERRORS = [
    ("bogus: 1\n", "unknown key bogus; accepted: name, description, model"),
    ("train: {epoch: 3}\n", "unknown key train.epoch; accepted: dataset, input_size"),
    ("train: {augment: {flips: true}}\n", "unknown key train.augment.flips; accepted: preset"),
    ("train: {epochs: ten}\n", "train.epochs takes an integer, got 'ten'"),
    ("train: {epochs: true}\n", "train.epochs takes an integer, got True"),
    ("train: {epochs: 2.5}\n", "train.epochs takes an integer, got 2.5"),
    ("train: {epochs: null}\n", "train.epochs takes an integer, got None"),
    ("train: {epochs: 0}\n", "train.epochs must be a positive integer, got 0"),
    ("train: {channels_last: maybe}\n", "train.channels_last takes true or false (also yes/no"),
    ("train: {lr: fast}\n", "train.lr takes a number, got 'fast'"),
    ("train: {optimizer: adam}\n", "unknown train.optimizer 'adam'; choose one of: sgd, adamw"),
    ("train: {dataset: imagenet}\n", "train.dataset: unknown dataset 'imagenet'; choose one of:"),
    ("train: {dataset: 'synthetic:colors=3'}\n", "train.dataset: bad synthetic option"),
    ("train: {dataset: cifar10}\n", "train.dataset: dataset 'cifar10' needs a folder"),
    ("train: {augment: {preset: wild}}\n", "train.augment: unknown augmentation preset 'wild'"),
    ("model: {arch: resnet19}\n", "model.arch: unknown model 'resnet19'; choose one of:"),
    ("model: {stem: small}\n", "model.arch is missing"),
    ("model: {arch: resnet18, options: {depth: 3}}\n", "model 'resnet18' has no option depth"),
    ("model: {arch: resnet18, num_classes: 3}\n", "unknown key model.num_classes"),
    ("model: resnet18\n", "model must be a mapping of keys to values, got str 'resnet18'"),
    ("train: {augment: mild}\n", "train.augment takes a mapping of keys to values, got 'mild'"),
    ("tune: {batch_sizes: 8}\n", "tune.batch_sizes takes a non-empty list of integers"),
    ("tune: {batch_sizes: []}\n", "tune.batch_sizes takes a non-empty list of integers"),
    ("tune: {batch_sizes: [1, x]}\n", "tune.batch_sizes entry takes an integer, got 'x'"),
    ("tune: {max_drop: -1}\n", "tune.max_drop must be a number >= 0, got -1.0"),
    ("tune: {prune_ratio: 0.5}\n", "tune.prune_ratio must be a number >= 1, got 0.5"),
    ("tune: {budget_seconds: 0}\n", "tune.budget_seconds must be a number >= 0.001, got 0.0"),
    ("tune: {rounds: 0}\n", "tune.rounds must be a positive integer, got 0"),
    ("bench: {backends: [ort-gpu]}\n", "unknown backend in bench.backends 'ort-gpu'"),
    ("bench: {backends: []}\n", "bench.backends takes a non-empty list of strings, got []"),
    ("bench: {batch_sizes: [0]}\n", "bench.batch_sizes entry must be a positive integer, got 0"),
    ("bench: {iters: 0}\n", "bench.iters must be a positive integer, got 0"),
    ("bench: {seconds: -1}\n", "bench.seconds must be a number >= 0, got -1.0"),
    ("bench: {epochs: 3}\n", "unknown key bench.epochs; accepted: batch_sizes,"),
    ("export: {input_format: rgb}\n", "unknown export.input_format 'rgb'; choose one of:"),
    ("export: {int8_max_drop: 101}\n", "export.int8_max_drop must be a number from 0 to 100"),
    ("export: {calib_method: mse}\n", "unknown export.calib_method 'mse'; choose one of: minmax"),
    ("export: {triton_repo: x}\n", "unknown key export.triton_repo"),
    ("report: {samples: 0}\n", "report.samples must be a positive integer, got 0"),
    ("finetune: {pretrained: x.pt}\npretrain: {}\n", "unknown key finetune.pretrained"),
    ("pretrain: {epochs: 1}\n", "pretrain and finetune come together"),
    ("pretrain: {}\nfinetune: {strategy: all}\n", "finetune.strategy: unknown strategy 'all'"),
    ("finetune: {}\npretrain: {}\ntrain: {dataset: digits}\nname: a/b\n", "plain folder name"),
    ("compress: {}\n", "give one target: compress.speedup X (MAC reduction) or compress.latency"),
    ("compress: {speedup: 1, latency_ms: 3}\n", "give one target: compress.speedup"),
    ("compress: {speedup: 1}\n", "compress.speedup must be > 1 (2.0 halves the MACs), got 1"),
    ("compress: {latency_ms: 0}\n", "compress.latency_ms must be > 0, got 0"),
    ("compress: {speedup: fast}\n", "compress.speedup takes a number, got 'fast'"),
    ("compress: {speedup: 2, rounds: 0}\n", "compress.rounds must be a positive integer, got 0"),
    ("compress: {speedup: 2, max_drop: -1}\n", "compress.max_drop must be a number from 0 to 100"),
    ("compress: {speedup: 2, importance: random}\n", "unknown compress.importance 'random'"),
    ("compress: {speedup: 2, backend: tpu}\n", "unknown compress.backend 'tpu'; choose one of"),
    ("compress: {speedup: 2, dataset: imagenet}\n", "compress.dataset: unknown dataset"),
    ("compress: {speedup: 2, checkpoint: a.pt}\n", "unknown key compress.checkpoint; accepted"),
    ("compress: {speedup: 2, out: small.pt}\n", "unknown key compress.out; accepted: speedup"),
    ("compress: 2\n", "compress must be a mapping of keys to values, got int 2"),
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
