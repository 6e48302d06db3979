"""The Kubernetes manifests in deploy/kubernetes/: they parse, have what
Kubernetes requires, and agree with the code (ports, probe paths, settings,
gunicorn options, shutdown timing)."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml
from werkzeug.test import Client

from remotedialer import app as example_app
from remotedialer.cli import build_parser
from remotedialer.cli import server as cli_server
from remotedialer.ha.discovery import parse_dns_name
from remotedialer.ha.lifecycle import CLOSE_TIMEOUT

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def load(name: str) -> List[Dict[str, Any]]:
    with open(DEPLOY / name, encoding="utf-8") as file:
        return [doc for doc in yaml.safe_load_all(file) if doc]


@pytest.fixture(scope="module")
def objects() -> Dict[str, Dict[str, Any]]:
    kustomization = load("kustomization.yaml")[0]
    found: Dict[str, Dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for doc in load(resource):
            for field in ("apiVersion", "kind", "metadata"):
                assert field in doc, f"{resource}: {doc.get('kind')} has no {field}"
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def container(objects: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    pod = objects["Deployment/remotedialer"]["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    return dict(main)


def env_of(objects: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container(objects)["env"]}


def gunicorn_settings(objects: Dict[str, Dict[str, Any]]) -> Any:
    from gunicorn.config import Config

    command = container(objects)["command"]
    assert command[0] == "gunicorn"
    config = Config()
    args = config.parser().parse_args(command[1:])  # unknown options fail here
    for name, value in vars(args).items():
        if value is not None and name in config.settings:
            config.set(name, value)
    return config, args


def test_the_objects_are_all_there(objects: Dict[str, Dict[str, Any]]) -> None:
    assert set(objects) == {
        "Secret/remotedialer-peer-token", "Service/remotedialer", "Service/remotedialer-peers",
        "Deployment/remotedialer",
    }
    deployment = objects["Deployment/remotedialer"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for name in ("Service/remotedialer", "Service/remotedialer-peers"):
        assert objects[name]["spec"]["selector"].items() <= labels.items()
    headless = objects["Service/remotedialer-peers"]["spec"]
    assert headless["clusterIP"] == "None" or headless["clusterIP"] is None
    # A new pod becomes ready only after its peers found it (see lifecycle.py).
    assert headless["publishNotReadyAddresses"] is True
    assert objects["Service/remotedialer"]["spec"].get("publishNotReadyAddresses", False) is False


def test_ports_agree_with_the_cli(objects: Dict[str, Dict[str, Any]]) -> None:
    main = container(objects)
    (port,) = main["ports"]
    cli_port = build_parser().parse_args(["server"]).listen[1]
    assert port["containerPort"] == cli_port == example_app.DEFAULT_PORT
    config, _args = gunicorn_settings(objects)
    assert config.bind == [f"0.0.0.0:{port['containerPort']}"]
    for name in ("Service/remotedialer", "Service/remotedialer-peers"):
        (service_port,) = objects[name]["spec"]["ports"]
        assert service_port["targetPort"] in (port["name"], port["containerPort"])
    # Discovery resolves the headless Service's name, on the port the pods listen on.
    _scheme, name, dns_port = parse_dns_name(env_of(objects)["REMOTEDIALER_PEERS_FROM_DNS"], 0)
    assert name.startswith("remotedialer-peers.$(POD_NAMESPACE).svc.")
    assert dns_port == port["containerPort"]


def test_gunicorn_runs_one_worker_of_ours_with_enough_threads(objects: Dict[str, Dict[str, Any]]) -> None:
    from remotedialer.workers import RemotedialerWorker

    config, args = gunicorn_settings(objects)
    assert config.worker_class is RemotedialerWorker
    assert config.workers == 1
    # one thread per connection, at most --worker-connections (no --threads given)
    assert config.threads == 1 and config.worker_connections >= 1000
    assert args.args == ["remotedialer.cli.server:make_app()"]
    assert not config.preload_app  # the SIGTERM drain is set up in the worker


def test_probes_reach_the_health_endpoints(objects: Dict[str, Dict[str, Any]]) -> None:
    main = container(objects)
    app = cli_server.make_app(handle_sigterm=False, drain_seconds=0)
    try:
        client = Client(app)
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            http_get = main[probe]["httpGet"]
            assert http_get["path"] == path
            assert http_get["port"] in (main["ports"][0]["name"], main["ports"][0]["containerPort"])
            assert client.get(path).status_code == 200
    finally:
        app.close()


def test_settings_are_ones_the_server_reads(objects: Dict[str, Dict[str, Any]]) -> None:
    source = inspect.getsource(example_app)
    env = env_of(objects)
    for name in env:
        if name.startswith("REMOTEDIALER_") or name == "POD_IP":
            assert f'"{name}"' in source, f"{name} is not read by make_app()"
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # The token comes from the Secret, mounted where the token file setting points.
    (mount,) = container(objects)["volumeMounts"]
    volumes = {volume["name"]: volume for volume in objects["Deployment/remotedialer"]["spec"]["template"]
               ["spec"]["volumes"]}
    secret = volumes[mount["name"]]["secret"]
    assert f"Secret/{secret['secretName']}" in objects
    (item,) = secret["items"]
    assert item["key"] in objects[f"Secret/{secret['secretName']}"]["stringData"]
    assert os.path.join(mount["mountPath"], item["path"]) == env["REMOTEDIALER_TOKEN_FILE"]


def test_shutdown_fits_in_the_grace_period(objects: Dict[str, Dict[str, Any]]) -> None:
    deployment = objects["Deployment/remotedialer"]["spec"]
    env = env_of(objects)
    config, _args = gunicorn_settings(objects)
    drain = float(env["REMOTEDIALER_DRAIN_SECONDS"])
    assert drain > 0
    assert drain + CLOSE_TIMEOUT < config.graceful_timeout
    assert config.graceful_timeout < deployment["template"]["spec"]["terminationGracePeriodSeconds"]
    # Old pods have found a new one before the rollout stops one of them.
    assert deployment["minReadySeconds"] > float(env["REMOTEDIALER_PEER_REFRESH"])
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_image_has_the_k8s_extra() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "[k8s" in dockerfile and "gunicorn" in dockerfile
