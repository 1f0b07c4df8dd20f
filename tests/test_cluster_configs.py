"""cluster/: the `ray up` YAML, the KubeRay manifests and the jobs' runtime_env, checked with the tools
their users' clusters run: Ray's autoscaler schema and its KubeRay CR reader, Ray Serve's config
schema, Ray's runtime_env, and Kubernetes' own OpenAPI schemas (kubernetes-validate, strict) for
every pod template. Each check is shown to fail on a broken copy."""
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

from dtrain.config import load_pipeline
from dtrain.serving.config import ServeArgs
from dtrain.secrets import SECRET_VARS

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
