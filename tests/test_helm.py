"""The Helm chart (deploy/helm/parley), rendered and linted by the real Helm engine.

helm-python-sdk carries Helm's Go engine (no helm binary, no cluster). Each render is
parsed and checked against what will read it: the Serve config against Ray's
`ServeDeploySchema`, every Kubernetes object and the RayService's pod templates against
the Kubernetes 1.30 OpenAPI schemas (kubernetes-validate), and
every PromQL expression of the dashboards and alerts against the metric names and
labels that Parley (libs/parley/metrics.py) and Ray Serve 2.60 define.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import shutil
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import ray
import yaml
from parley import keys_cli, metrics, rpc, talk_cli
from ray.serve.schema import ServeDeploySchema

from services.sessions.trace import MILESTONES

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "parley"
SERVE_FILE = CHART / "files" / "serve-config.yaml"
PRODUCTION = CHART / "examples" / "values-production.yaml"
RELEASE, NAMESPACE = "parley", "avatars"
KUBE_VERSION = "1.30"
MIG = "mig-1g.10gb"

Obj = dict[str, Any]


def render(values: Obj | None = None, chart: Path = CHART) -> dict[str, Any]:
    """The rendered manifests as objects (`objects`) plus NOTES.txt (`notes`)."""
    with helm.Chart.load(chart) as loaded:
        manifests = loaded.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[Obj] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return {"objects": objects, "notes": notes}


def render_error(values: Obj, chart: Path = CHART) -> str:
    with pytest.raises(helm.HelmError) as failure:
        render(values, chart)
    return str(failure.value)


def only(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(objects: list[Obj]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def serve_config(objects: list[Obj]) -> Obj:
    config: Obj = yaml.safe_load(only(objects, "RayService")["spec"]["serveConfigV2"])
    return config


def app(config: Obj, name: str) -> Obj:
    (found,) = [a for a in config["applications"] if a["name"] == name]
    return found


def deployment(config: Obj, app_name: str, name: str) -> Obj:
    (found,) = [d for d in app(config, app_name)["deployments"] if d["name"] == name]
    return found


def groups(objects: list[Obj]) -> dict[str, Obj]:
    spec = only(objects, "RayService")["spec"]["rayClusterConfig"]
    by_name = {g["groupName"]: g for g in spec.get("workerGroupSpecs") or []}
    by_name["head"] = spec["headGroupSpec"]
    return by_name


def ray_container(group: Obj) -> Obj:
    container: Obj = group["template"]["spec"]["containers"][0]
    return container


def production_values() -> Obj:
    values: Obj = yaml.safe_load(PRODUCTION.read_text())
    return values


@pytest.fixture(scope="module")
def default() -> dict[str, Any]:
    return render()


@pytest.fixture(scope="module")
def production() -> dict[str, Any]:
    return render(production_values())


# --- lint -----------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", [None, PRODUCTION], ids=["default", "production"])
def test_chart_lints_without_warnings(values_file: Path | None) -> None:
    values = yaml.safe_load(values_file.read_text()) if values_file else None
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == []
    # Severity 1 is information ("icon is recommended"); 2 warning, 3 error.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_reports_bad_values() -> None:
    # Lint checks values.schema.json; the templates' own `fail` checks only abort a
    # render (Helm's lint mode logs them), hence the render tests below.
    report = helm.lint(CHART, {"workerGroups": {"cpu": {"minReplicas": -1}}}, namespace=NAMESPACE)
    assert any("/workerGroups/cpu/minReplicas" in error for error in report["errors"]), report


# --- the Serve config ---------------------------------------------------------------


def test_serve_config_is_the_file_with_cluster_settings(default: dict[str, Any]) -> None:
    file_config = yaml.safe_load(SERVE_FILE.read_text())
    config = serve_config(default["objects"])
    ServeDeploySchema.model_validate(config)
    # Every application of the file, in its order, with its deployments as the file has them.
    assert [a["name"] for a in config["applications"]] == [
        a["name"] for a in file_config["applications"]
    ]
    for file_app in file_config["applications"]:
        rendered = app(config, file_app["name"])
        assert rendered["import_path"] == file_app["import_path"]
        assert rendered.get("route_prefix") == file_app.get("route_prefix")
        assert rendered.get("deployments") == file_app.get("deployments")
    # Inside the cluster the proxies listen on the pod network, on every node with replicas.
    assert file_config["http_options"]["host"] == "127.0.0.1"
    assert config["http_options"] == {
        **file_config["http_options"],
        "host": "0.0.0.0",
        "port": 8000,
    }
    assert config["grpc_options"] == {**file_config["grpc_options"], "port": 9000}
    assert config["proxy_location"] == "EveryNode"
    # The pods expose the ports Serve listens on, under the names KubeRay looks for.
    for group in groups(default["objects"]).values():
        ports = {p["name"]: p["containerPort"] for p in ray_container(group)["ports"]}
        assert ports["serve"] == 8000 and ports["serve-grpc"] == 9000 and ports["metrics"] == 8080


def test_production_overrides_reach_serve_and_the_gpu_group(production: dict[str, Any]) -> None:
    objects = production["objects"]
    config = serve_config(objects)
    ServeDeploySchema.model_validate(config)
    file_config = yaml.safe_load(SERVE_FILE.read_text())
    assert [a["name"] for a in config["applications"]] == [
        a["name"] for a in file_config["applications"]
    ]
    render_dep = deployment(config, "render", "render")
    assert render_dep["autoscaling_config"] == {
        "min_replicas": 2,
        "max_replicas": 28,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 5,
        "downscale_delay_s": 300,
    }
    assert render_dep["max_ongoing_requests"] == 1
    assert render_dep["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1, "resources": {MIG: 1}}
    assert app(config, "render")["args"]["config"] == {"device": "cuda"}
    assert deployment(config, "llm", "llm")["ray_actor_options"]["num_cpus"] == 2
    # Untouched fields keep the file's values.
    file_tts = next(a for a in file_config["applications"] if a["name"] == "tts")
    tts = deployment(config, "tts", "tts")
    assert tts["max_ongoing_requests"] == file_tts["deployments"][0]["max_ongoing_requests"]

    gpu = groups(objects)["gpu"]
    params = gpu["rayStartParams"]
    assert params["resources"].startswith("'") and params["resources"].endswith("'")
    assert json.loads(params["resources"].strip("'")) == {MIG: 1}
    assert all(
        isinstance(v, str) for g in groups(objects).values() for v in g["rayStartParams"].values()
    )
    limits = ray_container(gpu)["resources"]["limits"]
    assert limits[f"nvidia.com/{MIG}"] == 1
    pod = gpu["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/mig.config": "all-1g.10gb"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (2, 28)
    # The head serves (proxy, controller) but runs no replicas and has no GPU.
    head = groups(objects)["head"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0"
    assert not any("gpu" in k or "mig" in k for k in ray_container(head)["resources"]["limits"])


def test_setting_num_replicas_replaces_autoscaling_and_back() -> None:
    fixed = serve_config(
        render({"serve": {"applications": {"asr": {"deployments": {"asr": {"num_replicas": 3}}}}}})[
            "objects"
        ]
    )
    asr = deployment(fixed, "asr", "asr")
    assert asr["num_replicas"] == 3 and "autoscaling_config" not in asr
    ServeDeploySchema.model_validate(fixed)
    scaled = serve_config(
        render(
            {
                "serve": {
                    "applications": {
                        "sessions": {
                            "deployments": {
                                "sessions": {
                                    "autoscaling_config": {"min_replicas": 2, "max_replicas": 4}
                                }
                            }
                        }
                    }
                }
            }
        )["objects"]
    )
    sessions = deployment(scaled, "sessions", "sessions")
    assert "num_replicas" not in sessions
    # Merged into the file's autoscaling_config: its target stays.
    assert sessions["autoscaling_config"] == {
        "min_replicas": 2,
        "max_replicas": 4,
        "target_ongoing_requests": 32,
    }
    ServeDeploySchema.model_validate(scaled)


def test_false_and_zero_overrides_are_applied() -> None:
    # sprig's mergeOverwrite skips empty values; the chart's merge must not.
    config = serve_config(
        render(
            {
                "serve": {
                    "applications": {
                        "render": {
                            "args": {"config": {"listening_motion_deg": 0, "device": "cpu"}},
                            "deployments": {"render": {"autoscaling_config": {"min_replicas": 0}}},
                        }
                    }
                }
            }
        )["objects"]
    )
    assert app(config, "render")["args"]["config"] == {"listening_motion_deg": 0, "device": "cpu"}
    assert deployment(config, "render", "render")["autoscaling_config"]["min_replicas"] == 0


def test_chart_handles_whatever_applications_the_file_holds(tmp_path: Path) -> None:
    chart = tmp_path / "parley"
    shutil.copytree(CHART, chart)
    file_config = yaml.safe_load(SERVE_FILE.read_text())
    echo = {
        "name": "echo",
        "import_path": "example.echo:build",
        "route_prefix": "/echo",
        "args": {"config": {"greeting": "hi"}},
        "deployments": [{"name": "Echo", "num_replicas": 2}],
    }
    file_config["applications"] = [
        a for a in file_config["applications"] if a["name"] != "sessions"
    ] + [echo]
    (chart / "files" / "serve-config.yaml").write_text(yaml.safe_dump(file_config))
    values = {"serve": {"applications": {"echo": {"args": {"config": {"greeting": "hello"}}}}}}
    result = render(values, chart)
    config = serve_config(result["objects"])
    ServeDeploySchema.model_validate(config)
    assert [a["name"] for a in config["applications"]] == [
        a["name"] for a in file_config["applications"]
    ]
    assert app(config, "echo")["args"] == {"config": {"greeting": "hello"}}
    # No sessions application: no Redis URL written into any application.
    assert "redis_url" not in json.dumps(config)
    rules = render({**values, "metrics": {"prometheusRule": {"enabled": True}}}, chart)
    rule_text = json.dumps(only(rules["objects"], "PrometheusRule"))
    assert 'application=\\"echo\\", deployment=\\"Echo\\"' in rule_text
    assert "echo" in result["notes"]


# --- bad values fail, with a message naming the value ---------------------------------


def app_override(app_name: str, **override: Any) -> Obj:
    return {"serve": {"applications": {app_name: override}}}


def dep_override(app_name: str, dep_name: str, **override: Any) -> Obj:
    return app_override(app_name, deployments={dep_name: override})


BAD_VALUES: list[tuple[str, Obj, list[str]]] = [
    (
        "negative min_replicas",
        dep_override("render", "render", autoscaling_config={"min_replicas": -1}),
        ["min_replicas", "minimum"],
    ),
    (
        "negative worker replicas",
        {"workerGroups": {"cpu": {"replicas": -2}}},
        ["/workerGroups/cpu/replicas", "minimum"],
    ),
    (
        "unknown application",
        app_override("rendr", args={"config": {}}),
        ["serve.applications.rendr", 'no application named "rendr"', "render"],
    ),
    (
        "unknown deployment",
        dep_override("render", "renderer", max_ongoing_requests=2),
        ["serve.applications.render.deployments.renderer", 'no deployment named "renderer"'],
    ),
    (
        "misspelt deployment field",
        dep_override("render", "render", max_replica=3),
        ["max_replica", "additional properties"],
    ),
    (
        "min above max",
        dep_override("asr", "asr", autoscaling_config={"min_replicas": 5, "max_replicas": 2}),
        ["serve.applications.asr.deployments.asr.autoscaling_config", "exceeds max_replicas"],
    ),
    (
        "undeclared MIG resource",
        dep_override("render", "render", ray_actor_options={"resources": {MIG: 1}}),
        ["ray_actor_options.resources", MIG, "which no Ray group declares"],
    ),
    (
        "GPU replicas without a GPU group",
        dep_override("render", "render", ray_actor_options={"num_gpus": 1}),
        ["serve.applications.render.deployments.render.ray_actor_options.num_gpus", "no enabled"],
    ),
    (
        "worker group min above max",
        {"workerGroups": {"cpu": {"minReplicas": 5, "maxReplicas": 2, "replicas": 5}}},
        ["workerGroups.cpu", "minReplicas (5) exceeds maxReplicas (2)"],
    ),
    ("bad service type", {"service": {"type": "Public"}}, ["/service/type"]),
    (
        "Redis URL with a password",
        {
            "redis": {
                "internal": {"enabled": False},
                "external": {"url": "redis://:s3cret@redis:6379/0"},
            }
        },
        ["redis.external.url holds a password", "existingSecret"],
    ),
    (
        "two Redis sources",
        {"redis": {"external": {"url": "redis://redis.example:6379/0"}}},
        ["exactly one source", "2 are set"],
    ),
    ("no Redis", {"redis": {"internal": {"enabled": False}}}, ["exactly one source", "0 are set"]),
    (
        "Redis URL of another scheme",
        {"redis": {"internal": {"enabled": False}, "external": {"url": "http://redis:6379"}}},
        ["/redis/external/url"],
    ),
    (
        "Redis URL set in the application args",
        app_override("sessions", args={"config": {"redis_url": "redis://elsewhere:6379/0"}}),
        ["serve.applications.sessions.args.config.redis_url", "redis.external.url"],
    ),
]


@pytest.mark.parametrize(
    ("values", "fragments"), [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES]
)
def test_bad_values_fail_with_a_clear_message(values: Obj, fragments: list[str]) -> None:
    message = render_error(values)
    for fragment in fragments:
        assert fragment in message, message


# --- Redis ----------------------------------------------------------------------------


def env_of(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container["env"]}


def test_in_chart_redis(default: dict[str, Any]) -> None:
    objects = default["objects"]
    url = f"redis://{RELEASE}-redis:6379/0"
    assert only(objects, "Secret", f"{RELEASE}-redis")["stringData"] == {"url": url}
    assert only(objects, "Service", f"{RELEASE}-redis")["spec"]["ports"][0]["port"] == 6379
    redis_pod = only(objects, "Deployment", f"{RELEASE}-redis")["spec"]["template"]["spec"]
    assert "--appendonly" in redis_pod["containers"][0]["args"]
    assert redis_pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == f"{RELEASE}-redis"
    only(objects, "PersistentVolumeClaim", f"{RELEASE}-redis")
    policy = only(objects, "NetworkPolicy", f"{RELEASE}-redis")["spec"]
    ray_labels = groups(objects)["head"]["template"]["metadata"]["labels"]
    allowed = policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed.items() <= ray_labels.items()
    assert app(serve_config(objects), "sessions")["args"]["config"]["redis_url"] == url
    for group in groups(objects).values():
        ref = env_of(ray_container(group))["PARLEY_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": f"{RELEASE}-redis", "key": "url"}
    # No secret in a ConfigMap.
    assert all("redis://" not in json.dumps(o) for o in objects if o["kind"] == "ConfigMap")


def test_external_redis_from_an_existing_secret(production: dict[str, Any]) -> None:
    objects = production["objects"]
    assert not [o for o in objects if "redis" in o["metadata"]["name"]]
    for group in groups(objects).values():
        ref = env_of(ray_container(group))["PARLEY_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "parley-redis-url", "key": "url"}
    # The chart cannot read the Secret: the gateway takes it from $PARLEY_REDIS_URL, and
    # no local default from the file survives.
    assert app(serve_config(objects), "sessions")["args"]["config"]["redis_url"] == ""


def test_external_redis_url_and_prefix() -> None:
    url = "rediss://redis.example.com:6380/2"
    objects = render(
        {"redis": {"internal": {"enabled": False}, "external": {"url": url}, "prefix": "tenant-a:"}}
    )["objects"]
    assert kinds([o for o in objects if "redis" in o["metadata"]["name"]]) == ["Secret"]
    config = app(serve_config(objects), "sessions")["args"]["config"]
    assert (config["redis_url"], config["key_prefix"]) == (url, "tenant-a:")
    head_env = env_of(ray_container(groups(objects)["head"]))
    assert head_env["PARLEY_REDIS_PREFIX"]["value"] == "tenant-a:"


def test_every_ray_container_caps_grpc_messages_like_parley(default: dict[str, Any]) -> None:
    # Serve's gRPC proxy would take 2 GiB messages; Parley's servers take MAX_MESSAGE_BYTES.
    for name, group in groups(default["objects"]).items():
        env = env_of(ray_container(group))
        assert env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]["value"] == str(rpc.MAX_MESSAGE_BYTES), name


# --- pods -----------------------------------------------------------------------------


def test_ray_pods_are_locked_down_and_keep_kuberays_probes(default: dict[str, Any]) -> None:
    for name, group in groups(default["objects"]).items():
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        container = ray_container(group)
        context = container["securityContext"]
        assert (
            context["readOnlyRootFilesystem"] is True
            and context["allowPrivilegeEscalation"] is False
        )
        assert context["capabilities"]["drop"] == ["ALL"]
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
        # KubeRay injects its own probes (with the Serve proxy check on workers).
        assert "readinessProbe" not in container and "livenessProbe" not in container


def test_head_only_proxies_give_workers_a_probe_without_the_proxy_check() -> None:
    objects = render({"serve": {"proxyLocation": "HeadOnly"}})["objects"]
    assert serve_config(objects)["proxy_location"] == "HeadOnly"
    probe = ray_container(groups(objects)["cpu"])["readinessProbe"]
    assert probe["httpGet"] == {"path": "/api/healthz", "port": 52365}
    assert "readinessProbe" not in ray_container(groups(objects)["head"])


def test_service_and_ingresses(production: dict[str, Any]) -> None:
    objects = production["objects"]
    service = only(objects, "RayService")["spec"]["serveService"]
    assert service["metadata"]["name"] == f"{RELEASE}-serve"
    assert service["spec"]["type"] == "LoadBalancer"
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["serve"]["port"] == 8000
    assert (ports["serve-grpc"]["port"], ports["serve-grpc"]["appProtocol"]) == (
        9000,
        "kubernetes.io/h2c",
    )
    ingress = only(objects, "Ingress")["spec"]
    backend = ingress["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{RELEASE}-serve", "port": {"name": "serve"}}
    grpc = render({"grpcIngress": {"enabled": True}})["objects"]
    backend = only(grpc, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert backend["service"]["port"] == {"name": "serve-grpc"}


# --- schemas of Kubernetes, KubeRay and prometheus-operator ---------------------------


def check_kubernetes(obj: Obj) -> None:
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def all_features() -> Obj:
    values = production_values()
    values["grpcIngress"] = {"enabled": True}
    return values


@pytest.mark.parametrize("values", [None, "production"], ids=["default", "production"])
def test_objects_match_kubernetes_schemas(values: str | None) -> None:
    objects = render(all_features() if values else None)["objects"]
    seen = set()
    for obj in objects:
        seen.add(obj["kind"])
        if obj["kind"] == "RayService":
            for name, group in groups([obj]).items():
                template = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": name},
                    "template": group["template"],
                }
                check_kubernetes(template)
            check_kubernetes({"apiVersion": "v1", "kind": "Service", **obj["spec"]["serveService"]})
        elif obj["kind"] == "PodMonitor":
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            assert obj["spec"]["podMetricsEndpoints"] and obj["spec"]["selector"]
        elif obj["kind"] == "PrometheusRule":
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            for group in obj["spec"]["groups"]:
                for rule in group["rules"]:
                    assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
                    assert rule["alert"] and rule["expr"] and rule["labels"]["severity"]
        else:
            check_kubernetes(obj)
    expected = {"RayService", "ConfigMap", "Pod"}
    expected |= {"PodMonitor", "PrometheusRule", "Ingress"} if values else {"Deployment", "Secret"}
    assert expected <= seen


def test_the_schema_checks_can_fail(default: dict[str, Any]) -> None:
    deployment = copy.deepcopy(only(default["objects"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        check_kubernetes(deployment)


# --- metrics: dashboards and alerts use real metric names and labels -----------------

TARGET_LABELS = {"namespace", "pod", "container", "instance", "job", "endpoint"}
SERVE_DEFAULT_TAGS = {"deployment", "replica", "application"}
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile",
    "by", "without", "on", "ignoring", "and", "or", "unless", "vector", "absent", "le",
    "group_left", "group_right", "bool", "offset", "label_values", "humanizeDuration",
}  # fmt: skip


@cache
def parley_metrics() -> dict[str, set[str]]:
    """Exported sample name -> labels of libs/parley/metrics.py, as Ray's agent exports
    them (ray_ prefix)."""
    names: dict[str, set[str]] = {}
    for metric in metrics.all_metrics():
        names |= metric.exported_samples()
    return names


@cache
def ray_serve_metrics() -> dict[str, set[str]]:
    """Exported name -> labels of the metrics Ray Serve defines (ray_ prefix; counters end
    in _total, histograms in _bucket/_sum/_count), read from the installed ray package."""
    found: dict[str, set[str]] = {}
    definition = re.compile(
        r'(?P<module>\w+)\.(?P<kind>Counter|Gauge|Histogram)\(\s*(?:name=)?f?"(?P<name>serve_[a-z_{}]+)"'
    )
    for source in (Path(ray.__file__).parent / "serve").rglob("*.py"):
        text = source.read_text()
        serve_metrics = "from ray.serve import metrics" in text
        matches = list(definition.finditer(text))
        for match, following in zip(matches, [*matches[1:], None][: len(matches)], strict=True):
            end = (
                match.end() + 1000
                if following is None
                else min(following.start(), match.end() + 1000)
            )
            window = text[match.end() : end]
            labels = set(re.findall(r'"([a-z_]+)"', window))
            if serve_metrics and match["module"] == "metrics":
                labels |= SERVE_DEFAULT_TAGS
            for protocol in ("http", "grpc"):
                name = "ray_" + match["name"].replace("{protocol_name}", protocol)
                suffixes = {
                    "Counter": ["_total"],
                    "Gauge": [""],
                    "Histogram": ["_bucket", "_sum", "_count"],
                }
                for suffix in suffixes[match["kind"]]:
                    found.setdefault(name + suffix, set()).update(
                        labels | ({"le"} if suffix == "_bucket" else set())
                    )
    return found


def promql_problems(expr: str, known: dict[str, set[str]]) -> list[str]:
    """Unknown metric names, and labels that none of the expression's metrics carry."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and strings
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # range selectors
    problems = []
    used = []
    for name in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b", bare):
        if name in PROMQL_WORDS or not re.match(r"(parley|ray)_", name):
            continue
        if name not in known:
            problems.append(f"unknown metric {name}")
        else:
            used.append(name)
    if not used and not problems:
        problems.append("no metric")
    labels_of = {n: known[n] | TARGET_LABELS for n in used}
    for name, selector in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", bare):
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", selector):
            if name in labels_of and label not in labels_of[name]:
                problems.append(f"{name} has no label {label}")
    everything = set().union(*labels_of.values()) if labels_of else set()
    for clause in re.findall(r"\bby\s*\(([^)]*)\)", bare):
        for label in filter(None, (x.strip() for x in clause.split(","))):
            if label not in everything:
                problems.append(f"no metric of the expression has label {label}")
    return problems


