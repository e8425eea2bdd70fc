"""The Kubernetes manifests of deploy/k8s, checked offline: no cluster, kubectl or kustomize exists where these tests
run. Each way of applying them is rendered by a small renderer of the kustomize features they use (resources,
components, JSON 6902 patches, namespace, images), every core-kind document is validated against Kubernetes' own
OpenAPI schemas (kubernetes-validate, strict: an unknown field fails), the KEDA ScaledObject against our schema in
deploy/k8s/schemas, and the files are checked against each other and against the real CLI parser. What only a cluster
can show (that pods schedule, load their engines and serve) is out of reach here."""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from diffuserve.server.cli import build_parser
from diffuserve.server.settings import SettingsError, check_ranges, convert, env_name, settable, with_settings
from diffuserve.v1 import diffusion_pb2

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DEPLOY_README = ROOT / "deploy" / "README.md"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile.tensorrt"
SCALEDOBJECT_SCHEMA = K8S / "schemas" / "scaledobject.schema.json"

# The ways to apply deploy/k8s: a kustomization directory plus the components added to it (as a user adds them to its
# `components:`), relative to that directory.
VARIANTS = {
    "hpa": (K8S, ()),
    "keda": (K8S / "keda", ()),
    "hpa+tls": (K8S, ("components/tls",)),
    "hpa+mtls": (K8S, ("components/tls", "components/mtls")),
}
TLS_VARIANTS = ("hpa+tls", "hpa+mtls")
# Applied by hand, listed by no kustomization: Secret templates (apply -k must never overwrite real Secrets) and the
# one-off plan build.
STANDALONE = ("secrets.example.yaml", "jobs/build-engines.yaml")
# The oldest Kubernetes the manifests are for (the preStop `sleep` action is on by default from 1.30) and the newest
# that kubernetes-validate 1.37 bundles: a field removed or renamed in between fails one of them.
K8S_VERSIONS = ("1.30", "1.37")
# What the autoscalers scale on: the server's Prometheus metrics (metrics.py's names), one place for the tests.
QUEUE_DEPTH = "diffuserve_queue_depth"
REQUESTS_IN_FLIGHT = "diffuserve_requests_in_flight"
AUTOSCALING_METRICS = (QUEUE_DEPTH, REQUESTS_IN_FLIGHT)
# Options whose value is a file holding a secret: it must come from a mounted Secret.
SECRET_FILE_OPTIONS = ("--auth-token-file", "--tls-cert", "--tls-key", "--tls-client-ca")
# Options the manifests pass that other changes are adding to the CLI now: parsing drops them (and their value) while
# the parser lacks them, and test_pending_option says which are still missing.
PENDING_OPTIONS = ("--metrics-port", "--tls-cert", "--tls-key", "--tls-client-ca", "--auth-token-file", "--log-format")
GRPC_PORT = 50051
METRICS_PORT = 9090
# Beyond preStop + --grace before SIGKILL: responses flushing, the worker and CUDA context teardown, process exit.
MIN_DRAIN_MARGIN_S = 10
# A startup probe that gives up sooner would restart pods still reading their plans from the volume.
MIN_STARTUP_BUDGET_S = 300
READINESS_SERVICE = diffusion_pb2.DESCRIPTOR.services_by_name["DiffusionService"].full_name


# --- Loading and rendering -------------------------------------------------------------------------------------------


def load_yaml(path: Path) -> list[dict]:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert all(isinstance(d, dict) for d in documents), f"{path}: every document is a mapping"
    return documents


def kustomization(directory: Path) -> dict:
    (found,) = load_yaml(directory / "kustomization.yaml")
    return found


def unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_operation(document: dict, operation: dict) -> None:
    """One JSON 6902 operation of the kinds the components use: add (`-` appends to a list), remove, replace."""
    op, path = operation["op"], operation["path"]
    *parents, last = (unescape(t) for t in path.split("/")[1:])
    parent = document
    for token in parents:
        parent = parent[int(token)] if isinstance(parent, list) else parent[token]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        assert op == "add" or index < len(parent), f"{path}: no such element"
    else:
        index = last
        assert op == "add" or index in parent, f"{path}: no such field to {op}"
    if op == "add" and isinstance(parent, list):
        parent.insert(index, copy.deepcopy(operation["value"]))
    elif op in ("add", "replace"):
        parent[index] = copy.deepcopy(operation["value"])
    elif op == "remove":
        del parent[index]
    else:
        raise AssertionError(f"{path}: JSON 6902 op {op!r} is not one this renderer implements")


def group_version(document: dict) -> tuple[str, str]:
    group, _, version = document["apiVersion"].rpartition("/")
    return group, version


def apply_patches(documents: list[dict], patches: list[dict], directory: Path) -> None:
    for patch in patches:
        assert set(patch) == {"path", "target"}, f"{directory}: only JSON 6902 patch files with a target are rendered"
        operations = yaml.safe_load((directory / patch["path"]).read_text())
        assert isinstance(operations, list), f"{patch['path']}: a list of JSON 6902 operations"
        target = patch["target"]
        matched = [
            d
            for d in documents
            if group_version(d) == (target.get("group", ""), target["version"])
            and d["kind"] == target["kind"]
            and d["metadata"].get("name") == target["name"]
        ]
        assert matched, f"{directory / patch['path']}: its target {target} matches no resource"
        for document in matched:
            for operation in operations:
                apply_operation(document, operation)


def pod_specs(document: dict) -> list[dict]:
    return [document["spec"]["template"]["spec"]] if document["kind"] in ("Deployment", "Job") else []


def set_images(documents: list[dict], images: list[dict]) -> None:
    for image in images:
        assert set(image) <= {"name", "newName", "newTag"}, f"images: {image}"
        for spec in (s for d in documents for s in pod_specs(d)):
            for container in spec["containers"]:
                name = re.split(r"[:@]", container["image"], maxsplit=1)[0]
                if name == image["name"]:
                    tag = image.get("newTag", container["image"][len(name) + 1 :])
                    container["image"] = f"{image.get('newName', name)}:{tag}"


def render(directory: Path, components: tuple[str, ...] = ()) -> list[dict]:
    """What `kustomize build directory` gives, for the features deploy/k8s uses; anything else fails here."""
    found = kustomization(directory)
    known = {"apiVersion", "kind", "namespace", "resources", "components", "patches", "images"}
    assert found["kind"] == "Kustomization" and set(found) <= known, f"{directory}: {sorted(set(found) - known)}"
    documents: list[dict] = []
    for entry in found.get("resources", []):
        path = directory / entry
        documents += render(path) if path.is_dir() else load_yaml(path)
    for entry in (*found.get("components", []), *components):
        component = kustomization(directory / entry)
        assert component["kind"] == "Component" and set(component) <= {"apiVersion", "kind", "patches"}
        apply_patches(documents, component.get("patches", []), directory / entry)
    apply_patches(documents, found.get("patches", []), directory)
    if "namespace" in found:
        for document in documents:
            if document["kind"] != "Namespace":
                document["metadata"]["namespace"] = found["namespace"]
    set_images(documents, found.get("images", []))
    return documents


@functools.cache
def _rendered(variant: str) -> str:
    return json.dumps(render(*VARIANTS[variant]))


def rendered(variant: str) -> list[dict]:
    """A fresh copy of a variant's documents (tests may change theirs)."""
    return json.loads(_rendered(variant))


def standalone() -> list[dict]:
    return [d for name in STANDALONE for d in load_yaml(K8S / name)]


def every_document() -> list[dict]:
    """Each distinct document of every variant and of the standalone files."""
    unique = {json.dumps(d, sort_keys=True): d for v in VARIANTS for d in rendered(v)}
    unique.update({json.dumps(d, sort_keys=True): d for d in standalone()})
    return list(unique.values())


