import dataclasses

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from convforge.builder.data.augment import (
    AUTO_POLICIES,
    PRESETS,
    AugmentConfig,
    batch_mix,
    eval_resize_size,
    eval_transform,
    is_large,
    preset_values,
    train_transform,
)
from convforge.errors import UserError

MEAN = {1: [0.3], 3: [0.4, 0.5, 0.6]}
STD = {1: [0.2], 3: [0.25, 0.2, 0.3]}
# (input_size, native_size, raw height, raw width): the small path (digits-like 8 px trained at
# 32) and the large path (ImageFolder-like, images of any shape).
SMALL = (32, 8, 8, 8)
LARGE = (72, None, 50, 70)
PATHS = pytest.mark.parametrize("geometry", [SMALL, LARGE], ids=["small", "large"])
CHANNELS = pytest.mark.parametrize("channels", [1, 3])


def raw_image(channels: int, h: int, w: int, seed: int = 1) -> tv_tensors.Image:
    gen = torch.Generator().manual_seed(seed)
    return tv_tensors.Image(
        torch.randint(0, 256, (channels, h, w), dtype=torch.uint8, generator=gen)
    )


def transforms(aug, geometry, channels):
    size, native, _, _ = geometry
    train = train_transform(aug, size, MEAN[channels], STD[channels], native)
    return train, eval_transform(size, MEAN[channels], STD[channels], native)


def off(**fields) -> AugmentConfig:
    """Everything off except ``fields``."""
    return AugmentConfig(preset="none", **fields).resolved()


@PATHS
@CHANNELS
@pytest.mark.parametrize("preset", PRESETS)
def test_output_is_normalized_float_of_input_size(preset, geometry, channels):
    size, _, h, w = geometry
    train, evaluate = transforms(AugmentConfig(preset).resolved(), geometry, channels)
    x = raw_image(channels, h, w)
    for out in (train(x), evaluate(x)):
        assert type(out) is torch.Tensor
        assert out.dtype == torch.float32
        assert out.shape == (channels, size, size)


@PATHS
@CHANNELS
def test_eval_normalizes_with_mean_and_std(geometry, channels):
    _, _, h, w = geometry
    _, evaluate = transforms(off(), geometry, channels)
    x = tv_tensors.Image(torch.full((channels, h, w), 51, dtype=torch.uint8))
    out = evaluate(x)
    expected = (51 / 255 - torch.tensor(MEAN[channels])) / torch.tensor(STD[channels])
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected)
    torch.testing.assert_close(out, expected.view(-1, 1, 1).expand_as(out))


@PATHS
@CHANNELS
def test_everything_off_equals_eval(geometry, channels):
    _, _, h, w = geometry
    train, evaluate = transforms(off(), geometry, channels)
    x = raw_image(channels, h, w)
    for _ in range(3):
        assert torch.equal(train(x), evaluate(x))


@PATHS
@CHANNELS
def test_flip_gives_the_image_or_its_mirror(geometry, channels):
    _, _, h, w = geometry
    train, evaluate = transforms(off(flip=True), geometry, channels)
    x = raw_image(channels, h, w)
    plain = evaluate(x)
    mirrored = torch.flip(plain, dims=[-1])
    outs = [train(x) for _ in range(20)]
    assert all(torch.equal(o, plain) or torch.equal(o, mirrored) for o in outs)
    assert any(torch.equal(o, plain) for o in outs)
    assert any(torch.equal(o, mirrored) for o in outs)


@PATHS
@CHANNELS
@pytest.mark.parametrize(
    "fields",
    [
        {"crop": True},
        {"rotation": 30.0},
        {"color_jitter": 0.5},
        {"erasing": 1.0},
        {"auto": "autoaugment"},
        {"auto": "randaugment"},
        {"auto": "trivialaugment"},
    ],
    ids=lambda f: next(iter(f.items()))[1] if "auto" in f else next(iter(f)),
)
def test_each_option_changes_the_image(fields, geometry, channels):
    size, _, h, w = geometry
    train, evaluate = transforms(off(**fields), geometry, channels)
    x = raw_image(channels, h, w)
    plain = evaluate(x)
    outs = [train(x) for _ in range(8)]
    assert all(o.shape == (channels, size, size) and o.dtype == torch.float32 for o in outs)
    assert sum(not torch.equal(o, plain) for o in outs) >= 2


