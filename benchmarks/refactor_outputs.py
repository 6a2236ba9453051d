"""Same commands, two source trees: did a refactor change what convforge prints and serves?

    .venv/bin/python benchmarks/refactor_outputs.py --before /tmp/wt-before --after /tmp/wt-after

Issue 22 asks that bench/tune/serve outputs on the fixtures be identical before and after the
refactor. Each check runs one command with each tree's package (``PYTHONPATH=<tree> python -m
convforge ...``; the script first checks that ``import convforge`` resolves into the tree),
one at a time (the machine is shared), in one scratch folder holding copies of the before
tree's fixtures, so the file paths the outputs name are the same for both trees. Compared:

* ``backends --json``: records keyed by backend name (a set); their order separately;
* ``inspect --json``, ``predict --json`` per backend, a few text outputs and user errors: the
  exact output (JSON compared as values, then as bytes), exit status and error line;
* ``bench --json``: every record's keys and non-timing fields (TIMING_KEYS are left out and
  listed); ``tune --json`` and its ``-o`` plan: the candidate set, their settings, accuracy,
  failures and rejections, and the plan's structure, not which candidate won (timing);
* ``serve``: status, headers (bar ``date``) and body, byte for byte, of a fixed list of HTTP
  requests, and the server's log with the port masked.

Differences are matched with INTENDED, the changes the refactor's commit messages name; a
difference no rule explains is reported as UNEXPLAINED. Writes --out .json and .md.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).parent / "results"
PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"
MODEL, FP16 = "digits.onnx", "digits-fp16.onnx"
TIMING_KEYS = ("cv", "unstable")  # plus every key ending in _ms, _s or _ips
TUNE_TIMED = {"chosen", "measured", "pruned"}  # statuses a candidate gets from its timings
TUNE_TIMING = ("p50_ms", "p99_ms", "throughput_ips", "rounds", "status", "why")
# --seconds 0: exactly --iters runs, so a record's `iterations` is compared, not left out.
FAST_BENCH = ["--batch-sizes", "1,4", "--warmup-iters", "1", "--warmup-seconds", "0",
              "--iters", "3", "--seconds", "0"]  # fmt: skip
SMALL_TUNE = ["--backends", "ort-cpu,openvino", "--batch-sizes", "1,4", "--budget-seconds", "3",
              "--rounds", "2", "--iters", "3", "--max-drop", "0"]  # fmt: skip

# (check name prefix, regex on a difference, commit, whether its message names the change,
# what the commit says). A change found only in a commit's diff says so: named is False.
AUTO_ORDER = "the registry is in auto order (AUTO_ORDER = tuple(BACKENDS))"
TRT_HINT = (
    "tensorrt: ... available() tells missing bindings from libraries that do not load (the "
    "message names the check; the new install hint, NVIDIA's index or JetPack/NGC, is in the "
    "diff: tensorrt_engine.py WHERE)"
)
INTENDED = [
    ("backends", r"^top level: ", "a0d3e94", True,
     "gpu_stack.py and `convforge backends`: driver, CUDA, cuDNN, TensorRT, ORT build and "
     "cuda-bindings versions (its help: `--json: {gpu_stack, backends}`)"),
    ("backends", r"^gpu_stack: only after", "a0d3e94", True,
     "gpu_stack.py and `convforge backends`: driver, CUDA, cuDNN, TensorRT, ... versions"),
    ("backends", r"^order: ", "3992c99", True, AUTO_ORDER),
    ("backends", r"^tensorrt\.why: ", "a0d3e94", False, TRT_HINT),
    ("backends", r"^torch\.options\[\d+\]\.help: .*CUDA graph", "a0d3e94", True,
     "torch: CUDA graphs per power-of-two bucket"),
    ("backends", r"^torch\.options\[\d+\]\.help: .*TF32", "a0d3e94", False,
     "torch: ... TF32 set once at load (process-wide; a conflicting ask refused) (the help's "
     "'and matmuls' is in the diff: both TF32 switches are set)"),
    ("predict --json --backend auto", r"^skipped\[\d+\]\.why: .*tensorrt is not installed",
     "a0d3e94", False, TRT_HINT),
    ("predict: an unknown backend", r"^stderr: .*choose one of", "3992c99", True, AUTO_ORDER),
    ("bench --iters 0", r"^(stderr|stdout|rc): ", "3992c99", True,
     "every settings_from is range-checked, so `bench --iters 0` is one line before anything "
     "runs"),
]  # fmt: skip


@dataclass
class Run:
    """One command's result in one tree."""

    argv: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float


