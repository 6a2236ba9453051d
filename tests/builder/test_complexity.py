import pytest

from convforge.builder import ModelConfig
from convforge.builder.complexity import as_record, format_records, measure
from convforge.errors import UserError

# Parameters and GMACs at 224 px from torchvision's model documentation.
TORCHVISION_TABLE = {
    "resnet18": (11_689_512, 1.81),
    "resnet50": (25_557_032, 4.09),
    "vgg16_bn": (138_365_992, 15.47),
}


@pytest.mark.parametrize("arch", list(TORCHVISION_TABLE))
def test_counts_match_torchvisions_table(arch):
    params, gmacs = TORCHVISION_TABLE[arch]
    c = measure(ModelConfig(arch), 224)
    assert c.params == params
    assert c.macs / 1e9 == pytest.approx(gmacs, abs=0.01)
    assert c.flops == 2 * c.macs


def test_compute_scales_with_input_area():
    small, big = (measure(ModelConfig("plain", stem="small"), s) for s in (16, 32))
    assert big.macs / small.macs == pytest.approx(4.0, rel=0.01)


def test_too_small_input_is_a_user_error():
    with pytest.raises(UserError, match="vgg16 with stem 'imagenet' cannot take 16 px input"):
        measure(ModelConfig("vgg16"), 16)


def test_record_and_table():
    cfg = ModelConfig("resnet18", num_classes=10, in_channels=1, stem="small")
    record = as_record(cfg, measure(cfg, 32))
    assert record["model"] == "resnet18" and record["norm"] == "batch"
    assert record["params"] == 11_172_810
    text = format_records([record])
    assert "resnet18" in text and "11.17" in text and "32x32 input" in text
