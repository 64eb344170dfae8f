""".ci/peer_env.py, the side-by-side environments of .ci/run (anomalib; PyTriton's server), run as .ci/run runs it
from inside a venv: the peer sees that venv's packages (not only its base interpreter's), installs its own next to
them, may shadow only the names it unpins, and leaves the caller's environment as it was. Offline: the peer's
packages are wheels made here."""
from __future__ import annotations

import base64
import hashlib
import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "peer_env.py"
pytestmark = pytest.mark.slow


def make_wheel(folder: Path, name: str, version: str, files: dict[str, str], requires=()) -> Path:
    """A minimal pure-Python wheel (what pip needs: the files, METADATA, WHEEL, RECORD)."""
    info = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    entries = {**files, f"{info}/METADATA": meta,
               f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    path = folder / f"{name}-{version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(path, "w") as z:
        for arcname, text in entries.items():
            data = text.encode()
            z.writestr(arcname, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{arcname},sha256={digest},{len(data)}")
        z.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")
    return path


def purelib(python: Path) -> Path:
    return Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())


def py(python: Path, code: str) -> str:
    run = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    make_wheel(folder, "callerprobe", "1.0", {"callerprobe.py": "VERSION = '1.0'\n"})
    make_wheel(folder, "callerprobe", "2.0", {"callerprobe.py": "VERSION = '2.0'\n"})
    make_wheel(folder, "peerprobe", "0.1", {"peerprobe.py": "X = 1\n"}, requires=["numpy"])  # numpy: the caller's
    return folder


@pytest.fixture(scope="module")
def caller(tmp_path_factory, wheels) -> Path:
    """A user's venv with the project: made from this interpreter, it sees this environment's packages (the way an
    install into it would) and has a package of its own (callerprobe 1.0), which its base interpreter lacks."""
    folder = tmp_path_factory.mktemp("caller") / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder)
    python = folder / "bin" / "python"
    sites = [p for p in [*sys.path, *site.getsitepackages()] if p.rstrip("/").endswith("-packages") and os.path.isdir(p)]
    (purelib(python) / "_project.pth").write_text(f"import site; list(map(site.addsitedir, {list(dict.fromkeys(sites))!r}))\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
                    "callerprobe==1.0"], check=True, timeout=300)
    return python


def freeze(python: Path) -> str:
    return subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                          check=True, timeout=300).stdout


def test_venv_with_system_site_packages_misses_the_callers_venv(caller, tmp_path):
    """Why .ci/run no longer uses `venv --system-site-packages`: from inside a venv it builds on the base interpreter."""
    subprocess.run([str(caller), "-m", "venv", "--without-pip", "--system-site-packages", str(tmp_path / "old")],
                   check=True)
    run = subprocess.run([str(tmp_path / "old" / "bin" / "python"), "-c", "import callerprobe"], capture_output=True)
    assert run.returncode != 0


def test_peer_sees_the_caller_venv_and_leaves_it_as_it_was(caller, wheels, tmp_path):
    peer = tmp_path / "peer"
    offline = ["--", "--no-index", "--find-links", str(wheels)]
    versions = "import numpy, cv2, callerprobe; print(numpy.__version__, cv2.__version__, callerprobe.VERSION)"
    before, caller_pip = py(caller, versions), freeze(caller)

    # The caller's versions pin the peer: another callerprobe is refused unless unpinned, with one line saying so.
    refused = subprocess.run([str(caller), str(SCRIPT), str(peer), "peerprobe", "callerprobe==2.0", *offline],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "--unpin" in refused.stderr.strip().splitlines()[-1]

    cmd = [str(caller), str(SCRIPT), str(peer), "peerprobe", "callerprobe==2.0", "--unpin", "callerprobe",
           "--check", "peerprobe,winclip_edge", *offline]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    python = peer / "bin" / "python"
    got = py(python, "import sys, callerprobe, peerprobe, numpy; "
                     "print(sys.prefix, callerprobe.VERSION, numpy.__file__)").split()
    assert Path(got[0]) == peer and got[1] == "2.0", "the peer's own version shadows the caller's"
    assert not Path(got[2]).is_relative_to(peer), "numpy is the caller's, not a copy"
    assert py(caller, "import importlib.util; print(importlib.util.find_spec('peerprobe'))") == "None"
    assert py(caller, versions) == before and freeze(caller) == caller_pip

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_a_peer_sees_the_project_and_owns_a_copy_of_what_it_is_told_to(caller, wheels, tmp_path):
    """The peer is built on the caller venv itself: its packages, the project's export stage and open_clip (what
    the anomalib peer needs) are all there; --own copies the caller's version into the peer (PyTriton's case)."""
    peer = tmp_path / "bare"
    built = subprocess.run([str(caller), str(SCRIPT), str(peer), "--own", "callerprobe", "--check",
                            "callerprobe,winclip_edge.export,open_clip", "--", "--no-index", "--find-links", str(wheels)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    version, where = py(peer / "bin" / "python", "import callerprobe; print(callerprobe.VERSION, callerprobe.__file__)").split()
    assert version == "1.0" and Path(where).is_relative_to(peer), "the caller's version, in the peer's own folder"


def test_the_extras_ci_installs_never_cap_numpy_or_opencv():
    """Only the peer extra (triton-server) may hold numpy < 2 / OpenCV < 4.12 / PyTriton; .ci/run installs the others
    into the caller's environment."""
    import re
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = re.search(r'pip install .*-e "\.\[([a-z,-]+)\]"', (ROOT / ".ci" / "run").read_text()).group(1).split(",")
    assert "triton-server" in extras and "triton-server" not in installed and set(installed) <= set(extras)
    capping = re.compile(r"^(numpy|opencv-python-headless|opencv-python)\s*[^;]*<|^nvidia-pytriton", re.I)
    offenders = [(name, r) for name in installed for r in extras[name] if capping.search(r)]
    assert not offenders, offenders
    assert [r for r in extras["triton-server"] if capping.search(r)], "the check can find a cap"
