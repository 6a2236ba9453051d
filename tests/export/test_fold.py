"""BatchNorm folding: the walker's folds and refusals, real models (the formula: test_fold_math)."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from convforge.builder import create_model
from convforge.errors import UserError
from convforge.export.fold import FoldEntry, FoldReport, fold_batchnorm
from tests.export.conftest import assert_close_to, randomize_bn


def bn_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def by_bn(report: FoldReport) -> dict[str, FoldEntry]:
    return {e.bn: e for e in report.entries}


# --------------------------------------------------------------------------- fold_batchnorm


def _small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, groups=4, padding=1),
        nn.BatchNorm2d(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 6),
        nn.BatchNorm1d(6),
    )


def test_folds_a_small_net_and_leaves_the_input_alone():
    model = randomize_bn(_small_net(), strong=True).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    folded, report = fold_batchnorm(model, x)

    assert report.method == "fx" and report.trace_error is None
    assert [(e.bn, e.folded_into, e.reason) for e in report.entries] == [
        ("1", "0", None),
        ("4", "3", None),
        ("8", "7", None),
    ]
    assert (report.folded, report.kept) == (3, 0)
    assert isinstance(folded, torch.fx.GraphModule) and not folded.training
    assert bn_modules(folded) == []
    assert report.max_rel_diff <= 1e-5
    # The original is untouched: same tensors, BNs still there, still in eval mode.
    assert bn_modules(model) == ["1", "4", "8"] and not model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        x2 = torch.randn(2, 3, 32, 32)
        assert_close_to(folded(x2), model(x2), rel=1e-5)


def test_default_check_batch():
    model = randomize_bn(_small_net()).eval()
    _, report = fold_batchnorm(model)  # [2, 3, 64, 64] from the first conv
    assert report.folded == 3 and report.max_rel_diff <= 1e-5


def test_training_mode_is_refused():
    model = _small_net()
    with pytest.raises(UserError, match=r"call model.eval\(\) first"):
        fold_batchnorm(model)
    model.eval()
    model[4].train()  # one submodule left in training mode is enough to be wrong
    with pytest.raises(UserError, match="4 is in training mode"):
        fold_batchnorm(model)


def test_a_model_that_rejects_the_check_batch_is_a_user_error():
    class LinearFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)  # registered first: the default batch is [2, 8]
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    with pytest.raises(UserError, match="default check batch of shape"):
        fold_batchnorm(LinearFirst().eval())
    with pytest.raises(UserError, match="no Conv/ConvTranspose/Linear"):
        fold_batchnorm(nn.Sequential(nn.BatchNorm2d(3)).eval())


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.c(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.c(x)) + self.c(x)


class Linear3d(nn.Module):
    """Linear on [N, L, C]: BatchNorm1d(L) normalizes L, not the Linear's features."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


REFUSALS = {
    "two_users": (TwoUsers, (2, 3, 16, 16), "bn", "conv output has another consumer (2 users)"),
    "shared_conv": (SharedConv, (2, 4, 8, 8), "bn", "conv c is used 2 times in the forward"),
    "no_running_stats": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
        (2, 3, 16, 16),
        "1",
        "BN has no running statistics",
    ),
    "relu_between": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)),
        (2, 3, 16, 16),
        "2",
        "input comes from ReLU (1), not a conv/linear",
    ),
    "bn_first": (
        lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)),
        (2, 3, 16, 16),
        "0",
        "input comes from the model input, not a conv/linear",
    ),
    "linear_3d": (Linear3d, (2, 5, 8), "bn", "Linear output is 3-D"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_unsafe_pairs_are_kept_with_a_reason(case):
    make, shape, bn_name, reason = REFUSALS[case]
    model = randomize_bn(make(), strong=True).eval()
    folded, report = fold_batchnorm(model, torch.randn(shape))
    entry = by_bn(report)[bn_name]
    assert entry.folded_into is None and entry.reason.startswith(reason), entry.reason
    assert report.kept == 1 and report.folded == 0
    assert bn_name in dict(folded.named_modules())  # still there, still doing its job
    assert report.max_abs_diff == 0.0


def test_conv_bn_bn_folds_both():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    model = randomize_bn(model, strong=True).eval()
    folded, report = fold_batchnorm(model, torch.randn(2, 3, 16, 16))
    assert [e.folded_into for e in report.entries] == ["0", "0"]
    assert report.max_rel_diff <= 1e-5 and bn_modules(folded) == []


# --------------------------------------------------------------------------- real models


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet50", "vgg16_bn", "mobilenet_v2", "densenet121"]
)
def test_torchvision_models(name):
    model = randomize_bn(getattr(torchvision.models, name)(weights=None)).eval()
    bns = bn_modules(model)
    folded, report = fold_batchnorm(model, torch.randn(2, 3, 64, 64))

    assert report.method == "fx"
    assert [e.bn for e in report.entries] == bns  # every BN reported, in forward order
    print(f"{name}: max abs diff {report.max_abs_diff:.3g}, rel {report.max_rel_diff:.3g}")
    assert report.max_rel_diff <= 1e-4
    with torch.no_grad():  # an independent check on another batch
        x = torch.randn(2, 3, 64, 64)
        assert_close_to(folded(x), model(x), rel=1e-4)

    if name != "densenet121":
        assert report.kept == 0 and bn_modules(folded) == []
        return
    # DenseNet is pre-activation: norm1 and the transitions' norm follow a concatenation.
    # Only the stem's norm0 and each layer's norm2 (after its 1x1 conv1) sit after a conv.
    entries = by_bn(report)
    assert entries["features.norm0"].folded_into == "features.conv0"
    for bn, entry in entries.items():
        if bn.endswith(".norm2"):
            assert entry.folded_into == bn.removesuffix("norm2") + "conv1"
        elif bn != "features.norm0":
            assert entry.folded_into is None
            assert entry.reason == "input comes from function cat, not a conv/linear"
    assert (report.folded, report.kept) == (1 + 58, 58 + 3 + 1)
    assert sorted(bn_modules(folded)) == sorted(e.bn for e in report.entries if e.reason)


