"""One suite over every backend in BACKENDS: options, bad input, availability, fp32 parity,
close(), the precision label. A backend that cannot run here skips with the reason."""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import onnx
import pytest

from convforge import contract
from convforge.errors import UserError
from convforge.runtime.backends import BACKENDS, GPU_BACKENDS, BackendUnavailable, backend_class
from convforge.runtime.backends.options import parse_options
from tests.helpers import SMALL_INPUT, export_small_model, random_batch, torch_logits

# The GPU backends are marked `gpu`, so `pytest -m gpu` (benchmarks/gpu_check.py) runs them.
NAMES = [pytest.param(n, marks=pytest.mark.gpu) if n in GPU_BACKENDS else n for n in BACKENDS]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(fp32 .onnx with its .pt2, the PyTorch model, a foreign int8 QDQ file)."""
    from convforge.export.int8 import to_int8

    folder = tmp_path_factory.mktemp("conformance")
    path, model = export_small_model(folder)
    # ONNX Runtime's quantizer output with every convforge key removed: a file made
    # elsewhere, whose precision only its graph tells.
    int8 = to_int8(onnx.load(path), random_batch(16, seed=7), "tensorrt")
    contract.write_props(int8, {}, replace_all=True)
    foreign = folder / "foreign_int8.onnx"
    onnx.save(int8, foreign)
    return path, model, foreign


def _cache(name, tmp_path) -> dict:
    """Engine caches go to the test's own folder."""
    fields = {f.name for f in dataclasses.fields(backend_class(name).Options)}
    return {"cache_dir": str(tmp_path)} if "cache_dir" in fields else {}


def _loaded(name: str, path, tmp_path, **options):
    cls = backend_class(name)
    ok, why = cls.available()
    if not ok:
        pytest.skip(f"{name} cannot run here: {why}")
    return cls(str(path), **_cache(name, tmp_path), **options).load()


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_option_lists_the_accepted_ones(name, exported):
    cls = backend_class(name)
    accepted = ", ".join(f.name for f in dataclasses.fields(cls.Options))
    with pytest.raises(UserError) as e:
        cls(str(exported[0]), no_such_option=1)
    assert str(e.value) == (
        f"backend {name!r} has no option 'no_such_option'; accepted: {accepted or 'none'}"
    )


def _bad_values(kind, meta) -> list:
    if kind is bool:
        return ["maybe", 2.5]
    if kind is int:
        return ["abc", 1.5, True]
    if kind is float:
        return ["fast"]
    return ["not-a-choice"] if meta.get("choices") else []


@pytest.mark.parametrize("name", NAMES)
def test_every_option_is_typed(name):
    """Each declared option refuses a value of the wrong type in one line, and takes the
    spellings a command line gives it (``--set torch.compile=no``, ``threads=2``)."""
    options = backend_class(name).Options
    hints = typing.get_type_hints(options)
    for f in dataclasses.fields(options):
        kind = (
            typing.get_args(hints[f.name])[0] if typing.get_args(hints[f.name]) else hints[f.name]
        )
        for bad in _bad_values(kind, f.metadata):
            with pytest.raises(UserError, match=f"{name} option {f.name}") as e:
                parse_options(options, {f.name: bad}, name)
            assert "\n" not in str(e.value)
        if kind is bool:
            spellings = [("false", False), ("0", False), ("no", False), ("off", False),
                         ("true", True), ("1", True), ("yes", True), ("ON", True)]  # fmt: skip
            for text, value in spellings:
                assert getattr(parse_options(options, {f.name: text}, name), f.name) is value
        if kind is int:
            minimum = f.metadata.get("minimum") or 0
            assert getattr(parse_options(options, {f.name: str(minimum + 2)}, name), f.name) == (
                minimum + 2
            )
            words = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            with pytest.raises(UserError, match=f"must be {words}, got {minimum - 1}"):
                parse_options(options, {f.name: minimum - 1}, name)


def test_the_batch_profile_is_one_type_with_one_default():
    ort_trt, trt = backend_class("ort-trt"), backend_class("tensorrt")
    assert ort_trt("m.onnx").options.profile("ort-trt") == trt("m.onnx").options.profile("trt")
    assert trt("m.onnx").profile == (1, 8, 32)
    assert trt("m.onnx", max_batch=4).profile == (1, 4, 4)  # opt follows a smaller max
    with pytest.raises(UserError, match="min_batch <= opt_batch <= max_batch"):
        ort_trt("m.onnx", min_batch=8, max_batch=4)
    with pytest.raises(UserError, match="tensorrt option max_batch takes an integer, got 'abc'"):
        trt("m.onnx", max_batch="abc")