@dataclass
class Outcome:
    """What a comparison found: differences, what it left out on purpose, and notes."""

    differences: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def tree_env(tree: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}


def convforge(tree: Path, args: list[str], work: Path, timeout: float = 300) -> Run:
    argv = [str(PYTHON), "-m", "convforge", *args]
    start = time.perf_counter()
    p = subprocess.run(argv, cwd=work, env=tree_env(tree), capture_output=True, text=True,
                       timeout=timeout)  # fmt: skip
    return Run(args, p.returncode, p.stdout, p.stderr, round(time.perf_counter() - start, 2))


def package_dir(tree: Path) -> str:
    """Where ``import convforge`` resolves with PYTHONPATH=tree; SystemExit if not inside it."""
    code = "import convforge; print(convforge.__file__)"
    out = subprocess.run([str(PYTHON), "-c", code], env=tree_env(tree), cwd=tempfile.gettempdir(),
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    if not Path(out).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"convforge from {out}, not from {tree}")
    return out


# -- comparing ---------------------------------------------------------------------------------


def short(value, n: int = 160) -> str:
    text = json.dumps(value, sort_keys=False, default=str)
    return text if len(text) <= n else text[: n - 3] + "..."


def diff(a, b, path: str = "") -> list[str]:
    """Every place where JSON values ``a`` (before) and ``b`` (after) differ, as text."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in [*a, *(k for k in b if k not in a)]:
            p = f"{path}.{k}" if path else str(k)
            if k not in b:
                out.append(f"{p}: only before ({short(a[k])})")
            elif k not in a:
                out.append(f"{p}: only after ({short(b[k])})")
            else:
                out += diff(a[k], b[k], p)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in diff(x, y, f"{path}[{i}]")
        ]
    if a != b or type(a) is not type(b):
        return [f"{path or 'value'}: {short(a)} -> {short(b)}"]
    return []


def status_diff(before: Run, after: Run) -> list[str]:
    out = [f"rc: {before.rc} -> {after.rc}"] if before.rc != after.rc else []
    if (before.rc or after.rc) and before.stderr != after.stderr:
        out.append(f"stderr: {last_line(before.stderr)!r} -> {last_line(after.stderr)!r}")
    return out


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def exact(before: Run, after: Run) -> Outcome:
    """Exit status, error line and stdout, JSON compared as values and then as bytes."""
    out = Outcome(status_diff(before, after))
    try:
        out.differences += diff(json.loads(before.stdout), json.loads(after.stdout))
    except json.JSONDecodeError:
        if before.stdout != after.stdout:
            out.differences.append(f"stdout: {short(before.stdout)} -> {short(after.stdout)}")
        return out
    if not out.differences and before.stdout != after.stdout:
        out.differences.append("stdout: the same JSON values, different bytes (key order?)")
    return out


def backends(before: Run, after: Run) -> Outcome:
    """Records compared as a set keyed by name; the order, and any wrapper, said apart."""
    out = Outcome(status_diff(before, after))
    views = []
    for data in (json.loads(before.stdout), json.loads(after.stdout)):
        records = data if isinstance(data, list) else data["backends"]
        extra = {} if isinstance(data, list) else {k: v for k, v in data.items() if k != "backends"}
        shape = "a list of records" if isinstance(data, list) else f"an object {sorted(data)}"
        views.append((records, extra, shape))
    (rb, eb, sb), (ra, ea, sa) = views
    if sb != sa:
        out.differences.append(f"top level: {sb} -> {sa}")
    out.differences += diff(eb, ea)
    out.differences += diff({r["backend"]: r for r in rb}, {r["backend"]: r for r in ra})
    order_b, order_a = [r["backend"] for r in rb], [r["backend"] for r in ra]
    if order_b != order_a:
        out.differences.append(f"order: {order_b} -> {order_a}")
    out.notes.append(f"{len(ra)} backends, available here: "
                     f"{[r['backend'] for r in ra if r['available']]}")  # fmt: skip
    return out


def flags(before: Run, after: Run) -> Outcome:
    """The option strings ``--help`` lists (renamed or dropped flags); other help text is a
    note, not a difference (metavars and wording are documentation)."""
    pattern = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")
    sets = [set(pattern.findall(r.stdout)) for r in (before, after)]
    out = Outcome(status_diff(before, after))
    out.differences += [f"flag only before: {f}" for f in sorted(sets[0] - sets[1])]
    out.differences += [f"flag only after: {f}" for f in sorted(sets[1] - sets[0])]
    out.notes.append(f"{len(sets[1])} option strings")
    if before.stdout != after.stdout:
        changed = {*after.stdout.splitlines()} - {*before.stdout.splitlines()}
        out.notes.append(f"help text differs in {len(changed)} lines (metavars, wording)")
    return out


def is_timing(key: str) -> bool:
    return key in TIMING_KEYS or key.endswith(("_ms", "_s", "_ips"))


def bench(before: Run, after: Run) -> Outcome:
    """Records' keys and non-timing values, in order; environment, skipped, regressions."""
    out = Outcome(status_diff(before, after))
    views, dropped = [], set()
    for run in (before, after):
        data = json.loads(run.stdout)
        records = []
        for r in data["records"]:
            dropped.update(k for k in r if is_timing(k))
            records.append({k: (v if not is_timing(k) else "<timing>") for k, v in r.items()})
        views.append({**data, "records": records})
    out.differences += diff(*views)
    out.excluded = sorted(dropped)
    out.notes.append(f"{len(views[1]['records'])} records")
    return out


