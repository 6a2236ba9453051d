"""What each install costs: site-packages size and cold-start ``convforge predict`` time.

    python3 benchmarks/install_footprint.py [--runs 7] [--roles cpu,all]

For each role (an extras list: ``cpu`` is the runtime-only install a GPU
server or Jetson gets, ``all`` the training workstation's) it makes a fresh
venv in a temporary folder and ``pip install '.[ROLE]'`` (not editable, as a
user installs it), then measures:

* the size of the venv's site-packages (bytes on disk, ``du``-style: blocks);
* the wall time of one ``convforge predict tests/fixtures/digits.onnx IMAGE``
  process, start to exit, with ``--backend ort-cpu`` (the same engine in every
  role) and ``--backend auto`` (what a user gets by default). The processes of
  all roles take turns, ``--runs`` rounds, after one discarded round that
  warms the file cache; the median and the spread are reported.

Writes benchmarks/results/install_footprint.json. Takes a few minutes: the
``all`` install copies PyTorch (several GB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = ROOT / "tests" / "fixtures" / "digits.onnx"
IMAGE = sorted((ROOT / "tests" / "fixtures").glob("digit-*.png"))[0]
BACKENDS = ("ort-cpu", "auto")


def _venv(folder: Path, role: str) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    start = time.perf_counter()
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         f"{ROOT}[{role}]"],
        check=True,
    )  # fmt: skip
    print(f"[{role}] installed in {time.perf_counter() - start:.0f} s", flush=True)
    return python


def _site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return Path(out.stdout.strip())


def _disk_bytes(folder: Path) -> int:
    """Bytes on disk under ``folder`` (allocated blocks, as ``du`` counts), links once."""
    seen, total = set(), 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _predict_seconds(python: Path, backend: str) -> float:
    command = [str(python.parent / "convforge"), "predict", str(MODEL), str(IMAGE),
               "--backend", backend]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def _imported(python: Path) -> dict:
    """Which heavy libraries a `predict --backend ort-cpu` process imports (not just has)."""
    code = (
        "import json, sys; from convforge.cli import main; "
        f"main(['predict', {str(MODEL)!r}, {str(IMAGE)!r}, '--backend', 'ort-cpu']); "
        "print(json.dumps(sorted(m for m in ('torch', 'torchvision', 'openvino', 'matplotlib') "
        "if m in sys.modules)), file=sys.stderr)"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return {"heavy_modules_imported": json.loads(out.stderr.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="measured rounds (7)")
    parser.add_argument("--roles", default="cpu,all", help="extras to compare (cpu,all)")
    args = parser.parse_args()
    roles = [r for r in args.roles.split(",") if r]
    with tempfile.TemporaryDirectory(prefix="convforge-footprint-") as tmp:
        pythons = {role: _venv(Path(tmp) / role, role) for role in roles}
        results = {}
        for role, python in pythons.items():
            site = _site_packages(python)
            results[role] = {
                "site_packages_bytes": _disk_bytes(site),
                "packages": len([p for p in site.iterdir() if p.name.endswith(".dist-info")]),
                **_imported(python),
            }
        samples = {(role, b): [] for role in roles for b in BACKENDS}
        for round_ in range(args.runs + 1):  # round 0 warms the file cache and is dropped
            for role in roles:
                for backend in BACKENDS:
                    seconds = _predict_seconds(pythons[role], backend)
                    if round_:
                        samples[role, backend].append(seconds)
        for (role, backend), values in samples.items():
            results[role][f"predict_{backend}_s"] = {
                "median": round(statistics.median(values), 3),
                "min": round(min(values), 3),
                "max": round(max(values), 3),
                "runs": len(values),
            }
    record = {
        "command": f"python3 benchmarks/install_footprint.py --runs {args.runs} "
        f"--roles {args.roles}",
        "machine": {
            "cpu": _cpu(),
            "cpu_flags": _cpu_flags(),
            "logical_cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "model": str(MODEL.relative_to(ROOT)),
        "roles": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "install_footprint.json").write_text(json.dumps(record, indent=2) + "\n")
    for role, r in results.items():
        timings = ", ".join(f"{b} {r[f'predict_{b}_s']['median']:.2f} s" for b in BACKENDS)
        heavy = r["heavy_modules_imported"] or "none"
        size = r["site_packages_bytes"] / 2**20
        print(
            f"[{role}] site-packages {size:,.0f} MiB, {r['packages']} packages; "
            f"predict (median): {timings}; imports {heavy}"
        )


def _cpu_flags() -> list[str]:
    """The SIMD flags that decide CPU inference speed (absolute times mean little without)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:
        return []
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")
    return [flag for flag in wanted if flag in flags]


def _cpu() -> str:
    # Not convforge.runtime.environment: this script runs on the system python3, alone.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
