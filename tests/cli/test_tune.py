"""`convforge tune` and `--plan` for predict, bench and serve, through the CLI."""

import json
import shutil
from pathlib import Path

import pytest

from convforge.cli import main
from convforge.cli.arguments import Parser
from convforge.cli.plan import use_plan
from convforge.cli.runtime import serve_config, serve_parser
from convforge.errors import UserError
from convforge.runtime.environment import environment
from convforge.runtime.model import load_plan
from convforge.runtime.plan import Plan, PlanWarning
from tests.runtime.test_plan import make_plan

FIXTURES = Path(__file__).parents[1] / "fixtures"
MODEL = str(FIXTURES / "digits.onnx")
IMAGES = sorted(str(p) for p in FIXTURES.glob("digit-*.png"))
QUICK = ["--budget-seconds", "2", "--rounds", "2", "--iters", "5"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("convforge: error: ") and err.count("\n") == 1, err
    return err.strip().removeprefix("convforge: error: ")


@pytest.fixture
def plan_file(tmp_path) -> Path:
    """A plan for tmp_path/digits.onnx: ort-cpu, threads=1, at batch 1 and 8."""
    make_plan(tmp_path, sizes=(1, 8), threads=1).write(tmp_path / "plan.json")
    return tmp_path / "plan.json"


def _copy(folder: Path) -> str:
    """The fixture copied into ``folder``: a plan is written beside the models it names."""
    return str(shutil.copy(MODEL, folder / "digits.onnx"))


def test_tune_on_unlabelled_images_writes_a_plan_and_prints_the_choice(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["tune", _copy(tmp_path), "--images", str(FIXTURES), "--backends", "ort-cpu,torch",
            "--batch-sizes", "1,2", *QUICK, "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    plan = Plan.read(out)
    assert [e.batch_size for e in plan.entries] == [1, 2]
    assert plan.accuracy["metric"] == "agreement" and plan.accuracy["images"] == len(IMAGES)
    for e in plan.entries:
        assert f"batch {e.batch_size}: ort-cpu digits.onnx" in text and "(fp32)" in text
    assert "precision" in text.splitlines()[0]  # the table names what each candidate ran
    # torch was named: it is tried and its reason shown (the fixture has no .pt2 program).
    torch = [r for r in plan.candidates if r["backend"] == "torch"]
    assert torch and all(r["status"] == "failed" and ".pt2" in r["why"] for r in torch)
    assert "digits.pt2 does not exist" in text and f"wrote {out}" in text


def test_tune_json_prints_the_plan_it_wrote(tmp_path, capsys):
    out = tmp_path / "plan.json"
    model = _copy(tmp_path)
    argv = ["tune", model, "--images", *IMAGES[:3], "--backends", "ort-cpu",
            "--batch-sizes", "4", *QUICK, "-o", str(out), "--json"]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["format"] == "convforge-plan/1"
    (entry,) = Plan.read(out).entries
    assert printed["entries"][0] == {**entry.__dict__, "file": str(Path(model).resolve())}
    assert printed["environment"]["cpu"] == environment()["cpu"]


def _with_dataset(tmp_path, spec: str) -> str:
    """A copy of the fixture whose metadata names its dataset, as convforge's export writes."""
    import onnx

    from convforge import contract

    model = onnx.load(MODEL)
    dataset = {"spec": spec, "val_fraction": 0.1, "seed": 0}
    contract.write_props(model, contract.encode({"dataset": dataset}))
    path = tmp_path / "digits.onnx"
    onnx.save(model, path)
    return str(path)


def test_tune_checks_accuracy_on_the_dataset_the_file_names(tmp_path, capsys):
    model, out = _with_dataset(tmp_path, "digits"), tmp_path / "plan.json"
    argv = ["tune", model, "--backends", "ort-cpu", "--batch-sizes", "1", *QUICK, "-o", str(out)]
    assert main(argv) == 0
    accuracy = Plan.read(out).accuracy
    assert accuracy["metric"] == "top1" and accuracy["dataset"] == "digits"
    assert accuracy["images"] == 179  # digits' stratified 10% validation split, seed 0
    assert accuracy["reference"] > 0.9


def test_tune_says_when_the_files_own_dataset_cannot_be_loaded(tmp_path, capsys):
    model = _with_dataset(tmp_path, f"imagefolder:{tmp_path / 'gone'}")
    assert main(["tune", model, "-o", str(tmp_path / "plan.json")]) == 2
    error = _one_line_error(capsys)
    assert error.startswith(f"{model} was trained on imagefolder:{tmp_path / 'gone'}, which ")
    assert error.endswith("; give --dataset SPEC or --images PATH...")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--backends", "nope"], "unknown backend 'nope'; choose from: tensorrt"),
        (["--batch-sizes", "0,8"], "argument --batch-sizes: takes comma-separated positive"),
        (["--max-drop", "-1"], "--max-drop must be a number >= 0, got -1.0"),
        (["--images", "/no/such.png"], "image /no/such.png does not exist"),
        ([], "does not name its dataset; give --dataset SPEC"),
        (["--dataset", "digits", "--images", MODEL], "give --dataset or --images, not both"),
    ],
)
def test_tune_mistakes_are_one_line_errors(tmp_path, capsys, extra, message):
    argv = ["tune", _copy(tmp_path), "-o", str(tmp_path / "p.json"), *extra]
    if "--images" not in extra and "--dataset" not in extra and extra:
        argv += ["--images", IMAGES[0]]
    assert main(argv) == 2
    assert message in _one_line_error(capsys)


def test_tune_checks_files_and_output_before_searching(tmp_path, capsys, monkeypatch):
    assert main(["tune", "/no/m.onnx", "--images", IMAGES[0], "-o", str(tmp_path / "p")]) == 2
    assert "/no/m.onnx does not exist" in _one_line_error(capsys)
    assert main(["tune", MODEL, "--images", IMAGES[0], "-o", "/no/dir/p.json"]) == 2
    assert "folder /no/dir does not exist" in _one_line_error(capsys)
    # A plan names files inside its own folder only: refused before anything is measured.
    monkeypatch.setattr("convforge.runtime.tune.tune", lambda *a, **k: pytest.fail("searched"))
    assert main(["tune", MODEL, "--images", IMAGES[0], "-o", str(tmp_path / "p.json")]) == 2
    error = _one_line_error(capsys)
    assert error.startswith(f"{MODEL} is outside {tmp_path.resolve()}, the folder of plan p.json")


def test_predict_with_a_plan_runs_its_configuration(plan_file, capsys):
    model = str(plan_file.parent / "digits.onnx")
    assert main(["predict", model, IMAGES[0], "--plan", str(plan_file), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["backend"] == "ort-cpu" and record["threads"] == 1
    assert record["threads_source"] == "option"
    assert record["predictions"][0]["top"][0]["label"] == Path(IMAGES[0]).stem.split("-")[-1]


def test_bench_with_a_plan_times_each_entry(plan_file, capsys):
    model = str(plan_file.parent / "digits.onnx")
    argv = ["bench", model, "--plan", str(plan_file), "--warmup-iters", "1",
            "--warmup-seconds", "0", "--iters", "3", "--seconds", "0", "--json"]  # fmt: skip
    assert main(argv) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    assert [r["batch_size"] for r in records] == [1, 8]  # the plan's batch sizes
    assert all(r["backend"] == "ort-cpu" and r["threads"] == 1 for r in records)
    argv[argv.index("--json")] = "--batch-sizes=3"
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "plan, batch 3: ort-cpu digits.onnx threads=1" in out  # 3 is closer to 1 than 8
    argv[argv.index("--batch-sizes=3")] = "--batch-sizes=1,8,32"  # bench's default, given
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "plan, batch 32: ort-cpu" in out  # asked for, so not replaced by the plan's sizes


def test_serve_with_a_plan_serves_the_entry_for_its_max_batch(plan_file):
    model = str(plan_file.parent / "digits.onnx")
    parser = Parser(prog="convforge serve")
    serve_parser(parser)
    args = parser.parse_args([f"d={model}", "--plan", str(plan_file), "--max-batch-size", "16"])
    config = serve_config(args)
    assert config.models == {"d": model} and config.backend == "ort-cpu"
    assert config.options == {"threads": 1} and config.batching.max_batch_size == 16
    plain = serve_config(parser.parse_args([model, "--set", "ort-cpu.threads=2"]))
    assert plain.backend == "auto" and plain.options == {}  # --set is for the named backend


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "MODEL", IMAGES[0], "--backend", "ort-cpu"], "drop --backend"),
        (["predict", "MODEL", IMAGES[0], "--set", "ort-cpu.threads=2"], "drop --set"),
        (["bench", "MODEL", "--backends", "openvino"], "drop --backends"),
        (["serve", "MODEL", "MODEL2"], "--plan serves one model (its plan's), got 2"),
        (["predict", MODEL, IMAGES[0]], "the plan was made for digits.onnx, not"),
    ],
)
def test_plan_mistakes_are_one_line_errors(plan_file, tmp_path, capsys, argv, message):
    other = tmp_path / "other.onnx"
    other.write_bytes(Path(MODEL).read_bytes() + b"\0")
    names = {"MODEL": str(plan_file.parent / "digits.onnx"), "MODEL2": f"b={other}"}
    argv = [names.get(a, a) for a in argv] + ["--plan", str(plan_file)]
    if argv[0] == "predict" and argv[1] == MODEL:
        argv[1] = str(other)
    assert main(argv) == 2
    assert message in _one_line_error(capsys)


