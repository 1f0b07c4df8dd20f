"""KubeRay custom resources checked against the CRDs' own schemas, as strictly as `kubectl apply
--validate=strict` checks them (the API server's strict field validation).

cluster/kuberay/schemas/ray.io-v1.json holds the `openAPIV3Schema` of the served `ray.io/v1` version
of KubeRay v1.6.2's RayCluster, RayJob and RayService CRDs (README.md there says where they come from).
`derive` below writes it; run `python -m tests.kuberay_schema <dir with ray.io_*.yaml>` to regenerate.

An OpenAPI schema alone lets unknown fields through; the API server prunes them and, under strict
validation, refuses them. So every object schema that neither preserves unknown fields nor says what
its other keys hold (`additionalProperties`) gets `additionalProperties: false`, pod templates and
all. Also kept from the API server: `nullable`, `x-kubernetes-int-or-string`, `int32`/`int64`
ranges, unique keys of `x-kubernetes-list-type: map` and `set` lists, and `metadata` as Kubernetes'
own ObjectMeta (from kubernetes-validate's strict schemas) with a DNS-1123 `name`.
Not evaluated: the few CEL rules (`x-kubernetes-validations`) and the operator's own checks.
"""
from __future__ import annotations

import copy
import functools
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import jsonschema
from referencing import Registry, Resource

SCHEMAS = Path(__file__).resolve().parent.parent / "cluster" / "kuberay" / "schemas"
SCHEMA_FILE = SCHEMAS / "ray.io-v1.json"
KUBERAY_RELEASE = "v1.6.2"
API_VERSION = "ray.io/v1"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
        "RayService": "ray.io_rayservices.yaml"}