def one(documents: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in documents if d["kind"] == kind and name in (None, d["metadata"].get("name"))]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server_container(documents: list[dict]) -> dict:
    (container,) = one(documents, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def is_custom(document: dict) -> bool:
    return group_version(document)[0] == "keda.sh"


# --- The CLI ---------------------------------------------------------------------------------------------------------


def subparser(name: str) -> argparse.ArgumentParser:
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def options_of(name: str) -> set[str]:
    """The options `diffuserve NAME` takes: its own and those of `diffuserve` itself (written before NAME)."""
    parsers = (build_parser(), subparser(name))
    return {o for parser in parsers for action in parser._actions for o in action.option_strings}


def pod_environment(documents: list[dict]) -> dict[str, str]:
    """The server container's environment: its ConfigMaps (envFrom), then its literal env values, which win."""
    container = server_container(documents)
    environment = {}
    for source in container.get("envFrom", []):
        environment.update(one(documents, "ConfigMap", source["configMapRef"]["name"])["data"])
    environment.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return environment


def option_values(argv: list[str]) -> dict[str, str]:
    """--name value and --name=value pairs (every option the manifests pass takes one value)."""
    found = {}
    for i, word in enumerate(argv):
        if word.startswith("--"):
            name, equals, value = word.partition("=")
            found[name] = value if equals else argv[i + 1]
    return found


def without_pending(argv: list[str], known: set[str]) -> list[str]:
    """argv less the pending options the parser does not have yet, with their values; every other option stays, so an
    unknown one still fails the parse."""
    kept, skip = [], False
    for word in argv:
        name, equals, _ = word.partition("=")
        if skip:
            skip = False
        elif name in PENDING_OPTIONS and name not in known:
            skip = not equals
        else:
            kept.append(word)
    return kept


def parse(argv: list[str]) -> argparse.Namespace:
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"the CLI refuses {argv}: {errors.getvalue().strip()}")


def served_settings(documents: list[dict]) -> argparse.Namespace:
    """`serve`'s settings as the server makes them in the pod (diffuserve.server.cli.main): its argv (less the
    options the CLI does not have yet) over DIFFUSERVE_* variables of the pod's environment."""
    argv = without_pending(server_container(documents)["args"], options_of("serve"))
    assert parse(argv).command == "serve"
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = with_settings(subparser("serve"), argv[argv.index("serve") + 1 :], pod_environment(documents))
        check_ranges(args)
    except (SystemExit, SettingsError) as error:
        pytest.fail(f"serve refuses {argv} in the pod's environment: {errors.getvalue().strip() or error}")
    return args


# --- Every file in its place -----------------------------------------------------------------------------------------


def referenced_files(directory: Path) -> Iterator[Path]:
    found = kustomization(directory)
    yield directory / "kustomization.yaml"
    for entry in (*found.get("resources", []), *found.get("components", [])):
        path = directory / entry
        yield from referenced_files(path) if path.is_dir() else [path]
    yield from (directory / p["path"] for p in found.get("patches", []))


def test_every_manifest_is_rendered_or_applied_by_hand() -> None:
    used = {p.resolve() for path in (K8S, K8S / "keda") for p in referenced_files(path)}
    used |= {p.resolve() for c in ("components/tls", "components/mtls") for p in referenced_files(K8S / c)}
    used |= {(K8S / name).resolve() for name in STANDALONE}
    present = {p.resolve() for p in K8S.rglob("*.yaml")}
    assert present - used == set(), "a manifest nothing applies"
    assert used - present == set(), "a kustomization lists a missing file"


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_renders(variant: str) -> None:
    kinds = sorted(d["kind"] for d in rendered(variant))
    autoscaler = "ScaledObject" if variant == "keda" else "HorizontalPodAutoscaler"
    expected = ["ConfigMap", "Deployment", "Namespace", "PersistentVolumeClaim", "PodDisruptionBudget", "Service"]
    assert kinds == sorted([*expected, "Service", autoscaler])


