"""The Kubernetes manifests (deploy/kubernetes): valid objects that agree with the code they run.

Every kustomization is rendered with `kubectl kustomize` and every object it yields is validated in
strict mode (unknown fields are errors) against the Kubernetes API schemas that kubernetes-validate
bundles, for the oldest and the newest Kubernetes version we claim. The rest checks the manifests
against the project itself, so that neither can drift from the other: probe paths against the
FastAPI route table, ports and threads against app/settings.py, the user against the Dockerfile,
the commands against the real argument parsers of `chatbot` and `torchrun`.

These tests need `kubectl` (which carries kustomize) on PATH and fail, not skip, without it: the
project's machines and CI have it. No cluster is needed.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import tomllib
import yaml
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
SERVING, TRAINING, MONITORING = KUBE, KUBE / "training", KUBE / "monitoring"
# The oldest Kubernetes the manifests are meant for, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
# RemoteEngine.aclose (app/remote_engine.py) gives the model worker its shutdown timeout plus this
# many seconds to stop before killing it.
WORKER_STOP_S = 15
GRACE_MARGIN_S = 10


# -- rendering -----------------------------------------------------------------------------------

@cache
def _rendered(path: Path) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: these tests render deploy/kubernetes with `kubectl "
                    "kustomize` (install kubectl; no cluster is needed)", pytrace=False)
    done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    objects = tuple(o for o in yaml.safe_load_all(done.stdout) if o)
    assert objects, f"kubectl kustomize {path} rendered nothing"
    return objects


def rendered(path: Path) -> list[dict[str, Any]]:
    return list(_rendered(path))


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def deployment() -> dict[str, Any]:
    return one(rendered(SERVING), "Deployment", "seq2seq-chatbot")


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    [c] = pod_spec(workload)["containers"]
    return c


def config_map_env() -> dict[str, str]:
    """The ConfigMap the Deployment reads with envFrom (its generated, hashed name)."""
    refs = [e["configMapRef"]["name"] for e in container(deployment()).get("envFrom", [])
            if "configMapRef" in e]
    assert len(refs) == 1, "the server's settings come from exactly one ConfigMap (envFrom)"
    return dict(one(rendered(SERVING), "ConfigMap", refs[0])["data"])


def served_settings(monkeypatch: pytest.MonkeyPatch) -> Any:
    """app.settings.Settings as the server in the pod builds it from the ConfigMap."""
    from app.settings import Settings

    for key, value in config_map_env().items():
        monkeypatch.setenv(key, value)
    return Settings()


def cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def dockerfile_user() -> tuple[int, int]:
    """The uid and gid of the image's last USER instruction (the runtime stage's)."""
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert users, "the Dockerfile sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and gid.isdigit(), f"USER {users[-1]}: expected numeric uid:gid"
    return int(uid), int(gid)


# -- every object is a valid Kubernetes object -----------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", [SERVING, TRAINING], ids=["serving", "training"])
def test_every_rendered_object_is_valid_in_strict_mode(path: Path, version: str) -> None:
    for obj in rendered(path):
        where = f"{obj['kind']}/{obj['metadata']['name']} ({path.relative_to(ROOT)}, Kubernetes {version})"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}", pytrace=False)
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{where}: {exc.message}", pytrace=False)


def test_the_kustomizations_render_what_they_say() -> None:
    kinds = sorted(o["kind"] for o in rendered(SERVING))
    assert kinds == sorted(["ConfigMap", "Secret", "Deployment", "Service", "HorizontalPodAutoscaler",
                            "PodDisruptionBudget"])
    assert sorted(o["kind"] for o in rendered(TRAINING)) == ["Job", "PersistentVolumeClaim", "Service"]
    # The ServiceMonitor needs the Prometheus Operator's CRD: never in the default kustomization.
    assert [o["kind"] for o in rendered(MONITORING)] == ["ServiceMonitor"]


def test_the_image_can_be_overridden_with_kustomize_images() -> None:
    for path in (SERVING, TRAINING):
        kustomization = yaml.safe_load((path / "kustomization.yaml").read_text())
        names = {i["name"] for i in kustomization["images"]}
        workload = one(rendered(path), "Deployment" if path == SERVING else "Job")
        image = container(workload)["image"]
        assert image == "seq2seq-chatbot:latest"
        assert image.rpartition(":")[0] in names, f"{path}: `images:` does not name {image}"


# -- serving: the Deployment against the server's code ---------------------------------------------

def test_probe_paths_are_real_open_routes() -> None:
    """The probes' paths are routes of the app, answer without the API key, and /ready says 503
    until a model is loaded (the app is built without starting its lifespan, so nothing loads)."""
    from app.main import create_app
    from app.settings import Settings

    c = container(deployment())
    paths = {name: c[name]["httpGet"]["path"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    metrics = deployment()["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    app = create_app(Settings(api_key="a-key-the-probes-do-not-send", model_process=True))
    routes = app.openapi()["paths"]  # the route table, as the app documents it
    for path in [*paths.values(), metrics]:
        assert "get" in routes.get(path, {}), f"GET {path} is not a route of the app"
    client = TestClient(app)  # no `with`: the lifespan (which loads the model) does not run
    assert client.get(paths["livenessProbe"]).status_code == 200
    assert client.get(paths["startupProbe"]).status_code == 200
    assert client.get(paths["readinessProbe"]).status_code == 503  # not loaded: out of the Service
    scrape = client.get(metrics)
    assert scrape.status_code == 200 and "chatbot_requests" in scrape.text
    assert client.get("/api/model").status_code == 401  # the key is enforced where it should be
    assert paths["readinessProbe"] != paths["livenessProbe"], \
        "liveness must not follow readiness: a restarting model worker would get the pod killed"
    for name in paths:
        assert c[name]["httpGet"]["port"] == "http"


def test_container_port_is_the_servers_port(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import Settings

    [port] = container(deployment())["ports"]
    default = Settings.model_fields["port"].default
    assert port["name"] == "http" and port["containerPort"] == default == 8000
    assert served_settings(monkeypatch).port == port["containerPort"]
    assert served_settings(monkeypatch).host == "0.0.0.0"  # reachable from the Service
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    service = one(rendered(SERVING), "Service", "seq2seq-chatbot")
    [sport] = service["spec"]["ports"]
    assert sport["port"] == 80 and sport["targetPort"] == port["name"]
    assert service["spec"]["type"] == "ClusterIP"
    assert "sessionAffinity" not in service["spec"] or service["spec"]["sessionAffinity"] == "None"


def test_config_map_holds_only_real_settings_with_valid_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import Settings

    env = config_map_env()
    fields = set(Settings.model_fields)
    for key in env:
        assert key.startswith("CHATBOT_"), f"{key}: the ConfigMap is for the server's settings"
        assert key.removeprefix("CHATBOT_").lower() in fields, f"{key} is not a setting (app/settings.py)"
    settings = served_settings(monkeypatch)  # raises if a value does not validate
    for key, value in env.items():
        served = getattr(settings, key.removeprefix("CHATBOT_").lower())
        assert served == type(served)(value), f"{key}={value} is served as {served!r}"


def test_threads_follow_the_cpu_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a container the server would count the node's cores; the ConfigMap sets what its own
    rule gives on a machine with the pod's CPU request."""
    import app.settings

    requested = cpu(container(deployment())["resources"]["requests"]["cpu"])
    settings = served_settings(monkeypatch)
    monkeypatch.setattr(app.settings, "available_cores", lambda: math.floor(requested))
    rule = app.settings.Settings(num_threads=0).threads()
    assert settings.num_threads == rule, (
        f"CHATBOT_NUM_THREADS={settings.num_threads}, but {requested:g} CPUs give {rule}")
    assert settings.num_threads + settings.encoder_threads <= requested