# the subschemas the three kinds repeat, each kept once in $defs: path in RayCluster's schema
SHARED = {"RayClusterSpec": ("spec",), "PodTemplateSpec": ("spec", "headGroupSpec", "template")}
K8S_DEFS = "https://kubernetes.io/api/_definitions.json"  # $id of kubernetes-validate's definitions
OBJECT_META = {"$ref": f"{K8S_DEFS}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
               "type": "object", "required": ["name"],
               "properties": {"name": {"type": "string", "maxLength": 253,  # a DNS-1123 subdomain
                                       "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}}}


class KubeRayValidationError(ValueError):
    def __init__(self, kind: str, errors: list[str]):
        self.errors = errors
        super().__init__(f"{kind}: " + "; ".join(errors))


# ---- the vendored file ----

def _subschemas(node: dict) -> Iterator[tuple[str, Any]]:
    """(keyword, value) of the schema keywords whose values hold schemas."""
    for key, value in node.items():
        if key in ("properties", "$defs"):
            yield key, value
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            yield key, value
        elif key in ("anyOf", "allOf", "oneOf"):
            yield key, value


def _map_schemas(node: Any, fn) -> Any:
    """A copy of a schema with fn applied to every schema in it, bottom up."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key, value in _subschemas(node):
        if key in ("properties", "$defs"):
            out[key] = {k: _map_schemas(v, fn) for k, v in value.items()}
        elif isinstance(value, list):
            out[key] = [_map_schemas(v, fn) for v in value]
        else:
            out[key] = _map_schemas(value, fn)
    return fn(out)


def _at(schema: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        schema = schema["properties"][key]
    return schema


def _share(node: Any, shared: dict[str, dict], skip: str | None = None) -> Any:
    """node with every subschema equal to a shared one replaced by a $ref to it (top down)."""
    if isinstance(node, dict):
        for name, schema in shared.items():
            if name != skip and node == schema:
                return {"$ref": f"#/$defs/{name}"}
        out = dict(node)
        for key, value in _subschemas(node):
            if key == "properties":
                out[key] = {k: _share(v, shared, skip) for k, v in value.items()}
            elif isinstance(value, list):
                out[key] = [_share(v, shared, skip) for v in value]
            else:
                out[key] = _share(value, shared, skip)
        return out
    return node


def _expand(node: Any, defs: dict) -> Any:
    if isinstance(node, dict):
        if set(node) == {"$ref"}:
            return _expand(defs[node["$ref"].removeprefix("#/$defs/")], defs)
        return {k: _expand(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, defs) for v in node]
    return node


def derive(crd_dir: Path) -> dict:
    """The vendored file from KubeRay's CRDs: each kind's served ray.io/v1 openAPIV3Schema, unchanged
    but for identical subschemas (the RayCluster spec, the pod template) written once in $defs."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    kinds = {}
    for kind, name in CRDS.items():
        crd = yaml.load((Path(crd_dir) / name).read_text(), Loader=loader)
        assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == API_VERSION.split("/")[0]
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == API_VERSION.split("/")[1]]
        assert version["served"], version["name"]
        kinds[kind] = version["schema"]["openAPIV3Schema"]
    shared = {name: _at(kinds["RayCluster"], path) for name, path in SHARED.items()}
    defs = {name: _share(schema, shared, skip=name) for name, schema in shared.items()}
    defs |= {kind: _share(schema, shared) for kind, schema in kinds.items()}
    for kind, schema in kinds.items():
        assert _expand(defs[kind], defs) == schema, kind  # nothing lost or changed
    return {"$comment": f"openAPIV3Schema of the {API_VERSION} RayCluster, RayJob and RayService CRDs of "
                        f"KubeRay {KUBERAY_RELEASE}, repeated subschemas written once in $defs: see README.md",
            "x-kuberay-release": KUBERAY_RELEASE, "x-api-version": API_VERSION, "$defs": defs}


# ---- strict validation ----

def _strict(node: dict) -> dict:
    """What the API server's strict field validation adds to a structural schema."""
    if node.get("type") == "object" and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False  # unknown fields are refused, not pruned
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    return node


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: a `map` list's keys and a `set` list's items are unique."""
    if not validator.is_type(instance, "array") or list_type not in ("map", "set"):
        return
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        defaults = {k: schema.get("items", {}).get("properties", {}).get(k, {}).get("default") for k in keys}
        seen = [tuple((k, item.get(k, defaults[k])) for k in keys) if isinstance(item, dict) else None
                for item in instance]
    else:
        seen = [json.dumps(item, sort_keys=True) for item in instance]
    for i, key in enumerate(seen):
        if key is not None and key in seen[:i]:
            what = ",".join(f"{k}={v!r}" for k, v in key) if list_type == "map" else key
            yield jsonschema.ValidationError(f"[{i}]: duplicate entries for key [{what}]")


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker(formats=())
    for fmt, bits in (("int32", 32), ("int64", 64)):
        checker.checks(fmt)(lambda v, bits=bits: not isinstance(v, int) or -2 ** (bits - 1) <= v < 2 ** (bits - 1))
    return checker


Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                         {"x-kubernetes-list-type": _list_type})


@functools.cache
def _k8s_definitions(k8s_version: str) -> dict:
    path = resources.files("kubernetes_validate") / "kubernetes-json-schema" / \
        f"v{k8s_version}-local-strict" / "_definitions.json"
    return json.loads(path.read_text())


@functools.cache
def vendored() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


@functools.cache
def _defs(strict: bool) -> dict:
    defs = copy.deepcopy(vendored()["$defs"])
    if strict:
        defs = {name: _map_schemas(schema, _strict) for name, schema in defs.items()}
    Validator.check_schema({"$defs": defs})  # its patterns compile, among others
    return defs


@functools.cache
def validator(kind: str, k8s_version: str, strict: bool = True) -> jsonschema.Validator:
    """A validator of one kind's manifests; strict=False checks the CRD's schema as it is."""
    root = copy.deepcopy(_defs(strict)[kind])
    root["required"] = sorted({*root.get("required", ()), "apiVersion", "kind", "metadata"})
    root["properties"] |= {"apiVersion": {"const": vendored()["x-api-version"]}, "kind": {"const": kind}}
    if strict:  # the API server checks metadata as an ObjectMeta whatever the CRD says of it
        root["properties"]["metadata"] = OBJECT_META
    root |= {"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": _defs(strict)}
    registry = Registry().with_resource(K8S_DEFS, Resource.from_contents(_k8s_definitions(k8s_version)))
    return Validator(root, registry=registry, format_checker=_format_checker())


def _where(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def validate(manifest: dict, k8s_version: str, strict: bool = True) -> None:
    """Raise KubeRayValidationError naming every field of manifest its kind's CRD schema refuses."""
    kind = manifest.get("kind")
    if kind not in CRDS:
        raise KubeRayValidationError(str(kind), [f"kind: not one of {sorted(CRDS)}"])
    errors = []
    for error in validator(kind, k8s_version, strict).iter_errors(manifest):
        where = _where(error.absolute_path)
        if error.validator == "additionalProperties" and error.validator_value is False:
            known = error.schema.get("properties", {})
            errors += [f'unknown field "{_where([*error.absolute_path, k])}"' for k in error.instance
                       if k not in known]
        else:
            errors.append(f"{where or '<root>'}: {error.message}")
    if errors:
        raise KubeRayValidationError(kind, sorted(errors))


if __name__ == "__main__":  # python -m tests.kuberay_schema <dir with KubeRay's ray.io_*.yaml CRDs>
    SCHEMA_FILE.write_text(json.dumps(derive(Path(sys.argv[1])), separators=(",", ":")) + "\n")
    print(SCHEMA_FILE, SCHEMA_FILE.stat().st_size, "bytes")
