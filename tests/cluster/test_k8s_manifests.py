"""Every manifest in k8s/, and every kustomize rendering of it, validated offline and strictly.

KubeRay kinds against the v1.7.0 CRDs (``QGDIST_KUBERAY_CRDS`` or ../shared/kuberay-crds-v1.7.0), core kinds with
kubernetes-validate; then the operational rules of issue 5 (non-root, limits, GPUs, /dev/shm, shared storage,
resume by run name, Secret references only) and that every qgdist command line parses with qgdist's own parser.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

from qgdist.cluster import manifests as m

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CRD_DIR = Path(os.environ.get("QGDIST_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay-crds-v1.7.0"))
RENDERINGS = ["base", "overlays/cpu-small", "overlays/gpu"]
DATA_MOUNT = "/mnt/qgdist"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|ACCESS_KEY|_KEY$|_URI$", re.I)


@pytest.fixture(scope="module")
def crds():
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (set QGDIST_KUBERAY_CRDS to the directory holding "
                    "ray.io_rayjobs.yaml and ray.io_rayclusters.yaml)")
    return m.load_crd_schemas(CRD_DIR)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with built-in kustomize) is not installed: cannot render the overlays")
    return {name: m.render_kustomize(K8S / name) for name in RENDERINGS}


def raw_manifests() -> list[tuple[str, dict]]:
    """Each resource file as written (kustomization files and component patches excluded)."""
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or "components" in path.parts or path.name.startswith("."):
            continue
        docs += [(str(path.relative_to(REPO)), doc) for doc in m.load_documents(path)]
    return docs


def validate(obj: dict, crds) -> dict:
    if obj["apiVersion"].startswith(m.KUBERAY_GROUP + "/"):
        defaulted = m.validate_kuberay(obj, crds)
        assert not m.kuberay_rules(defaulted), m.kuberay_rules(defaulted)
        return defaulted
    m.validate_core(obj)
    return obj


@pytest.mark.parametrize("where,obj", raw_manifests(), ids=lambda v: v if isinstance(v, str) else "")
def test_each_manifest_file_is_valid(where, obj, crds):
    validate(obj, crds)


@pytest.mark.parametrize("name", RENDERINGS)
def test_each_rendering_is_valid(name, rendered, crds):
    kinds = {obj["kind"] for obj in rendered[name]}
    assert {"RayJob", "RayCluster", "Job", "Deployment", "Service", "PersistentVolumeClaim"} <= kinds
    for obj in rendered[name]:
        validate(obj, crds)


def test_strict_validation_rejects_what_the_api_server_would(crds, rendered):
    train = next(o for o in rendered["base"] if o["metadata"]["name"] == "qgdist-train")
    defaulted = m.validate_kuberay(train, crds)
    assert defaulted["spec"]["submissionMode"] == "K8sJobMode"  # a CRD default was applied
    breakages = [
        lambda o: o["spec"].update(entrypiont="typo"),                                     # unknown field
        lambda o: o["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            imagePullPolice="Always"),                                                     # unknown, deep
        lambda o: o["spec"].update(backoffLimit=2**31),                                    # int32 overflow
        lambda o: o["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
            "resources"]["limits"].update(memory="48 GiB"),                                # not a quantity
        lambda o: o["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"].append(
            {"name": "ray-head", "image": "x"}),                                           # list-map key twice
    ]
    for breakage in breakages:
        broken = copy.deepcopy(train)
        breakage(broken)
        with pytest.raises(ValueError):
            m.validate_kuberay(broken, crds)
    deployment = next(o for o in rendered["base"] if o["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["resources"]["limts"] = {"cpu": "1"}
    with pytest.raises(Exception, match="limts"):
        m.validate_core(broken)
    broken = copy.deepcopy(train)
    broken["spec"]["shutdownAfterJobFinishes"] = False
    groups = broken["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    groups.append(copy.deepcopy(groups[0]))
    assert m.kuberay_rules(broken) == [f"worker group names repeat: {[groups[0]['groupName']] * 2}",
                                       "ttlSecondsAfterFinished > 0 needs shutdownAfterJobFinishes: true"]


def test_every_qgdist_command_line_parses(rendered):
    from qgdist.cli import build_parser
    from qgdist.core.config import from_args

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    seen = set()
    for name, objs in rendered.items():
        for obj in objs:
            for argv in m.qgdist_argv(obj):
                assert argv and argv[0] in commands, (
                    f"{name}: {obj['kind']}/{obj['metadata']['name']} runs `qgdist {shlex.join(argv)}`, but qgdist "
                    f"has no {argv[:1]} command (has: {', '.join(sorted(commands))})")
                args = parser.parse_args(argv)  # SystemExit (argparse's message on stderr) fails the test
                if getattr(args, "config_cls", None):   # required settings are checked when the config is built
                    from_args(args.config_cls, args)
                seen.add(argv[0])
    assert {"train", "convert", "evaluate"} <= seen


@pytest.mark.parametrize("name", RENDERINGS)
def test_pods_run_as_non_root_with_requests_and_limits(name, rendered):
    for obj in rendered[name]:
        for where, spec in m.pod_specs(obj):
            pod_ctx = spec.get("securityContext", {})
            for container in spec["containers"]:
                ctx = {**pod_ctx, **container.get("securityContext", {})}
                assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) > 0, f"{where} may run as root"
                assert ctx.get("allowPrivilegeEscalation") is False, where
                res = container.get("resources", {})
                for bound in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(res.get(bound, {})), f"{where}: {bound} lack cpu/memory"
                    assert all(m.QUANTITY.match(str(v)) for v in res[bound].values()), f"{where}: {res[bound]}"
                gpus = {b: res.get(b, {}).get("nvidia.com/gpu") for b in ("requests", "limits")}
                if any(gpus.values()):
                    assert gpus["requests"] == gpus["limits"], f"{where}: GPU requests != limits"
                    assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), where


@pytest.mark.parametrize("name", RENDERINGS)
def test_secrets_are_only_referenced(name, rendered):
    for obj in rendered[name]:
        assert obj["kind"] != "Secret", "Secrets are created by the operator, not shipped in k8s/"
        text = m.yaml.safe_dump(obj)
        assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), f"{obj['metadata']['name']}: credentials in a URL"
        for _, spec in m.pod_specs(obj):
            for container in spec["containers"]:
                for env in container.get("env", []):
                    if SECRET_NAME.search(env["name"]) and "value" in env:
                        assert not env["value"] or "://" in env["value"] and "@" not in env["value"], env


@pytest.mark.parametrize("name", RENDERINGS)
def test_secret_values_never_reach_a_command_line(name, rendered):
    """A Secret-backed variable is read from the environment by the program, never expanded by Kubernetes into
    ``command``/``args`` (``$(VAR)``), where ``ps`` on the node and the pod spec would show it."""
    for obj in rendered[name]:
        for where, spec in m.pod_specs(obj):
            for container in spec["containers"] + spec.get("initContainers", []):
                secret_vars = {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
                words = " ".join(map(str, container.get("command", []) + container.get("args", [])))
                expanded = {v for v in secret_vars if f"$({v})" in words}
                assert not expanded, f"{where}: {sorted(expanded)} expanded into the command line"


def test_the_postgres_backend_reaches_mlflow_by_environment_only(rendered):
    mlflow = next(o for o in rendered["overlays/gpu"] if o["kind"] == "Deployment"
                  and o["metadata"]["name"] == "qgdist-mlflow")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "qgdist-mlflow-postgres"
    assert "--backend-store-uri" not in container["command"] + container.get("args", [])


@pytest.mark.parametrize("name", RENDERINGS)
def test_ray_clusters_autoscale_share_storage_and_have_shm(name, rendered):
    claims = {o["metadata"]["name"] for o in rendered[name] if o["kind"] == "PersistentVolumeClaim"}
    for obj in rendered[name]:
        cluster = m.ray_cluster_spec(obj)
        if not cluster:
            continue
        assert cluster["enableInTreeAutoscaling"] is True
        for group in cluster["workerGroupSpecs"]:
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
        for where, spec in m.pod_specs(obj):
            if where.endswith("/submitter"):
                continue
            volumes = {v["name"]: v for v in spec["volumes"]}
            mounts = {v["mountPath"]: v["name"] for v in spec["containers"][0]["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", where
            assert volumes[mounts[DATA_MOUNT]]["persistentVolumeClaim"]["claimName"] in claims, where


@pytest.mark.parametrize("name", RENDERINGS)
def test_training_job_resumes_by_run_name_on_shared_storage(name, rendered):
    from qgdist.cli import build_parser
    from qgdist.core.config import from_args
    from qgdist.train.config import TrainConfig

    train = next(o for o in rendered[name] if o["metadata"]["name"] == "qgdist-train")
    spec = train["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1
    argv = m.qgdist_argv(train)[0]
    cfg = from_args(TrainConfig, build_parser().parse_args(argv))   # the config the job will run
    # The default run name would do too, but every such job would then resume the same run.
    assert "--run-name" in argv, "the training job must name its run, so that a retry resumes that run"
    assert cfg.checkpoint.storage.startswith(DATA_MOUNT) and cfg.data.data.startswith(DATA_MOUNT)
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    if cfg.launch.gpu:
        slots = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get(
            "nvidia.com/gpu", 0)) for g in groups)
        assert 0 < cfg.launch.workers <= slots, f"{cfg.launch.workers} GPU workers but room for {slots}"
    else:
        assert not any("nvidia.com/gpu" in m.yaml.safe_dump(g) for g in groups), "CPU job asks for GPUs"
    assert (name == "overlays/cpu-small") != cfg.launch.gpu


# -- hardening (issue 19) ------------------------------------------------------------------------------------------
def _quantity(text: str) -> float:
    """A memory/storage quantity in bytes (the suffixes these manifests use)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    return float(m.group(1)) * units.get(m.group(2), 1)


