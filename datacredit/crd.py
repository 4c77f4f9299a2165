"""The ValuationRun CustomResourceDefinition, generated from the pydantic spec (`datacredit crd`).

The spec model's JSON schema is turned into a structural OpenAPI v3.0 schema: `$ref`s inlined, `Optional`
as `nullable`, JSON-Schema 2020 exclusive bounds in their v3.0 form, `dict[str, str]` as
`additionalProperties`, free-form objects as `x-kubernetes-preserve-unknown-fields`. Cross-field checks the
model makes in Python (and a few only a cluster needs) become CEL `x-kubernetes-validations`, so the API
server refuses a bad manifest at `kubectl apply` time and names the field.
"""

from __future__ import annotations

import copy
from typing import Any

from .layout import S3_URI_PATTERN
from .run_status import RunStatus
from .spec import API_VERSION, DEFAULT_FAMILY, DNS1123, FAMILY_MODELS, KIND, ValuationRunSpec

GROUP, VERSION = API_VERSION.split("/")
PLURAL, SINGULAR = "valuationruns", "valuationrun"
NAME = f"{PLURAL}.{GROUP}"
SHORT_NAMES = ["vrun", "vruns"]
CATEGORIES = ["datacredit", "all-valuations"]

DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"  # no \ for CEL
_KEEP = (  # the keywords kept, in the order they are written
    "type", "description", "format", "nullable", "enum", "default", "minimum", "exclusiveMinimum", "maximum",
    "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems", "maxItems", "required", "properties",
    "items", "additionalProperties",
)

