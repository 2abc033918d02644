"""deploy/kubernetes/hpo.yaml, checked without a cluster: every document against the Kubernetes
OpenAPI schema, and the commands of its pods parsed by hpo's own CLI."""

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from hpo.cli import parser
from hpo.cli.commands import cmd_best, cmd_run, cmd_worker

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kubernetes" / "hpo.yaml"
# kubernetes-validate bundles JSON schemas generated from Kubernetes' OpenAPI spec, one set per
# release; the strict ones reject unknown fields. The oldest release the manifest's header asks for,
# and the newest that kubernetes-validate 1.37 ships.
VERSIONS = ("1.30", "1.37")
SECRET = "hpo-postgres"  # made by the user with kubectl, never in the repository


def documents() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def find(kind: str, name: str) -> dict:
    (doc,) = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict, name: str) -> dict:
    (found,) = [c for c in pod(workload)["containers"] if c["name"] == name]
    return found


def all_containers() -> list[dict]:
    return [c for d in documents() if "template" in d.get("spec", {})
            for c in pod(d).get("initContainers", []) + pod(d)["containers"]]


def mounts(workload: dict, name: str) -> dict[str, tuple[str, bool]]:
    """mount path -> (the PVC mounted there, read-only)."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod(workload)["volumes"]}
    return {m["mountPath"]: (claims[m["name"]], m.get("readOnly", False))
            for m in container(workload, name)["volumeMounts"]}


def hpo_args(workload: dict, name: str):
    command = container(workload, name)["command"]
    assert command[0] == "hpo"
    return parser().parse_args(command[1:])  # the same CLI the tests run without a cluster


def secret_ref(env: dict) -> dict | None:
    return env.get("valueFrom", {}).get("secretKeyRef")


@pytest.mark.parametrize("version", VERSIONS)
def test_every_document_follows_the_kubernetes_schema(version):
    for doc in documents():
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            used = kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:  # its message is long: the path and the reason
            pytest.fail(f"{name}: {'.'.join(map(str, e.path))}: {e.message.splitlines()[0]}")
        assert used == version, name  # the release asked for, not an older one it fell back to
    assert {(d["kind"], d["metadata"]["name"]) for d in documents()} == {
        ("PersistentVolumeClaim", "hpo-artifacts"), ("PersistentVolumeClaim", "hpo-runs"),
        ("PersistentVolumeClaim", "hpo-data"), ("Service", "hpo-postgres"), ("StatefulSet", "hpo-postgres"),
        ("Service", "hpo-proxy"), ("Deployment", "hpo-proxy"), ("Job", "hpo-create"), ("Job", "hpo-workers"),
        ("Service", "hpo-dashboard"), ("Deployment", "hpo-dashboard")}
    assert all("namespace" not in d["metadata"] for d in documents())  # kubectl -n picks it


def test_the_schema_check_is_not_vacuous():
    workers = find("Job", "hpo-workers")
    wrong_type = copy.deepcopy(workers)
    wrong_type["spec"]["completions"] = "four"
    unknown_field = copy.deepcopy(workers)
    container(unknown_field, "worker")["gpus"] = 1  # not a Container field: strict mode's catch
    for broken in (wrong_type, unknown_field):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_postgres_is_a_statefulset_with_its_own_volume_and_readiness_check():
    sts, service = find("StatefulSet", "hpo-postgres"), find("Service", "hpo-postgres")
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == "hpo-postgres"
    pg = container(sts, "postgres")
    assert pg["image"] == "postgres:16"
    assert "pg_isready" in pg["readinessProbe"]["exec"]["command"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (mount,) = pg["volumeMounts"]
    assert mount["name"] == claim["metadata"]["name"] and mount["mountPath"] == "/var/lib/postgresql/data"
    env = {e["name"]: e for e in pg["env"]}
    assert env["PGDATA"]["value"].startswith(mount["mountPath"] + "/")  # a subfolder: initdb wants it empty
    assert secret_ref(env["POSTGRES_PASSWORD"]) == {"name": SECRET, "key": "POSTGRES_PASSWORD"}
    (port,) = service["spec"]["ports"]
    assert port["port"] == 5432 and port["targetPort"] == pg["ports"][0]["name"]
    assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()


def test_the_proxy_serves_the_database_on_the_port_the_workers_use():
    proxy, service = find("Deployment", "hpo-proxy"), find("Service", "hpo-proxy")
    assert proxy["spec"]["replicas"] == 1  # it keeps the queue too
    args = hpo_args(proxy, "proxy")
    assert args.func.__name__ == "cmd_proxy" and args.host == "0.0.0.0"
    main = container(proxy, "proxy")
    assert "--storage" not in main["command"]  # from $HPO_STORAGE: the password stays off the command line
    (env,) = main["env"]
    assert env["name"] == "HPO_STORAGE" and secret_ref(env) == {"name": SECRET, "key": "url"}
    (port,) = service["spec"]["ports"]
    (container_port,) = main["ports"]
    assert port["name"] == "grpc" and port["protocol"] == "TCP" and port["port"] == args.port
    assert port["targetPort"] == container_port["name"] and container_port["containerPort"] == args.port
    assert main["readinessProbe"]["tcpSocket"]["port"] == container_port["name"]
    assert service["spec"]["selector"].items() <= proxy["spec"]["template"]["metadata"]["labels"].items()

    url = urlsplit(hpo_args(find("Job", "hpo-workers"), "worker").storage)
    assert (url.scheme, url.hostname, url.port) == ("grpc", service["metadata"]["name"], port["port"])


def test_the_study_is_created_once_and_the_workers_join_it():
    create, workers = find("Job", "hpo-create"), find("Job", "hpo-workers")
    run, worker = hpo_args(create, "create"), hpo_args(workers, "worker")
    assert run.func is cmd_run and run.n_trials == 50
    assert worker.func is cmd_worker and worker.storage == "grpc://hpo-proxy:13000"
    assert (ROOT / worker.study).is_file()
    # The study file is a relative path: the image's working directory holds studies/.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "COPY studies ./studies" in dockerfile
    assert all("workingDir" not in c for c in all_containers())
    for key in ("study", "storage", "data", "artifacts", "out", "device"):
        assert getattr(run, key) == getattr(worker, key), key
    assert worker.device == "cuda" and worker.quiet

    # The workers' init container waits while `hpo best` says there is no such study (exit 2).
    (wait,) = pod(workers)["initContainers"]
    script = wait["command"][-1]
    best_command = shlex.split(re.fullmatch(r"until (hpo best [^;]+); \[ \$\? -ne 2 \]; do sleep \d+; done",
                                            " ".join(script.split()))[1])
    best = parser().parse_args(best_command[1:])
    assert best.func is cmd_best and (best.study, best.storage) == (worker.study, worker.storage)


def test_hpo_best_tells_a_missing_study_from_an_empty_one(tmp_path):
    """What the init container relies on: exit 2 before `hpo run` made the study, 1 after."""
    import optuna

    from hpo.config.study_file import load_study
    from hpo.study.identity import open_study

    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = ROOT / "studies" / "recipe-random-search.toml"
    optuna.storages.RDBStorage(url)  # the database, without the study

    def best() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hpo.cli", "best", str(study), "--storage", url],
                              capture_output=True, text=True, timeout=300)

    assert best().returncode == 2
    open_study(load_study(study), url, create=True)
    r = best()
    assert r.returncode == 1 and "no completed trial" in r.stderr, r.stderr


def test_workers_are_an_indexed_job_of_one_gpu_each():
    workers = find("Job", "hpo-workers")
    spec = workers["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] >= 1
    assert spec["backoffLimitPerIndex"] >= 1  # a worker that dies is replaced
    for job, name in ((workers, "worker"), (find("Job", "hpo-create"), "create")):
        resources = container(job, name)["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
        # podFailurePolicy and backoffLimitPerIndex need Never; the schema does not say so, the API server does.
        assert pod(job)["restartPolicy"] == "Never"
        rules = job["spec"]["podFailurePolicy"]["rules"]
        fail_job = [r["onExitCodes"] for r in rules if r["action"] == "FailJob"]
        assert fail_job and all(c["containerName"] == name and 3 in c["values"] for c in fail_job)  # gate failed
    disruption = [r for r in spec["podFailurePolicy"]["rules"] if "onPodConditions" in r]
    assert [r["action"] for r in disruption] == ["Ignore"]  # preempted or evicted: not counted


def test_workers_and_the_dashboard_share_the_artifact_store():
    claims = {d["metadata"]["name"]: d["spec"]["accessModes"] for d in documents()
              if d["kind"] == "PersistentVolumeClaim"}
    workers, dashboard = find("Job", "hpo-workers"), find("Deployment", "hpo-dashboard")
    worker = hpo_args(workers, "worker")
    worker_mounts = mounts(workers, "worker")
    assert worker_mounts == mounts(find("Job", "hpo-create"), "create")
    assert worker_mounts[worker.artifacts] == ("hpo-artifacts", False)
    assert worker_mounts[worker.out][0] == "hpo-runs"  # a retry on another node goes on from last.pt
    assert worker_mounts[worker.data] == ("hpo-data", True)
    for claim in ("hpo-artifacts", "hpo-runs"):
        assert claims[claim] == ["ReadWriteMany"], claim  # pods on many nodes at once
    every_claim = {v["persistentVolumeClaim"]["claimName"] for d in documents() if "template" in d.get("spec", {})
                   for v in pod(d).get("volumes", [])}
    assert every_claim <= claims.keys()

    command = " ".join(container(dashboard, "dashboard")["command"])
    artifact_dir = re.search(r"--artifact-dir (\S+)", command)[1]
    assert mounts(dashboard, "dashboard")[artifact_dir][0] == "hpo-artifacts"
    assert command.endswith('"$HPO_STORAGE"')  # the database itself, as docker-compose.yml's dashboard
    (env,) = container(dashboard, "dashboard")["env"]
    assert env["name"] == "HPO_STORAGE" and secret_ref(env) == {"name": SECRET, "key": "url"}
    service = find("Service", "hpo-dashboard")
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["ports"][0]["port"] == 8080


def test_no_credentials_in_the_repository():
    assert all(d["kind"] != "Secret" for d in documents())
    text = MANIFEST.read_text()
    passwords = re.findall(r"postgresql\+psycopg://[^:@\s]+:([^@\s]*)@", text)  # the header's example
    assert passwords and all(p.startswith("$") for p in passwords), passwords
    keys = set()
    for c in all_containers():
        for env in c.get("env", []):
            if secret_ref(env):
                assert secret_ref(env)["name"] == SECRET
                keys.add(secret_ref(env)["key"])
            else:
                assert "://" not in env["value"] and "PASSWORD" not in env["name"], env
        assert "envFrom" not in c
    for key in keys:  # the header's `kubectl create secret` makes every key the pods read
        assert f"--from-literal={key}=" in text, key
    # Workers, the study's creator and the init container reach the study through the proxy only.
    for job in (find("Job", "hpo-workers"), find("Job", "hpo-create")):
        for c in pod(job).get("initContainers", []) + pod(job)["containers"]:
            assert not any(secret_ref(e) for e in c.get("env", [])), c["name"]


def test_labels_select_what_the_header_says():
    for doc in documents():
        for labels in (doc["metadata"]["labels"], doc.get("spec", {}).get("template", {}).get("metadata", {})
                       .get("labels", doc["metadata"]["labels"])):
            assert labels["app.kubernetes.io/name"] == "hpo" and labels["app.kubernetes.io/component"]
        if doc["kind"] in ("Deployment", "StatefulSet"):
            selected = doc["spec"]["selector"]["matchLabels"].items()
            assert selected <= doc["spec"]["template"]["metadata"]["labels"].items()
        if doc["kind"] == "Service":  # the pods of exactly one workload
            selected = doc["spec"]["selector"].items()
            assert len([d for d in documents() if "template" in d.get("spec", {})
                        and selected <= d["spec"]["template"]["metadata"]["labels"].items()]) == 1

    def component(name: str) -> set[tuple[str, str]]:
        return {(d["kind"], d["metadata"]["name"]) for d in documents()
                if d["metadata"]["labels"]["app.kubernetes.io/component"] == name}

    # -l 'app.kubernetes.io/component!=postgres' (a managed database) skips exactly these two.
    assert component("postgres") == {("StatefulSet", "hpo-postgres"), ("Service", "hpo-postgres")}
    assert component("storage") == {("PersistentVolumeClaim", n) for n in ("hpo-artifacts", "hpo-runs", "hpo-data")}


def test_every_container_asks_for_resources_and_runs_the_images_built_here():
    for c in all_containers():
        assert {"cpu", "memory"} <= c["resources"]["requests"].keys(), c["name"]
    assert {c["image"] for c in all_containers()} == {"postgres:16", "hpo:latest"}  # hpo:latest: the Dockerfile
