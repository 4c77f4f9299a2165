"""The Dockerfiles in images/, checked without a Docker engine.

Each Dockerfile's COPY lines are replayed into a temporary build directory and its `pip install` RUN lines run
there against a fresh virtual environment (pip's cache in $DATACREDIT_CACHE/pip keeps this quick). The operator
image is installed for real and imported; the worker image, whose CUDA base already has torch, is resolved with
`pip install --dry-run` against a stand-in for the base image's torch.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import venv
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.infra.binaries import cache_dir

pytestmark = pytest.mark.images

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"


@dataclass
class Dockerfile:
    """The instructions of a single-stage Dockerfile that matter here."""

    base: str
    workdir: str = "/"
    copies: list[tuple[list[str], str, str]] = field(default_factory=list)  # (sources, dest, workdir)
    runs: list[str] = field(default_factory=list)
    user: str = ""
    entrypoint: list[str] = field(default_factory=list)


def parse_dockerfile(path: Path) -> Dockerfile:
    """Parse FROM, WORKDIR, COPY, RUN, USER and ENTRYPOINT (line continuations joined, comments dropped)."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    instructions = re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines()
    parsed: Dockerfile | None = None
    for line in filter(str.strip, instructions):
        keyword, _, rest = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            assert parsed is None, f"{path.name}: expected a single stage"
            parsed = Dockerfile(base=rest.strip())
            continue
        assert parsed is not None, f"{path.name}: {keyword} before FROM"
        if keyword == "WORKDIR":
            parsed.workdir = os.path.join(parsed.workdir, rest.strip())
        elif keyword == "COPY":
            *sources, dest = shlex.split(rest)
            assert not any(s.startswith("--") for s in sources), f"{path.name}: COPY flags are not replayed"
            parsed.copies.append((sources, dest, parsed.workdir))
        elif keyword == "RUN":
            parsed.runs.append(rest.strip())
        elif keyword == "USER":
            parsed.user = rest.strip()
        elif keyword == "ENTRYPOINT":
            parsed.entrypoint = json.loads(rest)
    assert parsed is not None, f"{path.name}: no FROM"
    return parsed


def stage_context(dockerfile: Dockerfile, root: Path) -> Path:
    """Replay the COPY instructions from the repository into `root` (the image's /); return the last WORKDIR."""
    for sources, dest, workdir in dockerfile.copies:
        target = root / os.path.join(workdir, dest).lstrip("/")
        for source in sources:
            src = REPO / source
            assert src.exists(), f"COPY source {source} does not exist"
            into = target / src.name if dest.endswith("/") or len(sources) > 1 else target
            into.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, into, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, into)
    workdir = root / dockerfile.copies[-1][2].lstrip("/")
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def replay_pip_runs(dockerfile: Dockerfile, workdir: Path, env_dir: Path, extra: str = "") -> None:
    """Run the RUN lines that call `pip install` in `workdir`, with `pip` pointing at the venv in `env_dir`.

    The shim calls the venv's `pip` script, as the image does: `python -m pip` would put the working directory
    first on sys.path, where the repository's `operator/` shadows the standard library's `operator`.
    """
    shim = env_dir.parent / "shim"
    shim.mkdir()
    (shim / "pip").write_text(
        "#!/usr/bin/env bash\n"
        'args=(); for a in "$@"; do [[ $a == --no-cache-dir ]] || args+=("$a"); done\n'
        f'exec {shlex.quote(str(env_dir / "bin" / "pip"))} "${{args[@]}}" '
        f"--cache-dir {shlex.quote(str(cache_dir() / 'pip'))} --disable-pip-version-check --no-compile {extra}\n"
    )
    (shim / "pip").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{env_dir / 'bin'}:/usr/bin:/bin"}
    env.pop("PYTHONPATH", None)
    commands = [run for run in dockerfile.runs if "pip install" in run]
    assert commands, "no `pip install` RUN line"
    for command in commands:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def new_venv(path: Path) -> Path:
    """A fresh virtual environment with pip, from the interpreter running the tests."""
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path


def check_common(dockerfile: Dockerfile) -> None:
    """Pinned base, non-root numeric user, `datacredit` entrypoint."""
    image, _, tag = dockerfile.base.rpartition(":")
    assert image and re.search(r"\d+\.\d+", tag) and tag != "latest", f"unpinned base image {dockerfile.base}"
    uid = dockerfile.user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root uid, got {dockerfile.user!r}"
    assert dockerfile.entrypoint == ["datacredit"]


def test_operator_image(tmp_path: Path) -> None:
    dockerfile = parse_dockerfile(IMAGES / "operator.Dockerfile")
    check_common(dockerfile)
    assert "slim" in dockerfile.base
    env_dir = new_venv(tmp_path / "venv")
    replay_pip_runs(dockerfile, stage_context(dockerfile, tmp_path / "root"), env_dir)
    python = env_dir / "bin" / "python"
    probe = (
        "import importlib.util, datacredit.cli, datacredit.operator.handlers, datacredit.operator.main\n"
        "heavy = [m for m in ('torch', 'diffusers', 'torch_pruning') if importlib.util.find_spec(m)]\n"
        "assert not heavy, f'the operator image must stay slim, found {heavy}'\n"
    )
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    result = subprocess.run(
        [env_dir / "bin" / "datacredit", "operator", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0 and "--metrics-port" in result.stdout, result.stdout + result.stderr


def test_worker_image(tmp_path: Path) -> None:
    dockerfile = parse_dockerfile(IMAGES / "worker.Dockerfile")
    check_common(dockerfile)
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda12\.\d+-cudnn9-runtime", dockerfile.base)
    assert match, f"expected a pinned CUDA 12 PyTorch runtime base, got {dockerfile.base}"
    env_dir = new_venv(tmp_path / "venv")
    # Stand in for the base image's torch and torchvision: pip sees them installed, so the image keeps them.
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([env_dir / "bin" / "python", "-c", purelib], text=True).strip())
    _, minor, patch = (int(v) for v in match[1].split("."))
    base = {"torch": match[1], "torchvision": f"0.{minor + 15}.{patch}"}  # torch 2.9.1 ships torchvision 0.24.1
    for name, version in base.items():
        dist_info = site / f"{name}-{version}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (dist_info / "INSTALLER").write_text("pip\n")
        (dist_info / "RECORD").write_text("")
    report = tmp_path / "report.json"
    replay_pip_runs(
        dockerfile,
        stage_context(dockerfile, tmp_path / "root"),
        env_dir,
        extra=f"--dry-run --quiet --report {shlex.quote(str(report))}",
    )
    installs = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    for name, version in base.items():
        assert name not in installs, f"the worker image would replace the base image's {name} {version}"
    assert not [name for name in installs if name.startswith(("nvidia-", "triton"))], installs
    for needed in ("datacredit", "diffusers", "torch-pruning", "peft", "transformers", "torchmetrics", "boto3"):
        assert needed in installs, f"{needed} missing from the worker image: {sorted(installs)}"
    assert not {"kopf", "kubernetes"} & installs.keys(), "the worker image does not need the operator extra"