# CEL rules, attached to the object at a dotted path of the spec ("" = spec itself).
# Each mirrors a model validator in datacredit.spec, or says what the operator needs on a cluster.
SPEC_RULES: dict[str, list[dict[str, str]]] = {
    "dataset.contributors": [
        {
            "rule": "self.by != 'manifest' || (has(self.manifest) && size(self.manifest) > 0)",
            "message": "contributors.manifest (a CSV path or URI) is required when contributors.by is 'manifest'",
            "fieldPath": ".manifest",
        }
    ],
    "model.architecture": [
        {
            "rule": "self.blockOutChannels.all(w, w % self.normNumGroups == 0)",
            "message": "every width in blockOutChannels must be a multiple of normNumGroups (GroupNorm groups)",
            "fieldPath": ".blockOutChannels",
        }
    ],
    "estimator": [
        {
            "rule": "self.name != 'exact' || self.budget >= 4",
            "message": "estimator exact evaluates every coalition: budget must be at least 4 (2 contributors)",
            "fieldPath": ".budget",
        },
        {
            "rule": "self.stop != 'topK' || has(self.topK)",
            "message": "stop: topK needs topK, the number of best and worst contributors to identify",
            "fieldPath": ".topK",
        },
        {
            "rule": "self.stop == 'topK' || !has(self.topK)",
            "message": "topK only applies to stop: topK",
            "fieldPath": ".topK",
        },
    ],
    "storage": [
        {
            "rule": f"self.uri.matches('{S3_URI_PATTERN}')",
            "message": "the operator needs an s3://bucket/prefix URI with a valid bucket name and no '?' or '#' "
            "(local paths are for `datacredit run`)",
            "fieldPath": ".uri",
        }
    ],
    "execution": [
        {
            "rule": f"self.queueName == '' || (size(self.queueName) <= 63 && self.queueName.matches('{DNS1123}'))",
            "message": "queueName must be a Kueue LocalQueue name (a DNS-1123 label)",
            "fieldPath": ".queueName",
        },
        {
            "rule": f"self.priorityClassName == '' || self.priorityClassName.matches('{DNS1123_SUBDOMAIN}')",
            "message": "priorityClassName must be a PriorityClass name (a DNS-1123 subdomain)",
            "fieldPath": ".priorityClassName",
        },
        {
            "rule": f"self.serviceAccountName == '' || self.serviceAccountName.matches('{DNS1123_SUBDOMAIN}')",
            "message": "serviceAccountName must be a ServiceAccount name (a DNS-1123 subdomain)",
            "fieldPath": ".serviceAccountName",
        },
    ],
    "payout": [
        {
            "rule": "self.rule == 'blend' || !has(self.alpha)",
            "message": "alpha only applies to rule blend",
            "fieldPath": ".alpha",
        }
    ],
    "": [
        {
            "rule": f"{field} == oldSelf.{field.removeprefix('self.')}",
            "message": f"spec.{field.removeprefix('self.')} cannot change once the run exists (its coalitions "
            "and results depend on it): create a new ValuationRun instead",
        }
        for field in ("self.model", "self.dataset", "self.property", "self.method", "self.estimator",
                      "self.storage.uri", "self.seed")
    ],
}
STORAGE_REQUIRED = ["uri"]  # no local default on a cluster: see the storage rule
# Amounts are decimal strings or integers (a YAML float is not exact money): int-or-string in the CRD, a string
# that must be a decimal (pool: a positive one), an integer at least the minimum. The spec model checks the rest
# (the currency's decimals, floor <= pool).
AMOUNTS = {
    "payout.pool": (r"^([0-9]*[1-9][0-9]*([.][0-9]+)?|[0-9]+[.][0-9]*[1-9][0-9]*)$", 1),
    "payout.floor": (r"^[0-9]+([.][0-9]+)?$", 0),
}


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One JSON-Schema node (pydantic's) as a structural OpenAPI v3.0 node."""
    node = copy.deepcopy(node)
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {options} in a structural schema")
        node = {**options[0], **node, "nullable": True}
        if node.get("default", ...) is None:
            del node["default"]
    if "$ref" in node:  # after anyOf: an optional section is anyOf [its $ref, null]
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**copy.deepcopy(target), **node}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node[bound], bool):
            node[plain] = node[bound]
            node[bound] = True

    out: dict[str, Any] = {}
    for key in _KEEP:
        if key not in node:
            continue
        value = node[key]
        if key == "properties":
            out[key] = {name: _convert(child, defs) for name, child in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict) and value:
                out[key] = _convert(value, defs)
            elif value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
            # False: a structural schema prunes unknown fields; strict field validation refuses them.
        else:
            out[key] = value
    if isinstance(out.get("default"), dict):  # CEL rules see the default as is: keep it whole, minus nulls
        out["default"] = _without_nulls(out["default"])
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _at(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = schema
    for part in filter(None, dotted.split(".")):
        node = node["properties"][part]
    return node


def model_schema(defs: dict[str, Any]) -> dict[str, Any]:
    """`spec.model`: the families' sections (:data:`~datacredit.spec.FAMILY_MODELS`) merged into one object, as a
    structural schema has no oneOf. CEL rules then do what the tagged union does in Python: a field of another
    family is refused and each family's required fields are required. Only fields every family has keep their
    defaults (the API server would otherwise add another family's fields to every object)."""
    variants = {name: _convert({"$ref": f"#/$defs/{cls.__name__}"}, defs) for name, cls in FAMILY_MODELS.items()}
    props: dict[str, Any] = {}
    owners: dict[str, list[str]] = {}
    for name, variant in variants.items():
        for key, child in variant["properties"].items():
            owners.setdefault(key, []).append(name)
            props.setdefault(key, child)
    props["family"] = {**props["family"], "enum": list(FAMILY_MODELS), "default": DEFAULT_FAMILY}
    rules = []
    for key, families in owners.items():
        if len(families) < len(variants):
            props[key].pop("default", None)
            rules.append({"rule": f"!has(self.{key}) || self.family in {families!r}",
                          "message": f"model.{key} is a field of family {' and '.join(families)} only",
                          "fieldPath": f".{key}"})
    for name, variant in variants.items():
        for key in (k for k in variant.get("required", []) if k != "family"):
            field = variant["properties"][key]
            size = f" && size(self.{key}) > 0" if field.get("minLength") else ""
            what = field.get("description", "").removeprefix(f"{name}: ").rstrip(".")
            rules.append({"rule": f"self.family != '{name}' || (has(self.{key}){size})",
                          "message": f"family '{name}' needs model.{key}: {what}", "fieldPath": f".{key}"})
    return {"type": "object", "default": {"family": DEFAULT_FAMILY}, "properties": props,
            "x-kubernetes-validations": rules}


def spec_schema() -> dict[str, Any]:
    """The OpenAPI v3.0 schema of `.spec`, with the CEL rules attached."""
    raw = ValuationRunSpec.model_json_schema(by_alias=True, mode="validation")
    model = raw["properties"].pop("model")
    schema = _convert(raw, raw.get("$defs", {}))
    schema["properties"] = {"model": {**model_schema(raw.get("$defs", {})), "description": model["description"]},
                            **schema["properties"]}
    schema["description"] = "What to value, with which method, where (see `datacredit crd` and docs/operator.md)."
    storage = _at(schema, "storage")
    storage["required"] = STORAGE_REQUIRED
    storage["properties"]["uri"].pop("default", None)
    storage.pop("default", None)
    schema["required"] = sorted({*schema.get("required", []), "storage"})
    for path, rules in SPEC_RULES.items():
        _at(schema, path)["x-kubernetes-validations"] = rules
    for path, (pattern, minimum) in AMOUNTS.items():
        node = _at(schema, path)
        node.pop("type")
        node.update({"x-kubernetes-int-or-string": True, "pattern": pattern, "minimum": minimum})
    return schema


def status_schema() -> dict[str, Any]:
    """The bounded status the operator writes (:class:`~datacredit.run_status.RunStatus`): counts, an estimate
    summary, the top contributors and conditions (a list map keyed by type)."""
    raw = RunStatus.model_json_schema(by_alias=True, mode="serialization")
    schema = _convert(raw, raw.get("$defs", {}))
    schema["properties"]["conditions"].update({"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    return schema


def build_crd() -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CustomResourceDefinition of ValuationRun."""
    name_rule = {
        "rule": f"size(self.metadata.name) <= 63 && self.metadata.name.matches('{DNS1123}')",
        "message": "metadata.name must be a DNS-1123 label (at most 63 characters): it names Jobs and storage",
    }
    version = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "subresources": {"status": {}},
        "additionalPrinterColumns": [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
            {"name": "Progress", "type": "string", "jsonPath": ".status.progress",
             "description": "succeeded/planned coalitions"},
            {"name": "Top", "type": "string", "jsonPath": ".status.topContributor",
             "description": "contributor with the highest value so far"},
            {"name": "Estimator", "type": "string", "jsonPath": ".spec.estimator.name", "priority": 1},
            {"name": "Max-Stderr", "type": "number", "jsonPath": ".status.estimate.maxStderr", "priority": 1},
            {"name": "Fidelity", "type": "number", "jsonPath": ".status.fidelity.pearson", "priority": 1,
             "description": "Pearson r of sparsified-FT with retrained utilities (datacredit calibrate)"},
            {"name": "Payout", "type": "string", "jsonPath": ".status.payout.total", "priority": 1,
             "description": "pool paid out by spec.payout (status.payout.currency)"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        "schema": {
            "openAPIV3Schema": {
                "type": "object",
                "description": "A Shapley valuation of the data contributors of a diffusion model.",
                "required": ["spec"],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    "spec": spec_schema(),
                    "status": status_schema(),
                },
                "x-kubernetes-validations": [name_rule],
            }
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/name": "datacredit"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": PLURAL,
                "singular": SINGULAR,
                "kind": KIND,
                "listKind": f"{KIND}List",
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [version],
        },
    }


def crd_yaml() -> str:
    """The CRD as the YAML committed under crds/ (and the chart's crds-src/)."""
    import yaml

    class NoAliases(yaml.SafeDumper):  # repeated sub-schemas written out in full: no &id001 / *id001 anchors
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return yaml.dump(build_crd(), Dumper=NoAliases, sort_keys=False, width=100, allow_unicode=True)


def main() -> None:
    """`python -m datacredit.crd`: print the CRD as YAML."""
    import sys

    sys.stdout.write(crd_yaml())


if __name__ == "__main__":
    main()