# --- Schemas: Kubernetes' own for core kinds, ours for KEDA ----------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_kinds_validate_against_kubernetes_schemas(version: str) -> None:
    documents = [d for d in every_document() if not is_custom(d)]
    kinds = {d["kind"] for d in documents}
    core = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap", "Secret"}
    assert core | {"PersistentVolumeClaim", "Namespace", "Job"} <= kinds
    for document in documents:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{document['kind']} {document['metadata']}: {where}: {e.message} (Kubernetes {version})")


@pytest.mark.parametrize(
    "breakage",
    ["probe port by name", "misspelt field", "grace as a string"],
)
def test_kubernetes_schemas_catch_a_broken_deployment(breakage: str) -> None:
    deployment = one(rendered("hpa"), "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    if breakage == "probe port by name":
        spec["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"  # gRPC probes take numbers only
    elif breakage == "misspelt field":
        spec["terminationGracePeriod"] = spec.pop("terminationGracePeriodSeconds")
    else:
        spec["terminationGracePeriodSeconds"] = "90"
    for version in K8S_VERSIONS:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(deployment, version, strict=True)


def test_kubernetes_validate_has_no_schema_for_keda() -> None:
    """Why the ScaledObject has a schema of our own: kubernetes-validate only warns about custom resources."""
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(one(rendered("keda"), "ScaledObject"), K8S_VERSIONS[-1], strict=True)


@functools.cache
def scaledobject_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCALEDOBJECT_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_scaledobject_validates_against_our_schema() -> None:
    scaled = one(rendered("keda"), "ScaledObject")
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in scaledobject_validator().iter_errors(scaled)]
    assert errors == []
    spec = scaled["spec"]
    assert 1 <= spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]


def _numeric_threshold(spec: dict) -> None:
    spec["triggers"][0]["metadata"]["threshold"] = 2  # KEDA's metadata is map[string]string


def _no_query(spec: dict) -> None:
    del spec["triggers"][0]["metadata"]["query"]


def _misspelt_field(spec: dict) -> None:
    spec["minReplicas"] = spec.pop("minReplicaCount")  # the HPA's name, which KEDA would drop silently


def _other_scaler(spec: dict) -> None:
    spec["triggers"][1]["type"] = "prometheus-adapter"


def _address_without_scheme(spec: dict) -> None:
    spec["triggers"][0]["metadata"]["serverAddress"] = "prometheus-operated.monitoring.svc:9090"


def _no_triggers(spec: dict) -> None:
    spec["triggers"] = []


@pytest.mark.parametrize(
    "breakage",
    [_numeric_threshold, _no_query, _misspelt_field, _other_scaler, _address_without_scheme, _no_triggers],
    ids=lambda f: f.__name__.strip("_"),
)
def test_our_scaledobject_schema_fails_broken_documents(breakage) -> None:
    scaled = one(rendered("keda"), "ScaledObject")
    breakage(scaled["spec"])
    with pytest.raises(jsonschema.ValidationError):
        scaledobject_validator().validate(scaled)


# --- The autoscalers -------------------------------------------------------------------------------------------------


def hpa_targets(hpa: dict) -> dict[str, str]:
    targets = {}
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
        targets[metric["pods"]["metric"]["name"]] = str(metric["pods"]["target"]["averageValue"])
    return targets


def keda_targets(scaled: dict, namespace: str) -> dict[str, str]:
    targets = {}
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["metricType"] == "AverageValue", "a per-pod threshold, as the HPA's averageValue"
        query = trigger["metadata"]["query"]
        match = re.fullmatch(r'sum\((diffuserve_\w+)\{namespace="([-a-z0-9]+)"\}\)', query)
        assert match, f"query {query!r}: sum(METRIC{{namespace=...}}) over the pods"
        assert match.group(2) == namespace, f"query {query!r}: kustomize does not rewrite the namespace in queries"
        targets[match.group(1)] = trigger["metadata"]["threshold"]
    return targets