def candidate_key(c: dict) -> str:
    return f"bs{c['batch_size']} {c['backend']} {Path(c['file']).name} {short(c['options'])}"


def tune_view(data: dict) -> dict:
    """A tune result or plan without what timing decides: which candidate won, when pruned."""
    view = {k: v for k, v in data.items() if k not in ("created", "entries", "candidates")}
    view["search"] = {k: v for k, v in data["search"].items() if k != "seconds"}
    view["entries"] = [{"batch_size": e["batch_size"], "keys": list(e)} for e in data["entries"]]
    candidates = {}
    for c in data["candidates"]:
        timed = c["status"] in TUNE_TIMED
        kept = {k: v for k, v in c.items() if k not in TUNE_TIMING}
        kept["status"] = "timed (chosen, measured or pruned)" if timed else c["status"]
        kept["why"] = None if timed else c["why"]
        candidates[candidate_key(c)] = kept
    view["candidates"] = candidates
    return view


def chosen_consistent(data: dict) -> bool:
    """Each plan entry is the candidate marked chosen at its batch size."""
    chosen = {c["batch_size"]: c for c in data["candidates"] if c["status"] == "chosen"}
    return all(
        e["backend"] == chosen[e["batch_size"]]["backend"]
        and e["options"] == chosen[e["batch_size"]]["options"]
        for e in data["entries"]
    )


def tune(before: Run, after: Run, plans: tuple[Path, Path] | None = None) -> Outcome:
    """Candidate set, settings, accuracy, rejections, plan structure; timings left out.
    With ``plans``, the ``-o`` files are compared instead of stdout."""
    out = Outcome(status_diff(before, after))
    if plans:
        data = [json.loads(p.read_text()) for p in plans]
    else:
        data = [json.loads(r.stdout) for r in (before, after)]
    out.differences += diff(tune_view(data[0]), tune_view(data[1]))
    out.excluded = ["created", "search.seconds", "entries' values (the winners)",
                    *(f"candidates[].{k} (timed candidates)" for k in TUNE_TIMING)]  # fmt: skip
    for tag, d in zip(("before", "after"), data, strict=True):
        statuses = sorted({c["status"] for c in d["candidates"]})
        out.notes.append(f"{tag}: {len(d['candidates'])} candidates, statuses {statuses}, "
                         f"entries = chosen candidates: {chosen_consistent(d)}")  # fmt: skip
    return out