def test_resources_fit_the_measured_replica() -> None:
    resources = container(deployment())["resources"]
    assert cpu(resources["requests"]["cpu"]) == 2 == cpu(resources["limits"]["cpu"])

    def mib(q: str) -> float:
        return float(q[:-2]) * {"Mi": 1, "Gi": 1024}[q[-2:]]

    measured = 740  # MiB RSS, HTTP process + model worker, shipped model (2026-12-01)
    assert measured < mib(resources["requests"]["memory"]) < mib(resources["limits"]["memory"])


def test_grace_period_covers_the_deadline_and_the_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = served_settings(monkeypatch)
    spec = pod_spec(deployment())
    pre_stop = container(deployment())["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and 0 < int(pre_stop[1]) <= 15
    # A request admitted just before SIGTERM may run to its deadline; uvicorn waits that long.
    assert settings.shutdown_timeout_s >= settings.request_timeout_s
    needed = int(pre_stop[1]) + settings.shutdown_timeout_s + WORKER_STOP_S + GRACE_MARGIN_S
    assert spec["terminationGracePeriodSeconds"] >= needed


def test_pods_run_as_the_images_user_on_a_read_only_root() -> None:
    uid, gid = dockerfile_user()
    for workload in (deployment(), one(rendered(TRAINING), "Job")):
        spec = pod_spec(workload)
        pod_sc, c = spec["securityContext"], container(workload)
        sc = c["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == uid and pod_sc["runAsGroup"] == gid
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert sc.get("runAsUser", uid) == uid and sc.get("runAsGroup", gid) == gid
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["enableServiceLinks"] is False  # no CHATBOT_PORT=tcp://... from a Service named chatbot
        # With a read-only root, /tmp and HOME must be writable volumes.
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        writable = [m["mountPath"] for m in c["volumeMounts"] if m["name"] in empty_dirs]
        assert "/tmp" in writable
        home = {e["name"]: e.get("value") for e in c["env"]}.get("HOME")
        assert home is not None and any(home == w or home.startswith(w + "/") for w in writable), \
            "HOME must be on a writable volume (the image's /home/chatbot is on the read-only root)"


def test_the_api_key_comes_only_from_a_secret() -> None:
    objects = rendered(SERVING)
    assert not any(k == "CHATBOT_API_KEY" for k in config_map_env())
    c = container(deployment())
    [entry] = [e for e in c["env"] if e["name"] == "CHATBOT_API_KEY"]
    assert "value" not in entry
    ref = entry["valueFrom"]["secretKeyRef"]
    secret = one(objects, "Secret", ref["name"])  # the generated Secret, by its hashed name
    assert ref["key"] in secret["data"] and secret["data"][ref["key"]]
    assert ref.get("optional") is False  # a missing Secret stops the pod; it never serves open by accident
    for obj in objects:  # in no ConfigMap, and in no env entry with a literal value
        if obj["kind"] == "ConfigMap":
            assert "CHATBOT_API_KEY" not in obj.get("data", {})
    assert all("configMapRef" in e for e in c.get("envFrom", []))  # envFrom: settings only


def test_the_serve_command_is_the_real_cli() -> None:
    from app.cli import _parser

    command = container(deployment())["command"] + container(deployment()).get("args", [])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[command[0]] == "app.cli:main"
    args = _parser().parse_args(command[1:])
    assert args.command == "serve"
    assert args.port is None and args.host is None  # both from the ConfigMap, so they agree


def test_autoscaler_disruption_budget_and_spread_cover_the_deployment() -> None:
    objects = rendered(SERVING)
    dep = deployment()
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert matches(dep["spec"]["selector"]["matchLabels"], labels)
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # Below the share of its CPUs a saturated replica uses (1.3 of 2 cores under 32 clients,
    # docs/PERFORMANCE.md: the decoder thread limits first), or it would never scale out.
    assert 0 < metric["resource"]["target"]["averageUtilization"] < 65
    # Scale-down waits longer than a replica takes to start (the startup probe's budget).
    startup = container(dep)["startupProbe"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= \
        startup["periodSeconds"] * startup["failureThreshold"]
    pdb = one(objects, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1
    service = one(objects, "Service", "seq2seq-chatbot")
    assert matches(service["spec"]["selector"], labels)
    spread = pod_spec(dep)["topologySpreadConstraints"]
    assert "kubernetes.io/hostname" in {s["topologyKey"] for s in spread}
    assert all(matches(s["labelSelector"]["matchLabels"], labels) for s in spread)


def test_the_service_monitor_scrapes_the_service() -> None:
    [monitor] = rendered(MONITORING)
    service = one(rendered(SERVING), "Service", "seq2seq-chatbot")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert endpoint["path"] == annotations["prometheus.io/path"]


# -- training: the Indexed Job against torchrun, `chatbot train` and the trainer ------------------

def job() -> dict[str, Any]:
    return one(rendered(TRAINING), "Job", "seq2seq-train")


def pod_env(c: dict[str, Any], index: int) -> dict[str, str]:
    """The container's environment as the kubelet resolves it for the pod of this index."""
    env: dict[str, str] = {}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        source = e["valueFrom"]
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == \
                "metadata.annotations['batch.kubernetes.io/job-completion-index']"
            env[e["name"]] = str(index)
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            assert ref["containerName"] == c["name"] and ref["resource"] == "requests.cpu"
            assert cpu(ref.get("divisor", "1")) == 1
            env[e["name"]] = str(math.ceil(cpu(c["resources"]["requests"]["cpu"])))
        else:
            raise AssertionError(f"{e['name']}: unexpected source {source}")
    return env


def expand(words: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of command and args (an unknown name would stay literal: a bug)."""
    def one_word(word: str) -> str:
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], word)
    return [one_word(w) for w in words]


def training_args(index: int) -> tuple[Any, Any, dict[str, str]]:
    """(torchrun's parsed arguments, `chatbot`'s parsed arguments, env) for the pod of `index`."""
    from torch.distributed.run import get_args_parser

    from app.cli import _parser

    c = container(job())
    env = pod_env(c, index)
    args = expand(c["args"], env)
    assert args[0] == "torchrun"
    launcher = get_args_parser().parse_args(args[1:])
    assert launcher.module and launcher.training_script == "app.cli", "run as `-m app.cli` (DISTRIBUTED.md)"
    return launcher, _parser().parse_args(launcher.training_script_args), env


@pytest.mark.parametrize("index", [0, 1])
def test_the_training_command_is_accepted_by_torchrun_and_chatbot_train(index: int) -> None:

    from app.cli import _parser

    spec = job()["spec"]
    launcher, train, env = training_args(index)
    assert train.command == "train" and not train.resume  # the wrapper adds --resume
    assert _parser().parse_args([*launcher.training_script_args, "--resume"]).resume
    assert int(launcher.nnodes) == spec["completions"] == spec["parallelism"]
    assert int(launcher.node_rank) == index
    assert launcher.rdzv_backend == "static"  # node rank = pod index: global rank 0 is pod 0
    assert launcher.max_restarts == 0  # restarts are the Job's: a new pod resumes
    # Threads: the CPU request, divided among the pod's processes.
    requested = cpu(container(job())["resources"]["requests"]["cpu"])
    assert train.threads * int(launcher.nproc_per_node) == requested
    assert env["OMP_NUM_THREADS"] == str(train.threads)


def test_the_rendezvous_address_is_pod_0_through_the_headless_service() -> None:
    objects = rendered(TRAINING)
    spec = job()["spec"]
    launcher, _, _ = training_args(1)
    service = one(objects, "Service")
    pod = spec["template"]
    assert spec["completionMode"] == "Indexed"
    assert service["spec"]["clusterIP"] == "None"
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert matches(service["spec"]["selector"], pod["metadata"]["labels"])
    # An Indexed Job's pod N has the hostname <job>-N; with the subdomain, <job>-N.<service> in DNS.
    assert launcher.master_addr == f"{job()['metadata']['name']}-0.{service['metadata']['name']}"
    assert launcher.master_port in {p["port"] for p in service["spec"]["ports"]}
    # The serving Service must not pick up training pods, nor the reverse.
    serving = one(rendered(SERVING), "Service", "seq2seq-chatbot")
    assert not matches(serving["spec"]["selector"], pod["metadata"]["labels"])
    assert not matches(service["spec"]["selector"], deployment()["spec"]["template"]["metadata"]["labels"])


def test_the_run_is_written_to_a_shared_claim() -> None:
    objects = rendered(TRAINING)
    _, train, _ = training_args(0)
    spec = pod_spec(job())
    [claim_volume] = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    claim = one(objects, "PersistentVolumeClaim", claim_volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # mounted by pods on several nodes
    [mount] = [m for m in container(job())["volumeMounts"] if m["name"] == claim_volume["name"]]
    assert mount.get("readOnly") is not True
    assert Path(mount["mountPath"]) in train.out.parents, f"--out {train.out} is not on the claim"


def test_the_global_batch_is_the_recipes() -> None:
    """--batch-size x processes = the config's batch_size (DISTRIBUTED.md: N processes with B
    train like one with N x B); the config is the repository's, copied into the image."""
    launcher, train, _ = training_args(0)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY configs/ /opt/chatbot/configs/$", dockerfile, re.MULTILINE)
    config = ROOT / "configs" / train.config.relative_to("/opt/chatbot/configs")
    recipe = tomllib.loads(config.read_text())["train"]["batch_size"]
    assert train.batch_size * int(launcher.nnodes) * int(launcher.nproc_per_node) == recipe


def test_gloo_on_cpu() -> None:
    from model.distributed import BACKEND_ENV

    c = container(job())
    env = pod_env(c, 0)
    assert env[BACKEND_ENV] == "gloo"
    assert not any("gpu" in k for k in c["resources"].get("limits", {}))


def test_failed_or_evicted_pods_are_replaced_and_resume() -> None:
    spec = job()["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["backoffLimit"] >= 2 * spec["completions"]  # one crash fails every peer too
    assert spec["podReplacementPolicy"] == "Failed"
    rules = spec["podFailurePolicy"]["rules"]
    assert any(r["action"] == "Ignore" and {"type": "DisruptionTarget", "status": "True"} in
               r.get("onPodConditions", []) for r in rules)
    # torchrun's default shutdown timeout (30 s) for rank 0 to save the state fits in the grace period.
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > 30


@pytest.mark.parametrize("saved", [False, True])
def test_the_wrapper_resumes_exactly_when_the_state_is_saved(tmp_path: Path, saved: bool) -> None:
    """Run the Job's shell wrapper for real (with `echo` as the command) on an empty run directory
    and on one holding the trainer's state file."""
    from model.training import STATE_FILE

    c = container(job())
    env = pod_env(c, 0)
    out = tmp_path / "run"
    out.mkdir()
    if saved:
        (out / STATE_FILE).write_bytes(b"")
    shell, flag, script, name = expand(c["command"], env)
    assert (shell, flag) == ("/bin/sh", "-c") and STATE_FILE in script
    args = expand(c["args"], env)
    done = subprocess.run([shell, flag, script, name, "printf", "%s\\n", *args], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", **env, "OUT_DIR": str(out)}, timeout=30,
                          check=True)
    words = done.stdout.splitlines()
    assert words[:len(args)] == args
    assert words[len(args):] == (["--resume"] if saved else [])
    assert f"--out={env['OUT_DIR']}" in args  # the wrapper and the trainer look at the same directory