def test_convforge_resnet18_small():
    model = create_model("resnet18", num_classes=10, stem="small")
    model = randomize_bn(model).eval()
    folded, report = fold_batchnorm(model, torch.randn(2, 3, 32, 32))
    assert report.method == "fx" and report.kept == 0 and report.folded == 20
    assert by_bn(report)["layer2.0.downsample.1"].folded_into == "layer2.0.downsample.0"
    assert bn_modules(folded) == []
    assert report.max_rel_diff <= 1e-4


class Untraceable(nn.Module):
    """fx cannot trace the ``if`` on a tensor value; the Sequentials still fold."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.loose = nn.BatchNorm2d(8)
        self.head = nn.Sequential(
            nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4)
        )

    def forward(self, x):
        x = self.body(x)
        if x.mean() > 0:  # data-dependent Python control flow
            x = x * 2
        return self.head(self.loose(x))


def test_sequential_fallback():
    model = randomize_bn(Untraceable(), strong=True).eval()
    x = torch.randn(2, 3, 16, 16)
    folded, report = fold_batchnorm(model, x)

    assert report.method == "sequential"
    assert "TraceError" in report.trace_error
    entries = by_bn(report)
    assert entries["body.1"].folded_into == "body.0"
    assert entries["head.1"].folded_into == "head.0"
    loose = entries["loose"]
    assert loose.folded_into is None
    assert loose.reason.startswith("not directly after a conv/linear in a Sequential (fx could")
    assert isinstance(folded.body[1], nn.Identity) and isinstance(folded.head[1], nn.Identity)
    assert isinstance(model.body[1], nn.BatchNorm2d)  # the original is untouched
    assert report.max_rel_diff <= 1e-5
    with torch.no_grad():
        x2 = torch.randn(2, 3, 16, 16)
        assert_close_to(folded(x2), model(x2), rel=1e-5)


def test_report_as_dict_and_format():
    model = randomize_bn(TwoUsers()).eval()
    _, kept = fold_batchnorm(model, torch.randn(2, 3, 16, 16))
    _, report = fold_batchnorm(randomize_bn(_small_net()).eval())

    data = json.loads(json.dumps(report.as_dict()))
    assert data["method"] == "fx" and data["folded"] == 3 and data["kept"] == 0
    assert data["entries"][0] == {"bn": "1", "folded_into": "0", "reason": None}
    assert isinstance(data["max_abs_diff"], float)

    text = report.format()
    for e in report.entries:
        assert any(line.split()[:2] == [e.bn, e.folded_into] for line in text.splitlines())
    assert "max abs diff" in text and "max rel diff" in text
    text = kept.format()
    assert "bn  kept" in text and "conv output has another consumer (2 users)" in text
    assert json.loads(json.dumps(kept.as_dict()))["kept"] == 1


def test_folded_model_exports_to_onnx(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = randomize_bn(_small_net(), strong=True).eval()
    folded, _ = fold_batchnorm(model)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "folded.onnx"
    torch.onnx.export(folded, (x,), str(path), input_names=["x"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        assert_close_to(torch.from_numpy(out), model(x), rel=1e-5)


def test_shared_bn_is_kept_and_reported_once():
    class SharedBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x)) + self.bn(self.b(x))

    model = randomize_bn(SharedBN(), strong=True).eval()
    _, report = fold_batchnorm(model, torch.randn(2, 3, 8, 8))
    assert [(e.bn, e.reason) for e in report.entries] == [
        ("bn", "BN module is shared (2 uses in the model)")
    ]
