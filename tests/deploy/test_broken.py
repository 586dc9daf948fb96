"""A broken manifest or compose file makes the check fail: each break on a scratch copy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.deploy import check, manifests, tools
from tests.deploy.scratch import replace_in

BASE = Path("k8s") / "base"


def convention_problems(root: Path, kustomize: list[str]) -> list[str]:
    """The conventions check of every overlay (without the slower schema validation)."""
    problems = []
    for overlay in manifests.overlays(root):
        objects = tools.render(kustomize, overlay)
        problems += manifests.convention_problems(objects, where=overlay.name)
    return problems


def test_the_check_command_fails_on_a_misspelt_field(tree: Path, kustomize: list[str]) -> None:
    replace_in(tree / BASE / "aggregator.yaml", "imagePullPolicy:", "imagePulPolicy:")

    result = subprocess.run(
        [sys.executable, "-m", "tests.deploy.check", "--root", str(tree)],
        cwd=tools.REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 1, result.stdout
    assert "FAIL kustomize overlays" in result.stdout
    assert "imagePulPolicy" in result.stdout


def test_a_container_that_may_write_its_root_filesystem_fails(
    tree: Path, kustomize: list[str]
) -> None:
    replace_in(
        tree / BASE / "worker.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false"
    )

    problems = convention_problems(tree, kustomize)

    assert any(
        "Deployment/worker container worker: securityContext.readOnlyRootFilesystem" in p
        for p in problems
    )


def test_a_service_that_selects_no_pod_fails(tree: Path, kustomize: list[str]) -> None:
    replace_in(
        tree / BASE / "clustering.yaml",
        "  selector:\n    app: clustering",
        "  selector:\n    app: clusterin",
    )

    problems = convention_problems(tree, kustomize)

    assert any("Service/clustering: its selector" in p for p in problems)


def test_a_missing_probe_or_limit_fails(tree: Path, kustomize: list[str]) -> None:
    replace_in(tree / BASE / "inference.yaml", "path: /readyz", "path: /healthz")
    replace_in(tree / BASE / "migrate.yaml", "              memory: 512Mi\n", "")

    problems = convention_problems(tree, kustomize)

    assert any(
        "Deployment/inference container inference: readinessProbe must GET /readyz" in p
        for p in problems
    )
    assert any(
        "Job/migrate container migrate: resources.limits.memory is missing" in p for p in problems
    )


def test_a_misspelt_setting_in_an_overlay_fails(tree: Path, kustomize: list[str]) -> None:
    overlay = tree / "k8s" / "overlays" / "dev" / "kustomization.yaml"
    replace_in(overlay, "- TESSERA_ENV=development", "- TESERA_ENV=development")
    replace_in(overlay, "- TESSERA_TOKEN_SECRET=", "- TESSERA_TOKEN_SECRETS=")

    problems = convention_problems(tree, kustomize)

    assert any("TESERA_ENV is not a setting" in p for p in problems)
    assert any("TESSERA_TOKEN_SECRETS is not a setting" in p for p in problems)


def test_a_kustomization_that_does_not_build_fails(tree: Path, kustomize: list[str]) -> None:
    replace_in(tree / BASE / "kustomization.yaml", "  - worker.yaml\n", "  - workers.yaml\n")

    problems = check.overlay_problems(tree, kustomize)

    assert any("kustomize could not render" in p and "workers.yaml" in p for p in problems)


def test_a_broken_compose_file_fails(tree: Path, compose: list[str]) -> None:
    replace_in(
        tree / "docker-compose.yml",
        "      postgres:\n        condition",
        "      postgre:\n        condition",
    )

    problems = check.compose_problems(tree, compose)

    assert problems and "postgre" in problems[0]


def test_compose_refuses_to_run_without_a_required_secret(tree: Path, compose: list[str]) -> None:
    env = tree / ".env.example"
    replace_in(env, "TESSERA_OPERATOR_TOKEN=change-me\n", "")

    result = tools.compose_config(compose, tree, files=["docker-compose.yml"], env_file=env)

    assert result.returncode != 0
    assert "TESSERA_OPERATOR_TOKEN" in result.stdout + result.stderr


def test_badly_indented_yaml_fails_lint(tree: Path) -> None:
    replace_in(
        tree / "k8s" / "components" / "autoscaling" / "hpa.yaml",
        "  minReplicas: 1",
        "   minReplicas: 1",
    )

    problems = check.yamllint_problems(tree)

    assert any("hpa.yaml" in p for p in problems)
