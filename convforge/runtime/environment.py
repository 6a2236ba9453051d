"""What a measurement belongs to: this machine's CPU, cores, GPU and library versions.

Every bench record and every plan carries :func:`environment`; a plan run
elsewhere compares it with here (:meth:`convforge.runtime.plan.Plan.mismatches`).
"""

from __future__ import annotations

import os
import platform

from convforge.runtime.backends import BACKENDS, backend_class


def environment() -> dict:
    """CPU, cores, GPU and library versions of this run (what the numbers belong to): the
    version of every backend's ``library`` that imports here, and numpy's."""
    env = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    for lib in [*sorted({backend_class(n).library for n in BACKENDS}), "numpy"]:
        try:
            module = __import__(lib)
            env[f"{lib}_version"] = str(getattr(module, "__version__", "unknown"))
        except ImportError:
            pass
    env.update(_gpu())
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu() -> dict:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return {}
    try:
        out = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            .stdout.strip()
            .splitlines()
        )
    except (subprocess.SubprocessError, OSError):
        return {}
    if not out:
        return {}
    name, driver = (s.strip() for s in out[0].split(",", 1))
    return {"gpu": name, "gpu_driver": driver}