def known_metrics() -> dict[str, set[str]]:
    return {**parley_metrics(), **ray_serve_metrics()}


def test_the_promql_check_can_fail() -> None:
    known = known_metrics()
    assert (
        promql_problems(
            'sum(rate(ray_parley_turn_latency_seconds_count{milestone="x"}[5m]))', known
        )
        == []
    )
    assert promql_problems("rate(ray_parley_turn_latency_count[5m])", known) == [
        "unknown metric ray_parley_turn_latency_count"
    ]
    # The bare names are the in-process registry's, not what Prometheus sees.
    assert promql_problems("rate(parley_turn_latency_seconds_count[5m])", known) == [
        "unknown metric parley_turn_latency_seconds_count"
    ]
    assert promql_problems('rate(ray_parley_turn_latency_seconds_count{stage="x"}[5m])', known) == [
        "ray_parley_turn_latency_seconds_count has no label stage"
    ]
    assert promql_problems("sum by (route) (ray_serve_deployment_replica_healthy)", known) == [
        "no metric of the expression has label route"
    ]
    assert "ray_serve_num_grpc_requests_total" in known
    assert {"application", "deployment"} <= known["ray_serve_deployment_error_counter_total"]


def dashboards() -> dict[str, Obj]:
    return {
        p.name: json.loads(p.read_text()) for p in sorted((CHART / "dashboards").glob("*.json"))
    }