def test_unreadable_plan_and_missing_file_are_one_line_errors(plan_file, tmp_path, capsys):
    model = str(plan_file.parent / "digits.onnx")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["predict", model, IMAGES[0], "--plan", str(bad)]) == 2
    assert "cannot read plan" in _one_line_error(capsys)
    moved = tmp_path / "kept.onnx"
    Path(model).rename(moved)
    assert main(["predict", str(moved), IMAGES[0], "--plan", str(plan_file)]) == 2
    assert "the plan's file" in _one_line_error(capsys)


def _changed(model: Path) -> Path:
    """``model`` rewritten with another doc string: it still loads, but is not what was tuned."""
    import onnx

    proto = onnx.load(model)
    proto.doc_string = "changed after tuning"
    onnx.save(proto, model)
    return model


@pytest.mark.parametrize("command", ["predict", "bench"])
def test_a_file_changed_since_tuning_is_a_one_line_error(plan_file, capsys, command):
    model = _changed(plan_file.parent / "digits.onnx")
    images = [IMAGES[0]] if command == "predict" else []
    assert main([command, str(model), *images, "--plan", str(plan_file)]) == 2
    error = _one_line_error(capsys)
    assert error.startswith(f"{model} changed since it was tuned (sha256 differs)")
    assert error.endswith("or give --force-plan to run it anyway")


