"""cluster/: the `ray up` YAML, the KubeRay manifests and the jobs' runtime_env, checked with the tools
their users' clusters run: Ray's autoscaler schema and its KubeRay CR reader, Ray Serve's config
schema, Ray's runtime_env, KubeRay v1.6.2's CRD schemas for the whole manifests (unknown fields refused,
as `kubectl apply --validate=strict` does: tests/kuberay_schema.py), and Kubernetes' own OpenAPI schemas
(kubernetes-validate, strict) for every pod template and the shared storage. Each check is shown to fail
on a broken copy."""
from __future__ import annotations

import copy
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv
from ray.serve.schema import ServeDeploySchema

from dtrain.train.pipeline import load_pipeline
from dtrain.serving.config import ServeArgs
from dtrain.secrets import SECRET_VARS
from tests import kuberay_schema

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
K8S_VERSION = "1.33.0"  # Kubernetes' schema the pod templates are checked against
KUBERAY = {"RayCluster": "raycluster.yaml", "RayJob": "rayjob.yaml", "RayService": "rayservice.yaml"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def cluster_spec(manifest: dict) -> dict:
    """The RayCluster spec inside any of the three kinds."""
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[manifest["kind"]](manifest["spec"])


def pod_templates(spec: dict) -> dict[str, dict]:
    return {"head": spec["headGroupSpec"]["template"],
            **{g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}}


def validate_pod_template(name: str, template: dict) -> None:
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                                  "template": template}, K8S_VERSION, strict=True)


def as_ray_cr(manifest: dict) -> dict:
    return {"metadata": {"name": manifest["metadata"]["name"], "namespace": "default"},
            "spec": cluster_spec(manifest)}


# ---- ray up ----

def test_ray_up_yaml_passes_rays_cluster_schema_and_merges_with_its_aws_defaults():
    # as `ray up` does: merge with Ray's AWS defaults, then validate (node resources are given, so
    # nothing is left for the AWS API to fill in)
    prepared = prepare_config(load(CLUSTER / "ray-up.yaml"))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    workers = {k: v for k, v in prepared["available_node_types"].items() if k != "head"}
    assert workers and all(v["max_workers"] >= 1 for v in workers.values())
    assert all(v["node_config"]["InstanceType"].startswith(("p", "g")) for v in workers.values())  # GPU types
    assert sum(v["max_workers"] for v in workers.values()) == prepared["max_workers"]


def test_ray_up_yaml_keeps_token_auth_and_a_loopback_dashboard():
    config = load(CLUSTER / "ray-up.yaml")
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]  # every node gets the token, no image holds it


def test_rays_cluster_schema_refuses_a_misspelt_key():
    config = load(CLUSTER / "ray-up.yaml")
    config["available_node_types"]["head"]["node_confg"] = config["available_node_types"]["head"].pop("node_config")
    with pytest.raises(Exception, match="node_confg|node_config"):
        validate_config(prepare_config(config))


# ---- runtime_env ----