def panel_exprs(dashboard: Obj) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def test_dashboards_are_valid_json_with_real_metrics(default: dict[str, Any]) -> None:
    found = dashboards()
    assert found, "no dashboard in dashboards/"
    known = known_metrics()
    used: set[str] = set()
    for name, dashboard in found.items():
        assert dashboard["uid"] and dashboard["title"]
        for title, expr in panel_exprs(dashboard):
            assert promql_problems(expr, known) == [], f"{name}: {title}: {expr}"
            assert 'namespace=~"$namespace"' in expr, f"{name}: {title}"
            used |= set(re.findall(r"\b(ray_[a-z_]+)", expr))
        # The ConfigMap carries the same JSON, with the Grafana sidecar's label.
        configmap = next(
            o for o in default["objects"] if o["kind"] == "ConfigMap" and name in o["data"]
        )
        assert json.loads(configmap["data"][name]) == dashboard
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    # What an operator looks for: u2u latency, stages, turns, barge-ins, speculation,
    # replicas, errors.
    assert {
        "ray_parley_turn_latency_seconds_bucket",
        "ray_parley_turn_latency_seconds_count",
        "ray_parley_stage_latency_seconds_bucket",
        "ray_parley_interruptions_total",
        "ray_parley_speculations_total",
        "ray_serve_deployment_replica_healthy",
        "ray_serve_deployment_error_counter_total",
    } <= used