def test_force_plan_runs_a_changed_file_with_a_warning(plan_file, tmp_path):
    model = _changed(plan_file.parent / "digits.onnx")
    with pytest.raises(UserError, match="changed since it was tuned"):
        load_plan(use_plan(str(plan_file), [str(model)], {}), 1)
    plan = use_plan(str(plan_file), [str(model)], {}, force=True)
    with pytest.warns(PlanWarning, match="running it as forced"), load_plan(plan, 1) as m:
        assert m.backend.name == "ort-cpu"
    # serve reads the flag from its arguments, where its parser declares --force-plan.
    parser = Parser(prog="convforge serve")
    serve_parser(parser)
    args = parser.parse_args([str(model), "--plan", str(plan_file)])
    with pytest.raises(UserError, match="give --force-plan"):
        serve_config(args)
    args.force_plan = True
    with pytest.warns(PlanWarning, match="running it as forced"):
        assert serve_config(args).models == {"digits": str(model)}


def test_a_plan_naming_an_absolute_path_is_a_one_line_error(plan_file, capsys):
    data = json.loads(plan_file.read_text())
    data["entries"][0]["file"] = MODEL  # absolute: a plan may not point outside its folder
    plan_file.write_text(json.dumps(data))
    model = str(plan_file.parent / "digits.onnx")
    assert main(["predict", model, IMAGES[0], "--plan", str(plan_file)]) == 2
    assert _one_line_error(capsys) == (
        f"{plan_file}: entry 1: file is {MODEL!r}; a plan accepts only paths relative to its "
        "own folder, without '..' (make a new one with `convforge tune`)"
    )


def test_a_plan_from_another_machine_warns_in_one_line(plan_file, monkeypatch, capsys):
    here = environment()
    monkeypatch.setattr(
        "convforge.runtime.plan.environment", lambda: {**here, "cpu": "Elsewhere CPU"}
    )
    model = str(plan_file.parent / "digits.onnx")
    assert main(["predict", model, IMAGES[0], "--plan", str(plan_file)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("convforge: warning: the plan was measured elsewhere (cpu: ")
    assert "-> Elsewhere CPU)" in err and err.count("\n") == 1