# -- serve -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def infer_body(work: Path) -> bytes:
    """The fixture digits as one v2 JSON request: [0, 1] pixels, 8x8 scaled to 16x16."""
    rows = []
    for png in sorted(work.glob("digit-*.png")):
        pixels = np.asarray(Image.open(png).convert("L"), np.float32) / 255
        rows.append(np.kron(pixels, np.ones((2, 2), np.float32))[None])
    x = np.stack(rows)
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape),
              "data": x.ravel().tolist()}  # fmt: skip
    return json.dumps({"id": "refactor-check", "inputs": [tensor]}).encode()


def requests(work: Path) -> list[tuple[str, str, bytes | None]]:
    png = (work / "digit-0-4.png").read_bytes()
    infer = "/v2/models/digits/infer"
    return [
        ("GET", "/v2/health/live", None),
        ("GET", "/v2/health/ready", None),
        ("GET", "/v2", None),
        ("GET", "/v2/models/digits", None),
        ("GET", "/v2/models/digits/ready", None),
        ("POST", infer, infer_body(work)),
        ("POST", "/v1/models/digits/classify", png),
        ("POST", infer, b'{"inputs": "x"}'),  # 400: the schema
        ("POST", infer, b"[1]"),  # 400: not an object
        ("POST", infer, b"{"),  # 400: not JSON
        ("GET", "/v2/models/nope", None),  # 404
        ("POST", "/v2/models/nope/infer", infer_body(work)),  # 404
    ]


def ask(port: int, method: str, path: str, body: bytes | None) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        headers = {k.lower(): v for k, v in r.getheaders() if k.lower() != "date"}
        return {"request": f"{method} {path}", "status": r.status, "headers": headers,
                "body": data.decode("utf-8", "backslashreplace")}  # fmt: skip
    finally:
        conn.close()