def rules(objects: list[Obj]) -> list[Obj]:
    spec = only(objects, "PrometheusRule")["spec"]
    return [rule for group in spec["groups"] for rule in group["rules"]]


def test_alerts_use_real_metrics_and_the_serve_config_limits(production: dict[str, Any]) -> None:
    known = known_metrics()
    alerts = rules(production["objects"])
    for rule in alerts:
        assert promql_problems(rule["expr"], known) == [], f"{rule['alert']}: {rule['expr']}"
        assert f'namespace="{NAMESPACE}"' in rule["expr"]
        assert rule["labels"]["severity"] in ("warning", "critical")
    names = {rule["alert"] for rule in alerts}
    assert {
        "ParleyU2ULatencyP50OverBudget",
        "ParleyU2ULatencyP95OverBudget",
        "ParleyStageLatencyP95OverBudget",
        "ParleyStageErrorRatioHigh",
        "ParleyDeploymentSaturated",
        "ParleyReplicasBelowMinimum",
    } <= names

    def rule_for(alert: str, deployment_name: str) -> Obj:
        return next(
            r
            for r in alerts
            if r["alert"] == alert and r["labels"].get("deployment") == deployment_name
        )

    # Thresholds come from the merged Serve config (values-production.yaml for render).
    assert rule_for("ParleyDeploymentSaturated", "render")["expr"].strip().endswith("> 28")
    assert rule_for("ParleyReplicasBelowMinimum", "render")["expr"].strip().endswith("< 2")
    u2u = next(r for r in alerts if r["alert"] == "ParleyU2ULatencyP95OverBudget")["expr"]
    assert 'milestone="first_output"' in u2u and "> 1.2" in u2u
    # Every alert has a runbook entry in docs/operations.md.
    operations = (ROOT / "docs" / "operations.md").read_text()
    for name in names:
        assert f"`{name}`" in operations, name