def test_erasing_fills_boxes_with_the_mean():
    train, evaluate = transforms(off(erasing=1.0), SMALL, 3)
    x = raw_image(3, 8, 8)
    out, plain = train(x), evaluate(x)
    erased = out != plain
    assert erased.any()
    assert torch.all(out[erased] == 0)


def test_color_jitter_has_saturation_only_for_rgb():
    def jitter(channels):
        train, _ = transforms(off(color_jitter=0.3), SMALL, channels)
        (j,) = [t for t in train.transforms if isinstance(t, v2.ColorJitter)]
        return j

    assert jitter(3).saturation == (0.7, 1.3)
    assert jitter(1).saturation is None
    assert jitter(1).brightness == (0.7, 1.3) and jitter(1).contrast == (0.7, 1.3)


def test_small_crop_pads_input_size_over_8_by_default():
    def crop(**fields):
        train, _ = transforms(off(crop=True, **fields), SMALL, 1)
        (c,) = [t for t in train.transforms if isinstance(t, v2.RandomCrop)]
        return c

    assert crop().padding == [4, 4, 4, 4]
    assert crop(crop_padding=2).padding == [2, 2, 2, 2]


def test_large_crop_uses_scale_min():
    train, _ = transforms(off(crop=True, scale_min=0.5), LARGE, 3)
    (c,) = [t for t in train.transforms if isinstance(t, v2.RandomResizedCrop)]
    assert c.scale == (0.5, 1.0)


def test_autoaugment_policy_follows_the_path():
    def policy(geometry):
        train, _ = transforms(off(auto="autoaugment"), geometry, 3)
        (a,) = [t for t in train.transforms if isinstance(t, v2.AutoAugment)]
        return a.policy

    assert policy(SMALL) == v2.AutoAugmentPolicy.CIFAR10
    assert policy(LARGE) == v2.AutoAugmentPolicy.IMAGENET


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_resolve_to_the_documented_values(preset):
    table = {
        "none": (False, False, 0.25, 0.0, 0.0, "none", 0.0, 0.0, 0.0),
        "light": (True, True, 0.25, 0.0, 0.0, "none", 0.0, 0.0, 0.0),
        "standard": (True, True, 0.25, 10.0, 0.2, "none", 0.0, 0.0, 0.0),
        "strong": (True, True, 0.08, 10.0, 0.2, "trivialaugment", 0.25, 0.2, 1.0),
    }
    names = ("flip", "crop", "scale_min", "rotation", "color_jitter", "auto", "erasing")
    names += ("mixup", "cutmix")
    cfg = AugmentConfig(preset).resolved()
    assert tuple(getattr(cfg, n) for n in names) == table[preset]
    assert dict(zip(names, table[preset], strict=True)) == preset_values(preset)
    assert cfg.crop_padding is None  # input_size // 8, decided by train_transform
    assert cfg.resolved() == cfg


def test_explicit_fields_override_the_preset():
    cfg = AugmentConfig("strong", crop=False, rotation=0, auto="randaugment", mixup=0).resolved()
    assert (cfg.crop, cfg.rotation, cfg.auto, cfg.mixup) == (False, 0.0, "randaugment", 0.0)
    assert cfg.cutmix == 1.0 and cfg.erasing == 0.25
    assert AugmentConfig("none", erasing=0.5).resolved().erasing == 0.5


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_never_flip_data_that_is_not_flip_safe(preset):
    cfg = AugmentConfig(preset).resolved(flip_safe=False)
    assert cfg.flip is False
    assert cfg.resolved() == cfg  # stays off when resolved again
    train, _ = transforms(cfg, SMALL, 1)
    assert not any(isinstance(t, v2.RandomHorizontalFlip) for t in train.transforms)
    # An explicit request is the user's choice.
    assert AugmentConfig(preset, flip=True).resolved(flip_safe=False).flip is True


@PATHS
@CHANNELS
def test_eval_is_deterministic_and_holds_no_random_transform(geometry, channels):
    _, _, h, w = geometry
    _, evaluate = transforms(AugmentConfig("strong").resolved(), geometry, channels)
    allowed = (v2.Resize, v2.CenterCrop, v2.ToDtype, v2.Normalize, v2.ToPureTensor)
    assert all(isinstance(t, allowed) for t in evaluate.transforms)
    x = raw_image(channels, h, w)
    torch.manual_seed(1)
    first = evaluate(x)
    torch.manual_seed(2)
    assert torch.equal(first, evaluate(x))


