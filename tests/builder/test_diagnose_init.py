"""The lecture's init experiment, asserted on numbers (10-layer plain CNN, no norm)."""

import pytest

from convforge.builder import ModelConfig
from convforge.builder.diagnose_init import (
    as_record,
    format_runs,
    format_spread,
    plot_init_experiment,
    ratio_spread,
    run_init_experiment,
)
from convforge.errors import UserError

INITS = ["small", "xavier", "kaiming"]


def _ratios(activation):
    cfg = ModelConfig("plain", num_classes=10, stem="small", norm="none", activation=activation)
    runs = run_init_experiment(cfg, INITS, input_size=32, batch_size=32, seed=0)
    assert [len(r.layers) for r in runs] == [10, 10, 10]
    return {r.config.init: r.depth_ratio for r in runs}, runs


def test_relu_small_collapses_kaiming_holds_xavier_fades():
    ratios, runs = _ratios("relu")
    assert ratios["small"] < 1e-6  # 0.01 * randn: std shrinks ~5x per layer
    assert 0.25 < ratios["kaiming"] < 4  # He: std about constant through depth
    assert ratios["xavier"] < 0.1  # without the 2, ReLU halves the variance each layer
    assert runs[0].layers[-1].std < 1e-8


def test_tanh_xavier_holds_small_collapses():
    ratios, _ = _ratios("tanh")
    assert 0.25 < ratios["xavier"] < 4
    assert ratios["small"] < 1e-4


def test_norm_rescues_a_bad_init():
    cfg = ModelConfig("plain", num_classes=10, stem="small", norm="batch")
    (run,) = run_init_experiment(cfg, ["small"])
    assert 0.25 < run.depth_ratio < 4


def test_reports_render(tmp_path):
    _, runs = _ratios("relu")
    plot_init_experiment(runs, tmp_path / "init.png")
    assert (tmp_path / "init.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = as_record(runs)
    assert [r["init"] for r in record["runs"]] == INITS
    assert record["config"]["activation"] == "relu"
    assert len(record["runs"][0]["layers"]) == 10
    text = format_runs(runs)
    assert "features.29" in text and "kaiming std" in text


def test_bad_batch_size_is_a_user_error():
    with pytest.raises(UserError, match=r"batch size \(batch statistics\) must be an integer >= 2"):
        run_init_experiment(ModelConfig("plain"), ["small"], batch_size=1)


def test_unknown_init_is_a_user_error():
    with pytest.raises(UserError, match="unknown --init 'he'"):
        run_init_experiment(ModelConfig("plain"), ["he"])


def test_one_draw_of_the_relu_kaiming_ratio_says_little():
    """Why the README and the old demo disagreed (0.97 against 0.42): the head is built, and
    draws from the generator, before the weights are initialized, so the head size alone
    changes seed 0's draw. Over seeds the ratio spreads widely around ~1; the median is
    the number both now print."""
    ratio = {}
    for classes in (10, 1000):
        cfg = ModelConfig("plain", num_classes=classes, stem="small", norm="none")
        (run,) = run_init_experiment(cfg, ["kaiming"], seed=0)
        ratio[classes] = run.depth_ratio
    assert abs(ratio[1000] - ratio[10]) > 0.3
    config = ModelConfig("plain", stem="small", norm="none")
    kaiming = ratio_spread(config, ["kaiming"], range(10))["kaiming"]
    assert kaiming["min"] <= kaiming["median"] <= kaiming["max"] and kaiming["seeds"] == 10
    assert kaiming["max"] / kaiming["min"] > 2  # 0.47 to 1.09
    spread = ratio_spread(config, INITS, range(2))
    assert spread["small"]["max"] < 1e-6 and spread["xavier"]["max"] < 0.1
    assert format_spread(spread).startswith("over 2 seeds, median (min-max): small ")
