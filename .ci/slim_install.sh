#!/usr/bin/env bash
# The runtime-only install, as a GPU server or a Jetson gets it: a fresh venv with
# '.[cpu]' must run inspect, predict and bench on an exported model without torch,
# `convforge train` must name the missing extra in one line, and the wheel must hold
# the package and nothing else (no tests, benchmarks or fixtures).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
model=tests/fixtures/digits.onnx

echo "slim install: pip install '.[cpu]' into a fresh venv"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check '.[cpu]'
py="$work/venv/bin/python"
cf="$work/venv/bin/convforge"
if "$py" -c "import torch" 2>/dev/null; then
    echo "FAIL: torch is importable in the [cpu] install"
    exit 1
fi

"$cf" inspect "$model" >/dev/null
"$cf" predict "$model" tests/fixtures/digit-*.png --json >"$work/predict.json"
"$py" - "$work/predict.json" <<'PY'
import json, pathlib, sys
predictions = json.load(open(sys.argv[1]))["predictions"]
wrong = [p["image"] for p in predictions
         if p["top"][0]["label"] != pathlib.Path(p["image"]).stem.split("-")[-1]]
assert predictions and not wrong, f"wrong labels for {wrong}"
print(f"predict: {len(predictions)} fixture digits right without torch")
PY
"$cf" bench "$model" --iters 20 --json-out "$work/bench.json" >/dev/null
echo "bench: $("$py" -c "import json,sys; print(len(json.load(open(sys.argv[1]))['records']))" "$work/bench.json") records"

set +e
message=$("$cf" train 2>&1)
status=$?
set -e
expected="convforge: error: convforge train needs PyTorch: pip install 'convforge[train]'"
if [ "$status" != 2 ] || [ "$message" != "$expected" ]; then
    printf 'FAIL: convforge train without torch gave exit %s and:\n%s\n' "$status" "$message"
    exit 1
fi
echo "train without torch: exit 2, one line"

echo "wheel: python -m build --wheel"
.venv/bin/python -m build --wheel --outdir "$work/dist" . >"$work/build.log" 2>&1 \
    || { cat "$work/build.log"; exit 1; }
"$py" - "$work"/dist/*.whl <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
outside = [n for n in names if not n.startswith(("convforge/", "convforge-"))]
assert not outside, f"the wheel holds files outside the package: {outside[:5]}"
for required in ("convforge/cli/__init__.py", "convforge/contract.py", "convforge/runtime/model.py"):
    assert required in names, f"the wheel lacks {required}"
stray = [n for n in names if n.endswith((".onnx", ".png", ".pt")) or "/tests/" in n]
assert not stray, f"the wheel holds fixtures or tests: {stray[:5]}"
print(f"wheel: {len(names)} files, the convforge package only")
PY
