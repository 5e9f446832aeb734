"""Offline, strict validation of the k8s/ manifests: no API server needed.

KubeRay kinds are checked against the CRDs' ``openAPIV3Schema`` the way the API server would prune-and-reject:
unknown fields are errors (``additionalProperties: false`` wherever a schema lists properties and does not say
``x-kubernetes-preserve-unknown-fields``), defaults are applied, ``int32`` / ``int64`` ranges, quantity patterns
and ``x-kubernetes-list-type`` uniqueness are enforced. Core kinds go to ``kubernetes-validate`` in strict mode.
CEL rules (``x-kubernetes-validations``) are not evaluated; :func:`kuberay_rules` covers the ones that matter here.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

KUBERAY_GROUP = "ray.io"
K8S_VERSION = "1.32"
#: A Kubernetes resource quantity (k8s.io/apimachinery resource.Quantity), the CRDs' own pattern.
QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+"
                      r"(\.[0-9]*)?)|(\.[0-9]+))))?$")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_INT_RANGES = {"int32": (-2**31, 2**31 - 1), "int64": (-2**63, 2**63 - 1)}


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document in ``path``."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 2.3 MB of YAML
    return [doc for doc in yaml.load_all(path.read_text(), Loader=loader) if doc]


def render_kustomize(directory: Path, kubectl: str | None = None) -> list[dict[str, Any]]:
    """``kubectl kustomize DIRECTORY`` parsed into objects (raises with kustomize's message on failure)."""
    kubectl = kubectl or shutil.which("kubectl")
    if kubectl is None:
        raise FileNotFoundError("kubectl not found: it renders the kustomize overlays")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise ValueError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def strict_schema(schema: Any) -> Any:
    """A copy of an openAPIV3 schema in which objects with listed properties reject unknown fields."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    # `properties` maps names to schemas (keep its keys, convert its values); `default` / `enum` hold data.
    out = {key: value if key in ("properties", "default", "enum") else strict_schema(value)
           for key, value in schema.items()}
    if "properties" in schema:
        out["properties"] = {name: strict_schema(sub) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            out["additionalProperties"] = False
    return out


def load_crd_schemas(crd_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(apiVersion, kind): strict schema}`` for every served version of every CRD in ``crd_dir``."""
    schemas = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        for crd in load_documents(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    schemas[(f"{group}/{version['name']}", kind)] = strict_schema(
                        version["schema"]["openAPIV3Schema"])
    return schemas


def _validator_class():
    """Draft 4 (what openAPIV3 schemas are closest to) plus defaults and Kubernetes list semantics."""
    from jsonschema import Draft4Validator, ValidationError, validators

    properties = Draft4Validator.VALIDATORS["properties"]

    def apply_defaults(validator, props, instance, schema):
        if isinstance(instance, dict):  # as the API server does: defaults only inside objects that exist
            for name, sub in props.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from properties(validator, props, instance, schema)

    def list_type(validator, kind, instance, schema):
        if not isinstance(instance, list):
            return
        if kind == "set" and len({yaml.safe_dump(item) for item in instance}) != len(instance):
            yield ValidationError("duplicate items in a list of type set")
        if kind == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen = [tuple(item.get(key) for key in keys) for item in instance if isinstance(item, dict)]
            for dup in {key for key in seen if seen.count(key) > 1}:
                yield ValidationError(f"duplicate entries with {dict(zip(keys, dup))} in a list-map")

    return validators.extend(Draft4Validator, {"properties": apply_defaults, "x-kubernetes-list-type": list_type})


def _format_checker():
    from jsonschema import FormatChecker

    checker = FormatChecker()
    for name, (low, high) in _INT_RANGES.items():
        checker.checks(name)(lambda value, low=low, high=high: not isinstance(value, int) or low <= value <= high)
    return checker


def validate_kuberay(obj: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """Validate one KubeRay object strictly; returns it with the CRD's defaults applied. Raises on any error."""
    from jsonschema.exceptions import best_match

    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in schemas:
        raise ValueError(f"no CRD serves {key[0]} {key[1]} (have {sorted(schemas)})")
    defaulted = copy.deepcopy(obj)
    validator = _validator_class()(schemas[key], format_checker=_format_checker())
    errors = list(validator.iter_errors(defaulted))
    if errors:
        worst = best_match(errors)
        where = "/".join(map(str, worst.absolute_path))
        raise ValueError(f"{obj['kind']} {obj['metadata'].get('name')}: {len(errors)} schema error(s); "
                         f"at {where or '(root)'}: {worst.message}")
    errors = list(validator.iter_errors(defaulted))  # defaults must themselves be valid
    if errors:
        raise ValueError(f"{obj['kind']} {obj['metadata'].get('name')} after defaults: {errors[0].message}")
    return defaulted


def validate_core(obj: dict[str, Any], version: str = K8S_VERSION) -> None:
    """Validate a core / apps / batch object with kubernetes-validate (offline schemas, strict)."""
    import kubernetes_validate

    kubernetes_validate.validate(obj, version, strict=True)


def kuberay_rules(obj: dict[str, Any]) -> list[str]:
    """KubeRay's own checks (operator validation and CEL rules) that a schema cannot express."""
    problems = []
    name = obj["metadata"].get("name", "")
    if not DNS_1035.match(name):
        problems.append(f"name {name!r} is not a DNS-1035 label")
    cluster = ray_cluster_spec(obj) or {}
    groups = [group.get("groupName") for group in cluster.get("workerGroupSpecs", [])]
    if len(set(groups)) != len(groups):
        problems.append(f"worker group names repeat: {groups}")
    if obj["kind"] == "RayJob":
        spec = obj["spec"]
        if len(name) > 47:
            problems.append(f"RayJob name {name!r} is longer than 47 characters")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            problems.append("ttlSecondsAfterFinished > 0 needs shutdownAfterJobFinishes: true")
        if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
            problems.append("activeDeadlineSeconds must be > 0")
        if spec.get("backoffLimit", 0) < 0:
            problems.append("backoffLimit must be >= 0")
        if bool(spec.get("rayClusterSpec")) == bool(spec.get("clusterSelector")):
            problems.append("exactly one of rayClusterSpec and clusterSelector")
        if spec.get("runtimeEnvYAML") is not None and not isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict):
            problems.append("runtimeEnvYAML must hold a YAML mapping")
    return problems


def ray_cluster_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The RayCluster spec inside a RayCluster or a RayJob (None for other kinds)."""
    if obj.get("kind") == "RayCluster":
        return obj["spec"]
    if obj.get("kind") == "RayJob":
        return obj["spec"].get("rayClusterSpec")
    return None


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec an object will create, as ``(where, spec)``."""
    kind = obj.get("kind")
    if kind in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        yield f"{kind}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]
    cluster = ray_cluster_spec(obj)
    if cluster:
        yield f"{kind}/{obj['metadata']['name']}/head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{kind}/{obj['metadata']['name']}/{group['groupName']}", group["template"]["spec"]
    if kind == "RayJob" and obj["spec"].get("submitterPodTemplate"):
        yield f"RayJob/{obj['metadata']['name']}/submitter", obj["spec"]["submitterPodTemplate"]["spec"]


def qgdist_argv(obj: dict[str, Any]) -> list[list[str]]:
    """The argument vectors of every qgdist command an object runs (RayJob entrypoints, container commands)."""
    import shlex

    lines = []
    if obj.get("kind") == "RayJob":
        lines.append(shlex.split(obj["spec"]["entrypoint"]))
    for _, spec in pod_specs(obj):
        lines.extend(list(c.get("command", [])) + list(c.get("args", [])) for c in spec["containers"])
    argvs = []
    for words in lines:
        if words[:1] == ["qgdist"]:
            argvs.append(words[1:])
        elif words[1:3] == ["-m", "qgdist"]:
            argvs.append(words[3:])
    return argvs
