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
