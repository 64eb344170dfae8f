"""Which machine this is, as a key: what a compiled-model cache or a tune record was made on.

A speed measurement or a compiled model holds only on the hardware and library versions that produced it,
so both are stored under :func:`machine_key`: the CPU model and its vector-ISA flags (the ones that change
which kernels run: AVX-512, VNNI, BF16, FP16, AMX), the GPUs ``nvidia-smi`` lists and the versions of the
inference libraries installed. Reading it imports none of those libraries (``importlib.metadata`` only).

Which libraries those are is the backends' to say (each backend's record lists its packages):
``winclip_edge.engines.registry.machine_key`` hands them in; this module only measures.
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Sequence

# cpuinfo flags that select kernels: everything vector / matrix (the rest of the list is noise for us).
_ISA_FLAG = re.compile(r"^(avx|amx|fma|f16c|sse4_2|vnni|avx_vnni)")
KEY_DIGITS = 12


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
            if model and flags:
                break
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def isa_flags() -> list[str]:
    """The kernel-relevant CPU flags, sorted (e.g. avx2, avx512_bf16, avx512_vnni, amx_tile ...)."""
    return sorted({f for f in _cpuinfo()[1] if _ISA_FLAG.match(f)})


def gpus(details: bool = False) -> list[str]:
    """GPU names from nvidia-smi (no CUDA library is imported for this); ``details`` adds memory and driver."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    query = "name,memory.total,driver_version" if details else "name"
    try:
        out = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def installed_versions(packages: Sequence[str]) -> dict[str, str]:
    """Versions of the installed ``packages`` (absent ones left out), read from their metadata (no import)."""
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@lru_cache(maxsize=8)
def machine_identity(packages: tuple[str, ...]) -> dict:
    """CPU model + ISA flags, GPUs, the versions of ``packages`` (the libraries whose version changes which kernels
    run, or which candidates exist): what a tune record or model cache depends on."""
    return {"cpu": cpu_model(), "isa_flags": isa_flags(), "gpus": gpus(), "versions": installed_versions(packages)}


def machine_key(identity: dict) -> str:
    """A short stable digest of a :func:`machine_identity` (file and folder names)."""
    text = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_DIGITS]


__all__ = ["cpu_model", "gpus", "installed_versions", "isa_flags", "machine_identity", "machine_key"]