def test_path_choice_and_eval_resize():
    assert not is_large(32, 8) and not is_large(64, 32)
    assert is_large(224, None) and is_large(32, None) and is_large(96, 32)
    assert eval_resize_size(224, None) == 256
    assert eval_resize_size(32, 8) == 32
    assert eval_resize_size(96, 32) == 110


@pytest.mark.parametrize(
    "mixup, cutmix, kinds",
    [
        (1.0, 0.0, (v2.MixUp,)),
        (0.0, 1.0, (v2.CutMix,)),
        (0.2, 1.0, (v2.RandomChoice,)),
    ],
)
def test_batch_mix_gives_soft_labels_that_sum_to_one(mixup, cutmix, kinds):
    mix = batch_mix(off(mixup=mixup, cutmix=cutmix), num_classes=10)
    assert isinstance(mix, kinds)
    images = torch.randn(6, 3, 16, 16)
    labels = torch.arange(6, dtype=torch.int64)
    soft_seen = False
    for _ in range(4):
        mixed, soft = mix(images.clone(), labels)
        assert mixed.shape == images.shape and mixed.dtype == torch.float32
        assert soft.shape == (6, 10) and soft.dtype == torch.float32
        torch.testing.assert_close(soft.sum(dim=1), torch.ones(6))
        assert torch.all(soft >= 0)
        soft_seen |= bool((soft.max(dim=1).values < 1).all())
    assert soft_seen  # not one-hot


def test_batch_mix_both_used_when_both_on():
    mix = batch_mix(off(mixup=0.2, cutmix=1.0), num_classes=4)
    assert [type(t) for t in mix.transforms] == [v2.MixUp, v2.CutMix]
    assert mix.transforms[0].alpha == 0.2 and mix.transforms[1].alpha == 1.0


def test_batch_mix_is_none_when_off():
    assert batch_mix(off(), num_classes=10) is None
    assert batch_mix(AugmentConfig("standard"), num_classes=10) is None
    assert batch_mix(AugmentConfig("strong"), num_classes=10) is not None


@pytest.mark.parametrize(
    "fields",
    [
        {"preset": "heavy"},
        {"auto": "augmix"},
        {"erasing": -0.1},
        {"erasing": 1.5},
        {"mixup": -0.2},
        {"cutmix": -1.0},
        {"rotation": -5.0},
        {"rotation": 200.0},
        {"color_jitter": -0.1},
        {"color_jitter": 2.0},
        {"scale_min": 0.0},
        {"scale_min": 1.5},
        {"crop_padding": -1},
        {"crop_padding": 2.5},
        {"flip": "yes"},
        {"mixup": float("nan")},
        {"erasing": "0.5"},
    ],
    ids=lambda f: f"{next(iter(f))}={next(iter(f.values()))!r}",
)
def test_bad_values_are_user_errors(fields):
    with pytest.raises(UserError) as e:
        AugmentConfig(**fields).resolved()
    assert "\n" not in str(e.value)


def test_bad_preset_error_lists_the_choices():
    with pytest.raises(UserError, match="none, light, standard, strong"):
        AugmentConfig("heavy").resolved()
    with pytest.raises(UserError, match=", ".join(AUTO_POLICIES)):
        AugmentConfig(auto="augmix").resolved()


def test_transform_needs_a_resolved_config_and_a_sane_size():
    with pytest.raises(ValueError, match="resolve"):
        train_transform(AugmentConfig(), 32, MEAN[1], STD[1], 8)
    with pytest.raises(UserError):
        train_transform(off(), 0, MEAN[1], STD[1], 8)
    with pytest.raises(UserError):
        eval_transform(-3, MEAN[1], STD[1], 8)
    with pytest.raises(UserError, match="padding"):
        train_transform(off(crop=True, crop_padding=32), 32, MEAN[1], STD[1], 8)


def test_resolved_does_not_change_the_original():
    cfg = AugmentConfig("strong")
    cfg.resolved()
    assert cfg == AugmentConfig("strong")
    assert dataclasses.replace(cfg.resolved(), preset="none").resolved().mixup == 0.2