@cache
def recorded_label_values() -> dict[str, set[tuple[str, ...]]]:
    """Metric name -> label value tuples the code records with literals, e.g.
    parley_stage_latency_seconds -> {("asr", "decode"), ...}; milestones from the trace."""
    names = {
        var: collector.name
        for var, collector in vars(metrics).items()
        if isinstance(collector, metrics.Metric)
    }
    found: dict[str, set[tuple[str, ...]]] = {}
    for folder in (ROOT / "libs" / "parley", ROOT / "services"):
        for source in folder.rglob("*.py"):
            for var, args in re.findall(
                r"metrics\.([A-Z_]+)\.labels\(([^)]*)\)", source.read_text()
            ):
                literals = tuple(re.findall(r'"([^"]*)"', args))
                if literals and var in names:
                    found.setdefault(names[var], set()).add(literals)
    found[names["TURN_LATENCY"]] = {(m,) for m in MILESTONES}
    return found


def test_alert_and_dashboard_label_values_are_recorded(production: dict[str, Any]) -> None:
    recorded = recorded_label_values()
    assert ("llm", "ttfb") in recorded["parley_stage_latency_seconds"]
    exprs = [r["expr"] for r in rules(production["objects"])]
    exprs += [e for d in dashboards().values() for _, e in panel_exprs(d)]
    checked = 0
    for expr in exprs:
        for name, selector in re.findall(
            r"\bray_(parley_[a-z_]+?)(?:_bucket|_count|_sum)?\{([^}]*)\}", expr
        ):
            matchers = dict(re.findall(r'(\w+)="([^"$]*)"', selector))
            matchers.pop("namespace", None)
            if not matchers:
                continue
            labels = metrics_labels(name)
            wanted = tuple(matchers.get(label) for label in labels)
            options = recorded[name]
            assert any(
                all(w is None or w == value for w, value in zip(wanted, values, strict=True))
                for values in options
            ), f"{name}{{{selector}}}: the code records only {sorted(options)}"
            checked += 1
    assert checked >= 5