def test_hpa_and_keda_scale_alike_on_the_same_metrics() -> None:
    hpa = one(rendered("hpa"), "HorizontalPodAutoscaler")
    scaled = one(rendered("keda"), "ScaledObject")
    namespace = kustomization(K8S)["namespace"]
    assert hpa_targets(hpa) == keda_targets(scaled, namespace)
    assert set(hpa_targets(hpa)) == set(AUTOSCALING_METRICS)
    assert hpa["spec"]["scaleTargetRef"] == scaled["spec"]["scaleTargetRef"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(rendered("hpa"), "Deployment")["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
        scaled["spec"]["minReplicaCount"],
        scaled["spec"]["maxReplicaCount"],
    )
    assert hpa["spec"]["behavior"] == scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]


def test_metric_names_come_from_one_place() -> None:
    for path in (K8S / "hpa.yaml", K8S / "keda" / "scaledobject.yaml"):
        used = set(re.findall(r"\bdiffuserve_[a-z_]+\b", path.read_text()))
        assert used == set(AUTOSCALING_METRICS), f"{path.name}: metrics {sorted(used)}"


def test_the_server_exports_the_autoscaling_metrics() -> None:
    if "--metrics-port" not in options_of("serve"):
        pytest.skip("the server has no metrics yet (serve --metrics-port is being added): checked once it has")
    source = "\n".join(p.read_text() for p in (ROOT / "server").rglob("*.py"))
    missing = [name for name in AUTOSCALING_METRICS if name not in source]
    assert missing == [], f"the autoscalers scale on {missing}, which server/ does not name: rename one side"


def test_disruption_budget_leaves_pods_serving() -> None:
    documents = rendered("hpa")
    budget = one(documents, "PodDisruptionBudget")["spec"]
    assert budget["selector"]["matchLabels"] == one(documents, "Deployment")["spec"]["selector"]["matchLabels"]
    assert one(documents, "HorizontalPodAutoscaler")["spec"]["minReplicas"] - budget["maxUnavailable"] >= 1
    assert "replicas" not in one(documents, "Deployment")["spec"], "the autoscaler owns the replica count"


