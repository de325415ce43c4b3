"""Offline checks of the deployment files: hadolint on the Dockerfile, kubernetes-validate --strict on the
Kubernetes resources, the Argo Workflow against Argo's own models (hera), yamllint on every YAML file, and
the exit codes the specs rely on against the jobs' codes."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from facessl.common.errors import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_RETRY, UsageError

BIN = Path(sys.executable).parent
K8S = sorted((REPO / "infra" / "k8s").glob("*.yaml"))
ARGO = REPO / "infra" / "argo" / "pipeline-workflow.yaml"
NEVER_RETRY = sorted([UsageError.exit_code, EXIT_BAD_INPUT, EXIT_DIVERGED])


def run(*cmd):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)


def test_dockerfile_passes_hadolint():
    r = run(BIN / "hadolint", REPO / "Dockerfile")
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_check_can_fail(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM python:latest\nRUN apt-get install curl\n")
    assert run(BIN / "hadolint", tmp_path / "Dockerfile").returncode != 0


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_kubernetes_resources_validate_strictly(path):
    r = run(BIN / "kubernetes-validate", "--strict", path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kubernetes_validation_can_fail(tmp_path):
    job = yaml.safe_load((REPO / "infra" / "k8s" / "pretrain-simclr-job.yaml").read_text())
    # a typo the API server would silently drop
    job["spec"]["backofLimit"] = 2
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert run(BIN / "kubernetes-validate", "--strict", tmp_path / "job.yaml").returncode != 0


def argo_roundtrip(doc: dict) -> dict:
    """The Workflow parsed with Argo's models (hera) and dumped back: fields Argo does not know vanish."""
    from hera.workflows.models import Workflow

    return Workflow.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")


def test_argo_workflow_matches_argo_models():
    doc = yaml.safe_load(ARGO.read_text())
    assert doc["apiVersion"] == "argoproj.io/v1alpha1" and doc["kind"] == "Workflow"
    assert argo_roundtrip(doc) == doc
    tasks = {t["template"]: t for t in doc["spec"]["templates"][0]["dag"]["tasks"]}
    names = {template: task["name"] for template, task in tasks.items()}
    assert tasks["pretrain-simclr"]["dependencies"] == [names["prepare-data"]]
    assert tasks["train-classifier"]["dependencies"] == [names["pretrain-simclr"]]


def test_argo_check_can_fail():
    doc = yaml.safe_load(ARGO.read_text())
    doc["spec"]["entrypiont"] = doc["spec"].pop("entrypoint")
    assert argo_roundtrip(doc) != doc


def test_all_yaml_passes_yamllint():
    files = [*K8S, ARGO, REPO / "infra" / "compose.yaml"]
    r = run(BIN / "yamllint", "--strict", "-c", REPO / ".yamllint.yaml", *files)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", [p for p in K8S if "-job" in p.name or "multinode" in p.name], ids=lambda p: p.name)
def test_job_specs_fail_fast_on_the_jobs_non_retryable_codes(path):
    jobs = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "Job"]
    assert jobs
    for job in jobs:
        spec = job["spec"]
        rules = spec["podFailurePolicy"]["rules"]
        fail = [r for r in rules if r["action"] == "FailJob"]
        assert sorted(fail[0]["onExitCodes"]["values"]) == NEVER_RETRY
        # preempted / transient: retried
        assert EXIT_RETRY not in fail[0]["onExitCodes"]["values"]
        assert any(r["action"] == "Ignore" and r["onPodConditions"][0]["type"] == "DisruptionTarget" for r in rules)
        pod = spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 60
        assert spec["backoffLimit"] <= 6 and spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0


def containers(doc: dict) -> list[dict]:
    if doc.get("kind") == "Workflow":
        return [t["container"] for t in doc["spec"]["templates"] if "container" in t]
    if doc.get("kind") == "Job":
        return doc["spec"]["template"]["spec"]["containers"]
    return []


@pytest.mark.parametrize("path", [*K8S, ARGO], ids=lambda p: p.name)
def test_specs_keep_tini_as_pid_1(path):
    """A Kubernetes ``command`` replaces the image's ENTRYPOINT: it must start with tini, or SIGTERM would
    reach a process that is not the job's and the checkpoint-on-preemption path would not run."""
    for doc in yaml.safe_load_all(path.read_text()):
        for c in containers(doc or {}):
            assert "command" not in c or c["command"][0] == "/usr/bin/tini", (path.name, c["name"])


def test_torchrun_spec_passes_the_ranks_exit_code_on():
    """torchrun exits 1 whatever its ranks exit with: the multi-node spec must exit with the code the ranks
    recorded in FACESSL_EXIT_CODE_FILE (tests/test_distributed.py runs that shell line for real)."""
    job = next(
        d
        for d in yaml.safe_load_all((REPO / "infra" / "k8s" / "pretrain-simclr-multinode.yaml").read_text())
        if d and d["kind"] == "Job"
    )
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["/usr/bin/tini", "-g", "--"]
    assert {"name": "FACESSL_EXIT_CODE_FILE", "value": "/tmp/facessl-exit-code"} in container["env"]
    script = container["args"][0]
    assert script.startswith('rm -f "$FACESSL_EXIT_CODE_FILE";') and "torchrun" in script
    assert script.endswith(EXIT_WRAPPER_TAIL)


EXIT_WRAPPER_TAIL = 'rc=$?; code=$(cat "$FACESSL_EXIT_CODE_FILE" 2>/dev/null); exit "${code:-$rc}"'


def test_compose_stack_runs_the_jobs_in_order_against_pinned_minio():
    compose = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    services = compose["services"]
    minio = services["minio"]
    assert minio["image"].split(":")[1].startswith("RELEASE.") and "healthcheck" in minio
    assert services["create-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    order = ["upload", "prepare-data", "pretrain-simclr", "train-classifier"]
    for before, after in zip(order, order[1:]):
        assert services[after]["depends_on"][before]["condition"] == "service_completed_successfully"
    for name in order[1:]:
        job = services[name]
        assert job["command"][0] == name and job["environment"]["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert services["prepare-data"]["build"]["dockerfile"] == "Dockerfile"