# -- availability ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_unavailable_says_why_and_loads_nothing(name, exported, tmp_path):
    cls = backend_class(name)
    ok, why = cls.available()
    if ok:
        assert why == ""
        return
    assert why and ("pip install" in why or "CUDA" in why), why
    with pytest.raises(BackendUnavailable) as e:
        cls(str(exported[0]), **_cache(name, tmp_path)).load()
    assert str(e.value) == f"backend {name!r} is not available: {why}"
    assert list(tmp_path.iterdir()) == []  # nothing built or cached, no fallback


# -- running ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_fp32_matches_the_reference(name, exported, tmp_path):
    """With default options every backend runs an fp32 file in fp32 (OpenVINO once chose
    bf16 on CPUs with AMX or AVX512-BF16: 0.6% off, seen on an Intel Xeon VM), except
    ort-trt, which cannot: it says tf32."""
    path, model, _ = exported
    backend = _loaded(name, path, tmp_path)
    try:
        assert backend.spec == contract.InputSpec(*SMALL_INPUT)
        # ONNX Runtime's TensorRT provider leaves TensorRT's TF32 on, with no switch: it says
        # tf32, and is held to TensorRT's TF32 tolerance. Every backend that says fp32 is
        # held to 1e-4.
        tf32 = name == "ort-trt"
        assert backend.precision == ("tf32" if tf32 else "fp32")
        for n in (1, 5):
            x = random_batch(n, seed=n)
            want = torch_logits(model, x)
            got = backend.run(x)
            assert got.dtype == np.float32 and got.shape == want.shape
            assert np.abs(got - want).max() <= (1e-2 if tf32 else 1e-4) * np.abs(want).max()
    finally:
        backend.close()


@pytest.mark.parametrize(
    "batch, message",
    [
        (np.zeros((1, *SMALL_INPUT), np.float64), "must be float32, got float64"),
        (np.zeros(SMALL_INPUT, np.float32), "must be a 4-D batch"),
        (np.zeros((1, 1, 16, 16), np.float32), "model takes 3-channel images"),
        (np.zeros((1, 3, 8, 8), np.float32), "model takes 16x16 images"),
        (np.zeros((0, *SMALL_INPUT), np.float32), "input batch is empty"),
        ([[0.0]], "input must be a numpy array"),
    ],
)
@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_a_user_error_before_the_engine(name, batch, message, exported, tmp_path,
                                                     monkeypatch):  # fmt: skip
    backend = _loaded(name, exported[0], tmp_path)
    monkeypatch.setattr(backend, "_run", lambda b: pytest.fail("the engine saw a bad batch"))
    try:
        with pytest.raises(UserError, match=message):
            backend.run(batch)
    finally:
        backend.close()


@pytest.mark.parametrize("name", NAMES)
def test_a_non_contiguous_batch_gives_the_same_logits(name, exported, tmp_path):
    backend = _loaded(name, exported[0], tmp_path)
    try:
        nhwc = np.ascontiguousarray(random_batch(3, seed=4).transpose(0, 2, 3, 1))
        view = nhwc.transpose(0, 3, 1, 2)  # NCHW shape, NHWC memory
        assert not view.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(backend.run(view), backend.run(np.ascontiguousarray(view)))
    finally:
        backend.close()


@pytest.mark.parametrize("name", NAMES)
def test_close_is_idempotent(name, exported, tmp_path):
    backend = _loaded(name, exported[0], tmp_path)
    backend.close()
    backend.close()
    with pytest.raises(RuntimeError, match="load"):
        backend.run(random_batch(1))
    fresh = backend_class(name)(str(exported[0]), **_cache(name, tmp_path))
    fresh.close()  # before load: nothing to release, no error


@pytest.mark.parametrize("name", NAMES)
def test_the_precision_label_of_a_foreign_int8_file_comes_from_its_graph(name, exported,
                                                                       tmp_path):  # fmt: skip
    if name == "torch":
        pytest.skip("torch runs the .pt2 program, and a foreign .onnx has none")
    backend = _loaded(name, exported[2], tmp_path)
    try:
        assert backend.precision == "int8"
        assert backend.describe()["precision"] == "int8"
        assert backend.run(random_batch(2)).shape == (2, 5)
    finally:
        backend.close()