# --- Ports, probes and draining --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_ports_match_across_deployment_services_probes_and_args(variant: str) -> None:
    documents = rendered(variant)
    deployment = one(documents, "Deployment")
    container = server_container(documents)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    options = option_values(container["args"])
    assert int(options["--port"]) == ports["grpc"]
    assert int(options["--metrics-port"]) == ports["metrics"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = [d for d in documents if d["kind"] == "Service"]
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: targets a port by a name it has"
            assert (port["name"], port["port"]) == (port["targetPort"], ports[port["targetPort"]])
            assert port["appProtocol"] == ("grpc" if port["name"] == "grpc" else "http")
    headless = one(documents, "Service", "diffuserve-headless")["spec"]
    assert headless["clusterIP"] == "None" and not headless.get("publishNotReadyAddresses", False)
    assert [p["name"] for p in headless["ports"]] == ["grpc"]
    assert one(documents, "Service", "diffuserve")["spec"]["type"] == "ClusterIP"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        if variant in TLS_VARIANTS:  # the kubelet's gRPC probe cannot speak TLS
            assert "grpc" not in probe and probe["tcpSocket"] == {"port": "grpc"}
        else:
            assert probe["grpc"]["port"] == ports["grpc"]


def test_grpc_probes_ask_the_right_health_services() -> None:
    base, tls = server_container(rendered("hpa")), server_container(rendered("hpa+tls"))
    assert base["readinessProbe"]["grpc"]["service"] == READINESS_SERVICE
    assert base["livenessProbe"]["grpc"]["service"] == ""
    assert base["startupProbe"]["grpc"]["service"] == ""
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        timing = {k: v for k, v in base[kind].items() if k != "grpc"}
        assert timing == {k: v for k, v in tls[kind].items() if k != "tcpSocket"}, f"{kind}: TLS changes the action"
    startup = base["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= MIN_STARTUP_BUDGET_S
    for probe in (base[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")):
        assert probe["timeoutSeconds"] < probe["periodSeconds"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_termination_grace_covers_prestop_and_drain(variant: str) -> None:
    documents = rendered(variant)
    spec = one(documents, "Deployment")["spec"]["template"]["spec"]
    container = server_container(documents)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert "--grace" in container["args"], "set on argv, beside the period it must fit in"
    grace = served_settings(documents).grace
    assert pre_stop > 0, "a pause for endpoint removal to reach kube-proxy, proxies and DNS before SIGTERM"
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + grace + MIN_DRAIN_MARGIN_S


# --- The container's argv and the real CLI ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_args_parse_with_the_real_cli(variant: str) -> None:
    documents = rendered(variant)
    container = server_container(documents)
    assert container["command"] == ["diffuserve"]
    args = served_settings(documents)
    assert args.port == GRPC_PORT
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert [str(Path(m).parent) for m in args.models] == ["/models"] and mounts["/models"]["readOnly"]
    assert not args.build_missing, "the model volume is read-only: plans come from jobs/build-engines.yaml"


def test_every_configmap_setting_reaches_the_server() -> None:
    """Each key is a `serve` setting's variable, not also a flag on argv (which would win, leaving it dead), and the
    server ends up with its value."""
    documents = rendered("hpa")
    data = one(documents, "ConfigMap")["data"]
    actions = {env_name(dest): action for dest, action in settable(subparser("serve")).items()}
    assert set(data) <= set(actions), f"not settings of serve: {sorted(set(data) - set(actions))}"
    on_argv = set(option_values(server_container(documents)["args"]))
    assert not [key for key in data if set(actions[key].option_strings) & on_argv], "set twice: argv wins"
    args = served_settings(documents)
    for key, value in data.items():
        assert getattr(args, actions[key].dest) == convert(actions[key], value, key)


@pytest.mark.parametrize("option", PENDING_OPTIONS)
def test_pending_option(option: str) -> None:
    """Skipped while the CLI lacks the option (another change is adding it); from then on the manifests' use of it
    must parse as written."""
    if option not in options_of("serve"):
        pytest.skip(f"{option} is not in the CLI yet: the manifests pass it and parsing drops it until then")
    variant = next(v for v in VARIANTS if option in server_container(rendered(v))["args"])
    documents = rendered(variant)
    assert option in without_pending(server_container(documents)["args"], options_of("serve")), "kept, not dropped"
    served_settings(documents)


def test_build_engines_job_builds_the_served_model() -> None:
    (job,) = load_yaml(K8S / "jobs" / "build-engines.yaml")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["diffuserve"]
    args = parse(without_pending(container["args"], options_of("build-engines")))
    assert args.command == "build-engines"
    assert [args.model] == served_settings(rendered("hpa")).models
    assert container["image"] == server_container(rendered("hpa"))["image"]
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    for service in (d for d in rendered("hpa") if d["kind"] == "Service"):
        assert not service["spec"]["selector"].items() <= job_labels.items(), "no Service may route to the build"


# --- Names, secrets and security -------------------------------------------------------------------------------------


def secret_items(volume: dict) -> list[str]:
    return [item["key"] for item in volume["secret"].get("items", [])]


@pytest.mark.parametrize("variant", VARIANTS)
def test_referenced_secrets_configmaps_and_claims_exist(variant: str) -> None:
    documents = rendered(variant)
    available = documents + standalone()
    names = {(d["kind"], d["metadata"].get("name")) for d in available}
    for spec in (s for d in [*documents, *standalone()] for s in pod_specs(d)):
        volumes = {v["name"]: v for v in spec["volumes"]}
        for volume in volumes.values():
            if "secret" in volume:
                secret = one(available, "Secret", volume["secret"]["secretName"])
                keys = {*secret.get("data", {}), *secret.get("stringData", {})}
                assert set(secret_items(volume)) <= keys, f"{volume['name']}: keys the Secret has"
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in names
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounted == set(volumes), "every volume mounted, every mount a volume"


@pytest.mark.parametrize("variant", VARIANTS)
def test_secret_files_on_argv_are_mounted_secret_items(variant: str) -> None:
    documents = rendered(variant)
    container = server_container(documents)
    volumes = {v["name"]: v for v in one(documents, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    secret_files = {
        f"{m['mountPath']}/{item['path']}"
        for m in container["volumeMounts"]
        if "secret" in volumes[m["name"]]
        for item in volumes[m["name"]]["secret"]["items"]
    }
    files = {k: v for k, v in option_values(container["args"]).items() if k in SECRET_FILE_OPTIONS}
    assert set(files.values()) <= secret_files, "each secret file the server reads comes from a mounted Secret"
    assert "--auth-token-file" in files
    assert ("--tls-cert" in files and "--tls-key" in files) == (variant in TLS_VARIANTS)
    assert ("--tls-client-ca" in files) == (variant == "hpa+mtls")


def test_no_secret_in_argv_env_or_configmap() -> None:
    documents = rendered("hpa")
    container = server_container(documents)
    secretish = re.compile(r"TOKEN|SECRET|PASSWORD|KEY", re.IGNORECASE)
    assert not [e["name"] for e in container.get("env", []) if secretish.search(e["name"]) and "value" in e]
    assert not [key for key in one(documents, "ConfigMap")["data"] if secretish.search(key)]
    assert not [a for a in container["args"] if a.startswith("--") and secretish.search(a) and not a.endswith("-file")]


def test_pod_runs_unprivileged_on_one_gpu() -> None:
    documents = rendered("hpa")
    spec = one(documents, "Deployment")["spec"]["template"]["spec"]
    container = server_container(documents)
    uid = int(re.search(r"useradd [^\n]*--uid (\d+)", DOCKERFILE.read_text()).group(1))
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == uid
    assert spec["enableServiceLinks"] is False, "Service `diffuserve` would inject DIFFUSERVE_* variables"
    assert spec["automountServiceAccountToken"] is False
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
    assert context["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]
    models = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    assert models["readOnly"] and volumes[models["name"]]["persistentVolumeClaim"]["readOnly"]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert "cpu" not in resources["limits"], "CPU throttling would stall the GPU between denoising steps"
    assert resources["requests"]["memory"] == resources["limits"]["memory"]


def test_image_installs_what_the_options_need() -> None:
    """--metrics-port needs the `metrics` extra (prometheus-client) in the image the Deployment runs."""
    if "--metrics-port" not in server_container(rendered("hpa"))["args"]:
        return
    installs = [line for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines() if "pip install" in line]
    if not any("metrics" in line for line in installs):
        pytest.xfail(
            "deploy/docker/Dockerfile.tensorrt does not install diffuserve[metrics] yet, which serve --metrics-port "
            "needs: the pods would refuse to start until it does"
        )


def test_image_is_the_tensorrt_image_of_deploy_docker() -> None:
    built = re.search(r"docker build -f deploy/docker/Dockerfile\.tensorrt -t (\S+) \.", DEPLOY_README.read_text())
    assert built, "deploy/README.md builds Dockerfile.tensorrt with a tag"
    for variant in VARIANTS:
        assert server_container(rendered(variant))["image"] == built.group(1)


def test_one_namespace_everywhere() -> None:
    namespaces = {kustomization(d)["namespace"] for d in (K8S, K8S / "base", K8S / "keda")}
    assert len(namespaces) == 1
    (namespace,) = namespaces
    for variant in VARIANTS:
        documents = rendered(variant)
        assert one(documents, "Namespace")["metadata"]["name"] == namespace
        assert {d["metadata"]["namespace"] for d in documents if d["kind"] != "Namespace"} == {namespace}
    assert {d["metadata"]["namespace"] for d in standalone()} == {namespace}
    headless = one(rendered("hpa"), "Service", "diffuserve-headless")["metadata"]["name"]
    assert f"dns:///{headless}.{namespace}.svc:{GRPC_PORT}" in DEPLOY_README.read_text()