def metrics_labels(name: str) -> tuple[str, ...]:
    for collector in metrics.all_metrics():
        if collector.name == name:
            return tuple(collector.labelnames)
    raise AssertionError(f"no collector named {name}")


def test_metrics_objects_are_off_by_default(default: dict[str, Any]) -> None:
    assert not {"PodMonitor", "PrometheusRule"} & set(kinds(default["objects"]))


# --- NOTES.txt -----------------------------------------------------------------------


def parser_for(register: Callable[[Any], Any]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_notes_commands_parse_with_the_real_cli(default: dict[str, Any]) -> None:
    notes = default["notes"]
    lines = [line.strip() for line in notes.splitlines()]
    keys = [line.split(" -- ", 1)[1] for line in lines if " -- parley keys " in line]
    assert any(k.startswith("parley keys create ") for k in keys)
    keys_parser = parser_for(keys_cli.register)
    for command in keys:
        keys_parser.parse_args(shlex.split(command)[1:])
    (talk,) = [line for line in lines if line.startswith("parley talk ")]
    talk_parser = argparse.ArgumentParser()
    talk_cli.add_arguments(talk_parser)
    args = talk_parser.parse_args(shlex.split(talk)[2:])
    assert (args.target, args.application) == ("localhost:9000", "sessions")
    assert f"port-forward svc/{RELEASE}-serve 9000:9000 8000:8000" in notes