def _is_ray_pod(where: str) -> bool:
    return where.startswith(("RayJob/", "RayCluster/")) and not where.endswith("/submitter")


def _needs_api_token(obj: dict, where: str) -> bool:
    """Only a Ray head with in-tree autoscaling talks to the API server (KubeRay's autoscaler sidecar)."""
    cluster = m.ray_cluster_spec(obj) or {}
    return where.endswith("/head") and cluster.get("enableInTreeAutoscaling", False)


@pytest.mark.parametrize("name", RENDERINGS)
def test_pods_are_hardened(name, rendered):
    """Read-only root filesystems with emptyDirs for /tmp (and Ray's temp dir /tmp/ray), RuntimeDefault seccomp,
    no service-account token where nothing uses it, ephemeral-storage requests and limits that hold the pod's
    disk-backed emptyDirs."""
    for obj in rendered[name]:
        for where, spec in m.pod_specs(obj):
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert spec.get("automountServiceAccountToken") is _needs_api_token(obj, where), where
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            disk = sum(_quantity(v["emptyDir"]["sizeLimit"]) for v in volumes.values()
                       if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")
            limits = 0.0
            for container in spec["containers"]:
                assert container["securityContext"]["readOnlyRootFilesystem"] is True, f"{where}: root fs writable"
                mounts = {v["mountPath"]: v["name"] for v in container.get("volumeMounts", [])}
                writable = ["/tmp", "/tmp/ray"] if _is_ray_pod(where) else ["/tmp"]
                for path in writable:
                    assert path in mounts and "emptyDir" in volumes[mounts[path]], f"{where}: {path} not an emptyDir"
                for bound in ("requests", "limits"):
                    assert "ephemeral-storage" in container["resources"][bound], f"{where}: {bound} lack it"
                limits += _quantity(container["resources"]["limits"]["ephemeral-storage"])
            assert disk <= limits, f"{where}: emptyDirs of {disk / 2**30:.0f} GiB beyond the pod's limits"
            if where.endswith("/head"):   # KubeRay mounts this volume in its autoscaler sidecar too
                assert {v["mountPath"]: v["name"] for v in spec["containers"][0]["volumeMounts"]}["/tmp/ray"] \
                    == "ray-logs", where
        cluster = m.ray_cluster_spec(obj)
        if cluster and cluster.get("enableInTreeAutoscaling"):   # the sidecar KubeRay adds to the head
            options = cluster["autoscalerOptions"]
            assert options["securityContext"]["readOnlyRootFilesystem"] is True
            assert options["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert {v["mountPath"] for v in options["volumeMounts"]} == {"/tmp"}
            assert all("ephemeral-storage" in options["resources"][b] for b in ("requests", "limits"))


def _selects(selector: dict, labels: dict) -> bool:
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for e in selector.get("matchExpressions", []):
        ok &= (e["key"] in labels) if e["operator"] == "Exists" else labels.get(e["key"]) in e.get("values", [])
    return ok


@pytest.mark.parametrize("name", RENDERINGS)
def test_network_policies_admit_only_the_projects_own_pods(name, rendered):
    """The MLflow server and the Ray pods accept connections only from pods labelled part of qgdist (plus the
    KubeRay operator, on the dashboard port), and every pod that must reach them carries that label."""
    policies = {o["metadata"]["name"]: o for o in rendered[name] if o["kind"] == "NetworkPolicy"}
    assert set(policies) == {"qgdist-mlflow", "qgdist-ray"}
    ours = {"app.kubernetes.io/part-of": "qgdist"}
    mlflow = next(o for o in rendered[name] if o["kind"] == "Deployment")
    mlflow_labels = mlflow["spec"]["template"]["metadata"]["labels"]
    head = {**ours, "ray.io/node-type": "head", "ray.io/cluster": "x"}
    outsider = {"app": "something-else", "ray.io/node-type": "head"}
    for policy, target in ((policies["qgdist-mlflow"], mlflow_labels), (policies["qgdist-ray"], head)):
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"] and _selects(spec["podSelector"], target)
        assert not _selects(spec["podSelector"], outsider) or policy is policies["qgdist-mlflow"]
        for rule in spec["ingress"]:
            for peer in rule["from"]:
                assert "ipBlock" not in peer, "no address ranges: only pods"
                if "namespaceSelector" in peer:   # only the operator may come from elsewhere, to the dashboard
                    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
                    assert [p["port"] for p in rule["ports"]] == [8265]
                else:
                    assert peer["podSelector"] == {"matchLabels": ours}
    assert [p["port"] for p in policies["qgdist-mlflow"]["spec"]["ingress"][0]["ports"]] == [5000]
    for obj in rendered[name]:   # every pod we run carries the label the policies admit
        if obj["kind"] in ("Deployment", "Job"):
            assert obj["spec"]["template"]["metadata"]["labels"].items() >= ours.items(), obj["metadata"]["name"]
        cluster = m.ray_cluster_spec(obj)
        if cluster:
            templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
            if obj["kind"] == "RayJob":
                templates.append(obj["spec"]["submitterPodTemplate"])
            for template in templates:
                assert template["metadata"]["labels"].items() >= ours.items(), obj["metadata"]["name"]