def wait_ready(proc: subprocess.Popen, port: int, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if ask(port, "GET", "/v2/health/ready", None)["status"] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server on port {port} did not get ready (rc {proc.poll()})")


def serve_session(tree: Path, work: Path, backend: str) -> tuple[Run, dict]:
    """Start ``serve`` in the background, send the requests, SIGTERM it; its answers."""
    port = free_port()
    args = ["serve", MODEL, "--backend", backend, "--port", str(port), "--grpc-port", "-1",
            "--drain-delay-s", "0"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen([str(PYTHON), "-m", "convforge", *args], cwd=work,
                            env=tree_env(tree), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_ready(proc, port)
        answers = [ask(port, m, p, b) for m, p, b in requests(work)]
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    args[args.index(str(port))] = "<port>"
    run = Run(args, proc.returncode, log.replace(str(port), "<port>"), "",
              round(time.perf_counter() - start, 2))  # fmt: skip
    return run, {"answers": answers, "log": run.stdout.splitlines(), "rc": proc.returncode}


def serve_outcome(before: dict, after: dict) -> Outcome:
    out = Outcome(diff(before, after), excluded=["the date header", "the port (in the log)"])
    out.notes.append(" ".join(f"{a['request'].split()[1]}={a['status']}" for a in after["answers"]))
    return out


# -- the checks --------------------------------------------------------------------------------


def checks(images: list[str]) -> list[tuple[str, list[str], object]]:
    """(name, convforge arguments, comparison) for every one-shot check."""
    one = images[:1]
    commands = ("backends", "inspect", "predict", "bench", "tune", "serve")
    found = [(f"flags of {c} (--help)", [c, "--help"], flags) for c in commands]
    found += [
        ("backends --json", ["backends", "--json"], backends),
        ("inspect --json", ["inspect", MODEL, "--json"], exact),
        ("inspect --json (fp16 variant)", ["inspect", FP16, "--json"], exact),
        ("inspect (text)", ["inspect", MODEL], exact),
    ]
    for b in ("ort-cpu", "openvino", "auto"):
        args = ["predict", MODEL, *images, "--backend", b, "--topk", "10", "--json", "-v"]
        found.append((f"predict --json --backend {b}", args, exact))
    found += [
        ("predict (text) --backend ort-cpu", ["predict", MODEL, *images, "--backend", "ort-cpu"],
         exact),
        ("bench --json", ["bench", MODEL, FP16, "--backends", "ort-cpu,openvino", *FAST_BENCH,
                          "--accuracy", "digits", "--json"], bench),
        ("tune --json", ["tune", MODEL, FP16, "--dataset", "digits", *SMALL_TUNE,
                         "-o", "plan-{tag}.json", "--json"], tune),
        ("tune --images --json", ["tune", MODEL, FP16, "--images", *images, *SMALL_TUNE,
                                  "-o", "plan-images-{tag}.json", "--json"], tune),
        ("predict --plan (the before tree's plan)",
         ["predict", MODEL, *one, "--plan", "plan-before.json", "--json"], exact),
        ("bench --plan (the before tree's plan)",
         ["bench", MODEL, "--plan", "plan-before.json", *FAST_BENCH, "--json"], bench),
        ("predict: a missing file", ["predict", "missing.onnx", *one], exact),
        ("predict: an unknown backend", ["predict", MODEL, *one, "--backend", "nope"], exact),
        ("bench --iters 0", ["bench", MODEL, "--backends", "ort-cpu", "--iters", "0",
                             "--batch-sizes", "1"], exact),
    ]  # fmt: skip
    return found


def explain(name: str, differences: list[str]) -> list[dict]:
    """Each difference with the INTENDED rule that explains it, if any."""
    out = []
    for d in differences:
        rule = next((r for r in INTENDED if name.startswith(r[0]) and re.search(r[1], d)), None)
        commit, named, says = rule[2:] if rule else (None, False, None)
        out.append({"difference": d, "intended": bool(rule), "commit": commit,
                    "named_in_message": named, "says": says})  # fmt: skip
    return out


def record(name: str, command: str, before: Run, after: Run, outcome: Outcome) -> dict:
    explained = explain(name, outcome.differences)
    if not explained:
        verdict = "identical"
    elif all(e["intended"] for e in explained):
        verdict = "differs (intended)"
    else:
        verdict = "differs (UNEXPLAINED)"
    line = f"{verdict:22s} {name}  ({before.seconds} s, {after.seconds} s)"
    print(line + "".join(f"\n    {e['difference']}" for e in explained), flush=True)
    return {
        "check": name, "command": command,
        "result": verdict, "differences": explained, "excluded": outcome.excluded,
        "notes": outcome.notes,
        "before": {"rc": before.rc, "seconds": before.seconds},
        "after": {"rc": after.rc, "seconds": after.seconds},
    }  # fmt: skip


def prepare(before: Path, after: Path, work: Path) -> dict:
    """Copy the before tree's fixtures into ``work`` (checking the after tree's are the same
    bytes) and write the fp16 variant with the before tree's converter; their sha256s."""
    sums = {}
    for src in sorted((before / "tests" / "fixtures").glob("*")):
        if src.suffix not in (".onnx", ".png"):
            continue
        other = after / "tests" / "fixtures" / src.name
        if not other.exists() or other.read_bytes() != src.read_bytes():
            raise SystemExit(f"the fixture {src.name} differs between the trees")
        shutil.copyfile(src, work / src.name)
        sums[src.name] = hashlib.sha256(src.read_bytes()).hexdigest()
    code = ("import onnx; from convforge.export.precision import to_fp16; "
            f"onnx.save(to_fp16(onnx.load({MODEL!r})), {FP16!r})")  # fmt: skip
    subprocess.run([str(PYTHON), "-c", code], cwd=work, env=tree_env(before), check=True)
    sums[FP16 + " (made by the before tree's to_fp16)"] = hashlib.sha256(
        (work / FP16).read_bytes()
    ).hexdigest()
    return sums


def run_all(trees: dict[str, Path], work: Path) -> list[dict]:
    images = sorted(p.name for p in work.glob("digit-*.png"))
    results = []
    for name, args, compare in checks(images):
        command = "convforge " + " ".join(args)  # {tag}: before or after
        runs = {tag: convforge(tree, [a.replace("{tag}", tag) for a in args], work)
                for tag, tree in trees.items()}  # fmt: skip
        before, after = runs["before"], runs["after"]
        if compare is tune:
            plans = tuple(work / args[args.index("-o") + 1].replace("{tag}", t) for t in trees)
            results.append(record(name, command, before, after, tune(before, after)))
            plan = tune(before, after, plans=plans)
            results.append(record(name.replace("--json", "-o plan"), command, before, after, plan))
        else:
            results.append(record(name, command, before, after, compare(before, after)))
    for backend in ("ort-cpu", "openvino"):
        (rb, sb), (ra, sa) = (serve_session(tree, work, backend) for tree in trees.values())
        command = "convforge " + " ".join(ra.argv)
        results.append(record(f"serve --backend {backend}", command, rb, ra, serve_outcome(sb, sa)))
    return results


# -- the report --------------------------------------------------------------------------------

NOT_RUN = [
    "predict --backend torch: no .pt2 among the fixtures (tests/fixtures holds digits.onnx and "
    "PNGs; a .pt2 is exported from a checkpoint, which the fixtures do not hold)",
    "GPU backends (tensorrt, ort-trt, ort-cuda): no GPU on this machine",
    "serve over gRPC (--grpc-port -1): the HTTP answers are compared",
]


def commit(tree: Path) -> str:
    p = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s"],
                       capture_output=True, text=True)  # fmt: skip
    return p.stdout.strip()[:100] or "(not a git tree)"


def note(e: dict) -> str:
    if not e["intended"]:
        return " (**not in the commits**)"
    if e["named_in_message"]:
        return f" (intended: {e['commit']})"
    return f" (intended: {e['commit']}'s diff; its message does not name the wording)"


def markdown(report: dict) -> str:
    lines = [
        "# Refactor outputs: the same commands on two trees",
        "",
        f"- before: `{report['trees']['before']}` ({report['commits']['before']})",
        f"- after: `{report['trees']['after']}` ({report['commits']['after']})",
        f"- run: `{report['command']}` on {report['date']}, each command once per tree, "
        "one at a time, in one scratch folder holding the fixtures",
        "- fixtures: " + ", ".join(f"{k} {v[:12]}" for k, v in report["fixtures"].items()),
        f"- timing fields left out of bench records: {', '.join(report['bench_timing_keys'])}",
        "",
        "| check | result | differences (intended: the commit that names it) | left out |",
        "|---|---|---|---|",
    ]
    for r in report["checks"]:
        diffs = "<br>".join(
            e["difference"] + note(e)
            for e in r["differences"]
        ) or "-"  # fmt: skip
        diffs = diffs.replace("|", "\\|")
        lines.append(f"| {r['check']} | {r['result']} | {diffs} | "
                     f"{', '.join(r['excluded']) or '-'} |")  # fmt: skip
    lines += ["", "## Intended changes cited", ""]
    cited = {(e["commit"], e["says"]) for r in report["checks"] for e in r["differences"]
             if e["intended"]}  # fmt: skip
    lines += [f'- {c}: "{s}"' for c, s in sorted(cited)]
    lines += ["", "## Commands", ""]
    lines += [f"- {r['check']}: `{r['command']}`" for r in report["checks"]]
    lines += ["", "## Not run here", ""] + [f"- {n}" for n in report["not_run"]]
    lines += ["", "## Notes", ""]
    lines += [f"- {r['check']}: {n}" for r in report["checks"] for n in r["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="source tree before")
    parser.add_argument("--after", type=Path, required=True, help="source tree after")
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "refactor_outputs",
        help="results path without suffix (.json and .md are written)",
    )
    args = parser.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    packages = {tag: package_dir(tree) for tag, tree in trees.items()}
    with tempfile.TemporaryDirectory(prefix="refactor-outputs-") as tmp:
        work = Path(tmp)
        fixtures = prepare(trees["before"], trees["after"], work)
        results = run_all(trees, work)
    bench_keys = sorted(
        {k for r in results if r["check"].startswith("bench") for k in r["excluded"]}
    )
    report = {
        "command": "python benchmarks/refactor_outputs.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": str(PYTHON),
        "trees": {k: str(v) for k, v in trees.items()},
        "packages": packages,
        "commits": {tag: commit(tree) for tag, tree in trees.items()},
        "fixtures": fixtures,
        "bench_timing_keys": bench_keys,
        "not_run": NOT_RUN,
        "checks": results,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return int(any(r["result"].endswith("(UNEXPLAINED)") for r in results))


if __name__ == "__main__":
    sys.exit(main())