def test_runtime_env_file_is_a_valid_ray_runtime_env_without_secrets():
    env = load(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own validation of every field
    assert not set(env.get("env_vars", {})) & set(SECRET_VARS)


# ---- KubeRay ----

@pytest.mark.parametrize("kind", KUBERAY)
def test_kuberay_manifest_pod_templates_pass_kubernetes_strict_schema(kind):
    manifest = load(CLUSTER / "kuberay" / KUBERAY[kind])
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    for name, template in pod_templates(cluster_spec(manifest)).items():
        validate_pod_template(name, template)


def test_kubernetes_strict_schema_refuses_a_misspelt_container_field():
    template = copy.deepcopy(pod_templates(cluster_spec(load(CLUSTER / "kuberay" / "raycluster.yaml")))["head"])
    container = template["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_pod_template("head", template)


@pytest.mark.parametrize("kind", KUBERAY)
def test_kuberay_manifest_passes_its_crds_schema_strictly(kind):
    """KubeRay v1.6.2's own schema of the kind (cluster/kuberay/schemas/), unknown fields refused."""
    manifest = load(CLUSTER / "kuberay" / KUBERAY[kind])
    kuberay_schema.validate(manifest, K8S_VERSION)


def _set(key: str, value):
    return lambda obj: obj.__setitem__(key, value)


def _rename(old: str, new: str):
    return lambda obj: obj.__setitem__(new, obj.pop(old))


def _head(manifest: dict) -> dict:
    return cluster_spec(manifest)["headGroupSpec"]


def _worker(manifest: dict) -> dict:
    return cluster_spec(manifest)["workerGroupSpecs"][0]


def _worker_container(manifest: dict) -> dict:
    return _worker(manifest)["template"]["spec"]["containers"][0]


def _broken(kind: str, where, change) -> dict:
    manifest = copy.deepcopy(load(CLUSTER / "kuberay" / KUBERAY[kind]))
    change(where(manifest))
    return manifest


@pytest.mark.parametrize("kind, where, change, field", [
    ("RayCluster", _head, _rename("rayStartParams", "rayStartParms"), "spec.headGroupSpec.rayStartParms"),
    ("RayCluster", _worker_container, _rename("volumeMounts", "volumeMount"),
     "spec.workerGroupSpecs[0].template.spec.containers[0].volumeMount"),
    ("RayJob", lambda m: m["spec"], _rename("shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
     "spec.shutdownAfterJobFinish"),
    ("RayJob", _head, lambda g: g["template"].setdefault("metadata", {}).__setitem__("label", {"a": "b"}),
     "spec.rayClusterSpec.headGroupSpec.template.metadata.label"),
    ("RayService", lambda m: m["spec"]["rayClusterConfig"], _rename("rayVersion", "rayVerison"),
     "spec.rayClusterConfig.rayVerison"),
    ("RayService", lambda m: m["metadata"], _set("label", {"a": "b"}), "metadata.label"),
], ids=["raycluster-rayStartParms", "raycluster-pod-template-volumeMount", "rayjob-shutdownAfterJobFinish",
        "rayjob-pod-template-metadata-label", "rayservice-rayVerison", "rayservice-metadata-label"])
def test_kuberay_schema_refuses_a_misspelt_field_as_kubectl_strict_does(kind, where, change, field):
    broken = _broken(kind, where, change)
    kuberay_schema.validate(broken, K8S_VERSION, strict=False)  # the CRD's schema alone lets it through
    with pytest.raises(kuberay_schema.KubeRayValidationError) as refused:
        kuberay_schema.validate(broken, K8S_VERSION)
    assert refused.value.errors == [f'unknown field "{field}"']


@pytest.mark.parametrize("kind, where, change, message", [
    ("RayCluster", _worker, _set("replicas", "two"), "spec.workerGroupSpecs[0].replicas: 'two' is not of type 'integer'"),
    ("RayCluster", _worker, _set("replicas", 2 ** 31), "spec.workerGroupSpecs[0].replicas: 2147483648 is not a 'int32'"),
    ("RayJob", _head, _set("template", "ray-head"),
     "spec.rayClusterSpec.headGroupSpec.template: 'ray-head' is not of type 'object'"),
    ("RayJob", lambda m: m["spec"], _set("shutdownAfterJobFinishes", "yes"),
     "spec.shutdownAfterJobFinishes: 'yes' is not of type 'boolean'"),
    ("RayService", lambda m: m["spec"]["rayClusterConfig"], _set("workerGroupSpecs", {"gpu": {}}),
     "spec.rayClusterConfig.workerGroupSpecs: {'gpu': {}} is not of type 'array'"),
    ("RayCluster", lambda m: _worker_container(m)["resources"]["limits"], _set("nvidia.com/gpu", "eight"),
     "spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.nvidia.com/gpu: 'eight' does not match"),
    ("RayCluster", lambda m: _worker(m)["template"]["spec"]["containers"], lambda c: c.append(copy.deepcopy(c[0])),
     "spec.workerGroupSpecs[0].template.spec.containers: [1]: duplicate entries for key [name='ray-worker']"),
    ("RayCluster", lambda m: m, _set("apiVersion", "ray.io/v1alpha1"), "apiVersion: 'ray.io/v1' was expected"),
    ("RayJob", lambda m: m["metadata"], _set("name", "dtrain_pipeline"), "metadata.name: 'dtrain_pipeline' does not match"),
], ids=["replicas-string", "replicas-over-int32", "template-string", "bool-string", "list-as-object", "bad-quantity",
        "duplicate-container", "api-version", "metadata-name"])
def test_kuberay_schema_refuses_a_wrong_type_or_value(kind, where, change, message):
    with pytest.raises(kuberay_schema.KubeRayValidationError) as refused:
        kuberay_schema.validate(_broken(kind, where, change), K8S_VERSION)
    assert len(refused.value.errors) == 1 and refused.value.errors[0].startswith(message), refused.value.errors


@pytest.mark.parametrize("kind", KUBERAY)
def test_kuberay_cluster_spec_reads_as_rays_autoscaler_reads_it(kind):
    """Ray's KubeRay autoscaler turns the RayCluster spec into its node types and validates them."""
    manifest = load(CLUSTER / "kuberay" / KUBERAY[kind])
    spec = cluster_spec(manifest)
    config = _derive_autoscaling_config_from_ray_cr(as_ray_cr(manifest))
    gpu_groups = [g["groupName"] for g in spec["workerGroupSpecs"]]
    for group in spec["workerGroupSpecs"]:
        node = config["available_node_types"][group["groupName"]]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert node["resources"]["GPU"] == int(limits["nvidia.com/gpu"]) >= 1
        assert node["min_workers"] <= node["max_workers"]
    head = config["available_node_types"]["headgroup"]
    assert head["resources"].get("GPU", 0) == 0 and gpu_groups
    assert spec["authOptions"]["mode"] == "token" and spec["rayVersion"].startswith("2.")


@pytest.mark.parametrize("kind", KUBERAY)
def test_kuberay_secrets_come_from_kubernetes_secrets_never_literals(kind):
    spec = cluster_spec(load(CLUSTER / "kuberay" / KUBERAY[kind]))
    for template in pod_templates(spec).values():
        for env in template["spec"]["containers"][0].get("env", []):
            if env["name"] in SECRET_VARS:
                assert "value" not in env and "secretKeyRef" in env["valueFrom"], env


def test_rayjob_entrypoint_runs_the_pipeline_with_a_config_that_loads():
    job = load(CLUSTER / "kuberay" / "rayjob.yaml")
    RuntimeEnv(**yaml.safe_load(job["spec"]["runtimeEnvYAML"]))
    commands = [shlex.split(c) for c in job["spec"]["entrypoint"].split("&&")]
    pipeline = next(c for c in commands if c[:2] == ["dtrain", "pipeline"])
    p = load_pipeline(ROOT / pipeline[2], pipeline[3:])  # every stage's config validated, overrides included
    assert "scaling.address=auto" in p.overrides and "scaling.use_gpu=true" in p.overrides
    assert any(o.startswith("train.storage_path=/mnt/shared") for o in p.overrides)
    data = next(c for c in commands if c[:3] == ["dtrain", "data", "digits"])
    assert data[data.index("--out") + 1].startswith("/mnt/shared")  # every pod reads the same shards


def test_rayservice_serve_config_is_serve_digits_yaml_on_the_shared_volume():
    service = load(CLUSTER / "kuberay" / "rayservice.yaml")
    deployed = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.parse_obj(deployed)  # Ray Serve's own schema, as `serve deploy` and KubeRay use
    local = load(ROOT / "serve" / "digits.yaml")
    (app,), (local_app,) = deployed["applications"], local["applications"]
    assert {k: app[k] for k in ("name", "route_prefix", "import_path")} == \
        {k: local_app[k] for k in ("name", "route_prefix", "import_path")}
    args, local_args = ServeArgs(**app["args"]), ServeArgs(**local_app["args"])  # our schema: no stray keys
    assert args.models.keys() == local_args.models.keys()
    for name, model in args.models.items():
        here = local_args.models[name]
        assert (model.default, model.fallback) == (here.default, here.fallback)
        assert model.versions.keys() == here.versions.keys()
        for version, path in model.versions.items():  # the same run, on the volume every pod mounts
            assert path.startswith("/mnt/shared/") and path.endswith(here.versions[version])
    assert args.replica_gpus == 1 and args.autoscaling.max_replicas >= local_args.autoscaling.max_replicas


def test_serve_schema_refuses_a_misspelt_key():
    deployed = yaml.safe_load(load(CLUSTER / "kuberay" / "rayservice.yaml")["spec"]["serveConfigV2"])
    deployed["applications"][0]["import_pth"] = deployed["applications"][0].pop("import_path")
    with pytest.raises(Exception, match="import_pth|import_path"):
        ServeDeploySchema.parse_obj(deployed)


# ---- shared storage ----

def shared_storage() -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / "shared-storage.yaml").read_text()) if d]


def test_shared_storage_passes_kubernetes_strict_schema():
    documents = shared_storage()
    assert [d["kind"] for d in documents] == ["PersistentVolumeClaim"]
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    (claim,) = documents
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod of every node mounts it
    assert claim["metadata"]["name"] == "dtrain-shared"  # the claim the manifests' pods mount
    for kind in KUBERAY:
        for template in pod_templates(cluster_spec(load(CLUSTER / "kuberay" / KUBERAY[kind]))).values():
            claims = [v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]
                      if "persistentVolumeClaim" in v]
            assert claims == ["dtrain-shared"], (kind, template)


@pytest.mark.parametrize("change", [
    lambda spec: spec.__setitem__("accessMode", spec.pop("accessModes")),  # misspelt
    lambda spec: spec.__setitem__("accessModes", "ReadWriteMany"),  # a string where a list is
    lambda spec: spec["resources"].__setitem__("requests", ["500Gi"]),  # a list where a map is
], ids=["misspelt-accessMode", "accessModes-string", "requests-list"])
def test_kubernetes_strict_schema_refuses_a_broken_shared_storage(change):
    (claim,) = copy.deepcopy(shared_storage())
    change(claim["spec"])
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(claim, K8S_VERSION, strict=True)
