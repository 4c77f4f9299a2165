"""The ValuationRun schema: one pydantic model drives CLI validation, the CRD and the worker config."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from .errors import BadInput
from .layout import check_uri
from .payout import PERIOD_PATTERN, PayoutError, currency_exponent, parse_amount
from .shapley import method_names

API_VERSION = "datacredit.dev/v1alpha1"
KIND = "ValuationRun"
DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"

PropertyName = str  # properties are pluggable by name; the worker checks the name against its registry


class _Model(BaseModel):
    """Base: camelCase keys in YAML, unknown keys refused (typos are errors, not silently ignored)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class Architecture(_Model):
    """UNet shape used when the model is trained from scratch."""

    sample_size: Annotated[int, Field(ge=4, le=1024, description="Image side in pixels the model works at.")] = 16
    block_out_channels: Annotated[
        list[Annotated[int, Field(ge=4, le=4096)]],
        Field(min_length=1, max_length=6, description="Output channels of each UNet block."),
    ] = [32, 64]
    layers_per_block: Annotated[int, Field(ge=1, le=4)] = 1
    attention: Annotated[
        bool, Field(description="Self-attention in every down block but the first (mirrored in the up blocks) "
                                "and in the mid block.")
    ] = True
    attention_blocks: Annotated[
        list[bool] | None,
        Field(max_length=6, description="Per down block, whether it has self-attention (the up blocks mirror it); "
                                        "overrides `attention` for the blocks. The paper's CIFAR UNet: "
                                        "[false, true, false, false]."),
    ] = None
    norm_num_groups: Annotated[
        int, Field(ge=1, le=64, description="GroupNorm groups; every width must be a multiple (the paper: 32).")
    ] = 8

    @model_validator(mode="after")
    def _shape(self) -> Architecture:
        widths = self.block_out_channels
        if any(w % self.norm_num_groups for w in widths):
            raise ValueError(f"every width in blockOutChannels {widths} must be a multiple of normNumGroups="
                             f"{self.norm_num_groups}")
        if self.attention_blocks is not None and len(self.attention_blocks) != len(widths):
            raise ValueError(f"attentionBlocks has {len(self.attention_blocks)} entries for {len(widths)} blocks "
                             "(one per blockOutChannels entry)")
        return self


class TrainSpec(_Model):
    """Training of the full model when no checkpoint is given."""

    steps: Annotated[int, Field(ge=1, le=10_000_000)] = 1500
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 2e-3
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 64


class LoraSpec(_Model):
    """The LoRA adapter of family sd-lora (peft), trained on all contributors."""

    rank: Annotated[int, Field(ge=1, le=4096, description="LoRA rank r (the paper: 256).")] = 16
    alpha: Annotated[float | None, Field(gt=0, description="LoRA alpha; empty: equal to the rank.")] = None
    target_modules: Annotated[
        list[Annotated[str, Field(min_length=1)]],
        Field(min_length=1, description="UNet module names the adapter wraps (attention projections)."),
    ] = ["to_q", "to_k", "to_v", "to_out.0"]
    checkpoint: Annotated[
        str | None,
        Field(description="The LoRA trained on all contributors (peft folder, path or s3:// URI). Empty: train it."),
    ] = None


class _FamilyModel(_Model):
    """What every model family's section has; each family's own fields and checks live in its subclass."""

    checkpoint: Annotated[
        str | None,
        Field(description="ddpm/ldm: diffusers UNet folder, empty to train from scratch; sd-lora: the Stable "
                          "Diffusion pipeline folder (required). Path or s3:// URI."),
    ] = None
    train: TrainSpec = TrainSpec()

    def uris(self) -> list[tuple[str, str | None]]:
        """(field, URI) of every model file prepare reads; `validate` checks that they exist."""
        return [("spec.model.checkpoint", self.checkpoint)]

    def default_caption(self) -> str:
        """The caption of an image without one (only text-conditional families use captions)."""
        return ""

    def hash_view(self) -> dict[str, Any]:
        """The section as the config hash sees it: the fields of the flat model section that came before the
        families had their own, at their defaults where this family has none, so older runs keep their folders."""
        legacy = {"autoencoder": None, "lora": LoraSpec().model_dump(mode="json"), "prompt": "",
                  "architecture": Architecture().model_dump(mode="json")}
        return {**legacy, **self.model_dump(mode="json")}


class DdpmModel(_FamilyModel):
    """ddpm: a pixel-space UNet (diffusers UNet2DModel), loaded from a checkpoint or trained from scratch."""

    family: Annotated[Literal["ddpm"], Field(description="ddpm: pixel UNet; ldm: UNet on VQ-VAE latents; "
                                                         "sd-lora: Stable Diffusion plus a LoRA.")] = "ddpm"
    architecture: Architecture = Architecture()


class LdmModel(_FamilyModel):
    """ldm: a UNet on the latents of a VQ-VAE (diffusers VQModel); the autoencoder is kept frozen."""

    family: Literal["ldm"]
    autoencoder: Annotated[
        str, Field(min_length=1, description="ldm: the VQ-VAE (diffusers VQModel folder, path or s3:// URI).")
    ]
    architecture: Architecture = Architecture()

    def uris(self) -> list[tuple[str, str | None]]:
        return [*super().uris(), ("spec.model.autoencoder", self.autoencoder)]


class SdLoraModel(_FamilyModel):
    """sd-lora: a Stable Diffusion pipeline, frozen, plus a LoRA adapter trained on the contributors' data."""

    family: Literal["sd-lora"]
    checkpoint: Annotated[
        str, Field(min_length=1, description="sd-lora: the Stable Diffusion pipeline folder (path or s3:// URI).")
    ]
    lora: LoraSpec = LoraSpec()
    prompt: Annotated[
        str, Field(max_length=1000, description="sd-lora: caption of images without one, and the sampling prompt.")
    ] = ""

    def uris(self) -> list[tuple[str, str | None]]:
        return [*super().uris(), ("spec.model.lora.checkpoint", self.lora.checkpoint)]

    def default_caption(self) -> str:
        return self.prompt


#: The model families' spec sections by ``model.family``: a new family adds its subclass here.
FAMILY_MODELS: dict[str, type[_FamilyModel]] = {"ddpm": DdpmModel, "ldm": LdmModel, "sd-lora": SdLoraModel}
DEFAULT_FAMILY = "ddpm"


def _family_of(value: Any) -> str:
    """The tag of a model section: its ``family`` (ddpm when left out)."""
    family = value.get("family", DEFAULT_FAMILY) if isinstance(value, dict) else getattr(value, "family", None)
    return str(family or DEFAULT_FAMILY)


ModelSpec = Annotated[
    Union[tuple(Annotated[cls, Tag(name)] for name, cls in FAMILY_MODELS.items())],  # noqa: UP007 (built at run time)
    Discriminator(_family_of, custom_error_type="family",
                  custom_error_message=f"unknown model family; known: {', '.join(FAMILY_MODELS)}"),
    Field(description="The trained model to credit (or how to train it); its fields depend on `family`."),
]


class ContributorsSpec(_Model):
    """How images are assigned to contributors."""

    by: Literal["folder", "manifest", "filename-prefix"] = "folder"
    manifest: Annotated[str | None, Field(description="CSV with columns path,contributor (by: manifest).")] = None
    separator: Annotated[str, Field(min_length=1, max_length=8, description="Prefix separator.")] = "_"

    @model_validator(mode="after")
    def _manifest_needed(self) -> ContributorsSpec:
        if self.by == "manifest" and not self.manifest:
            raise ValueError("contributors.by is 'manifest' but contributors.manifest (a CSV path or URI) is empty")
        return self


class DatasetSpec(_Model):
    """Training images and their contributors."""

    images: Annotated[str, Field(min_length=1, description="Folder or s3:// prefix holding PNG/JPEG images.")]
    contributors: ContributorsSpec = ContributorsSpec()
    channels: Literal[1, 3] = 1
    resolution: Annotated[
        int | None,
        Field(ge=4, le=4096, description="Side in pixels images are resized to; empty: what the model works at "
                                         "(sampleSize for ddpm, sampleSize x the autoencoder's factor otherwise)."),
    ] = None
    captions: Annotated[
        Literal["none", "sidecar"],
        Field(description="sidecar: each image's caption is in a .txt file with the same name (sd-lora)."),
    ] = "none"


class PropertySpec(_Model):
    """The global property F of generated samples; higher is better."""

    name: Annotated[
        PropertyName,
        Field(min_length=1, max_length=200,
              description="quality, diversity, fid, inception-score, cluster-entropy, classifier-entropy, "
                          "aesthetic, or a user's function as module:function."),
    ] = "quality"
    samples: Annotated[int, Field(ge=4, le=1_000_000, description="Images generated per coalition.")] = 256
    reference: Annotated[
        str | None,
        Field(description="Real images the property compares with (folder or s3:// prefix; class subfolders "
                          "give labels). Empty: the training images, where the property allows it."),
    ] = None
    weights: Annotated[
        str | None,
        Field(description="Feature network (path or s3:// URI): Inception-v3 state dict (fid, inception-score), "
                          "embedding model folder (cluster-entropy), classifier (classifier-entropy), CLIP "
                          "vision model folder (aesthetic)."),
    ] = None
    head: Annotated[
        str | None, Field(description="aesthetic: the linear head on CLIP image embeddings (state dict).")
    ] = None
    quantile: Annotated[
        float | None, Field(ge=0, le=1, description="aesthetic: score quantile over samples (the paper: 0.9).")
    ] = None
    clusters: Annotated[
        int | None, Field(ge=2, le=10_000, description="cluster-entropy: reference clusters (default 20).")
    ] = None
    options: Annotated[
        dict[str, str],
        Field(description="Extra string options for the property (a module:function gets them in its context)."),
    ] = {}


class PruneSpec(_Model):
    """Structured pruning of the full model and its fine-tuning on all data."""

    ratio: Annotated[
        float, Field(gt=0, lt=1, description="Fraction of channels removed (sd-lora: of LoRA rank components).")
    ] = 0.3
    importance: Literal["magnitude"] = "magnitude"
    finetune_steps: Annotated[int, Field(ge=0, le=10_000_000)] = 400


class FinetuneSpec(_Model):
    """Per-coalition fine-tuning of the sparsified model."""

    steps: Annotated[int, Field(ge=1, le=10_000_000)] = 150
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 1e-3
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 64


class SamplerSpec(_Model):
    """How samples are generated."""

    name: Literal["ddim"] = "ddim"
    steps: Annotated[int, Field(ge=1, le=1000)] = 25
    guidance_scale: Annotated[
        float, Field(ge=0, le=50, description="sd-lora: classifier-free guidance scale (1: none).")
    ] = 7.5


class MethodSpec(_Model):
    """Sparsified fine-tuning settings."""

    prune: PruneSpec = PruneSpec()
    finetune: FinetuneSpec = FinetuneSpec()
    sampler: SamplerSpec = SamplerSpec()
    common_random_numbers: Annotated[
        bool,
        Field(description="Every coalition shares the randomness that does not depend on its data (fine-tuning "
                          "timesteps and noise, sampling noise), so utilities differ by data, not by luck."),
    ] = True
    null_inits: Annotated[
        int,
        Field(ge=1, le=1024, description="ddpm, ldm: v(∅) is the property of the untrained model; its samples are "
                                         "split over this many random initialisations, so v(∅) measures the "
                                         "untrained architecture rather than one lucky or unlucky draw."),
    ] = 16


class ReplicateSpec(_Model):
    """Coalitions evaluated again under independent seeds: they measure the between-seed part of the intervals."""

    coalitions: Annotated[
        int, Field(ge=0, le=1000, description="Coalitions replicated besides ∅ (spread over sizes; 0: none).")
    ] = 4
    seeds: Annotated[int, Field(ge=0, le=100, description="Extra seeds each replicated coalition is evaluated "
                                                          "under (0: no replicates, intervals from residuals).")] = 2


class EstimatorSpec(_Model):
    """Which coalitions to evaluate and how Shapley values are fitted."""

    name: Annotated[str, Field(description="The estimator (datacredit.shapley.registry): kernel, exact, permutation, "
                                           "banzhaf, loo, or one registered with register_method.",
                               json_schema_extra=lambda schema: schema.update(enum=list(method_names())))] = "kernel"
    budget: Annotated[
        int, Field(ge=2, le=100_000, description="Most coalitions evaluated, ∅ and full set included.")
    ] = 64
    tolerance: Annotated[
        float, Field(gt=0, le=1, description="Stop when the widest 95% interval < tolerance × value range.")
    ] = 0.02
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    replicates: ReplicateSpec = ReplicateSpec()
    stop: Annotated[
        Literal["interval", "topK", "sign"],
        Field(description="The question that ends the run early: interval (every 95% interval within tolerance), "
                          "topK (the topK best and topK worst contributors known at 95%), sign (every value's "
                          "sign known at 95%). kernel, permutation and banzhaf can stop early; exact and loo "
                          "always use their whole design."),
    ] = "interval"
    top_k: Annotated[
        int | None, Field(ge=1, le=10_000, description="stop: topK: how many best and worst contributors.")
    ] = None

    @field_validator("name")
    @classmethod
    def _known_method(cls, name: str) -> str:
        if name not in method_names():
            raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(method_names())}")
        return name

    @model_validator(mode="after")
    def _top_k_with_its_question(self) -> EstimatorSpec:
        if self.stop == "topK" and self.top_k is None:
            raise ValueError("stop: topK needs topK, the number of best and worst contributors to identify")
        if self.stop != "topK" and self.top_k is not None:
            raise ValueError(f"topK only applies to stop: topK (stop is {self.stop!r})")
        return self


class Resources(_Model):
    """Resources of each worker pod; GPU requests equal limits."""

    gpu: Annotated[int, Field(ge=0, le=64)] = 1
    cpu: Annotated[str, Field(pattern=QUANTITY)] = "8"
    memory: Annotated[str, Field(pattern=QUANTITY)] = "32Gi"


class ExecutionSpec(_Model):
    """Where and how the worker steps run."""

    parallelism: Annotated[int, Field(ge=1, le=1024, description="Coalitions evaluated at once.")] = 2
    image: Annotated[str, Field(min_length=1)] = "registry.example.com/datacredit-worker:0.1.0"
    resources: Resources = Resources()
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    priority_class_name: str = ""
    queue_name: Annotated[str, Field(description="Kueue LocalQueue; sets the kueue.x-k8s.io/queue-name label.")] = ""
    service_account_name: str = ""
    coalitions_per_job: Annotated[int | None, Field(
        ge=1, le=256, description="Coalitions one worker fine-tunes and samples together as one packed program "
                                  "(one Job per batch). Unset: chosen from the pruned model's size and "
                                  "resources.memory (datacredit/packing.py); 1 turns packing off.")] = None
    precision: Annotated[Literal["fp32", "bf16"], Field(
        description="bf16: packed coalitions run the UNet under bf16 autocast (faster on GPUs, slower on most CPUs; "
                    "values move within bf16 rounding).")] = "fp32"
    compile: Annotated[bool, Field(description="torch.compile the packed UNet (pays off for long runs on GPUs).")] \
        = False
    max_attempts_per_coalition: Annotated[int, Field(ge=1, le=20)] = 3
    max_failed_coalitions: Annotated[
        int, Field(ge=0, le=100_000, description="Coalitions failed for good before the run fails.")
    ] = 3
    active_deadline_seconds: Annotated[int, Field(ge=60, le=30 * 24 * 3600)] = 7200
    ttl_seconds_after_finished: Annotated[int, Field(ge=0, le=30 * 24 * 3600)] = 3600


class StorageSpec(_Model):
    """Run storage: the single source of truth."""

    uri: Annotated[
        str, Field(min_length=1, max_length=1024, description="Local path, file:// or s3://bucket/prefix.")
    ] = "./runs"
    endpoint: Annotated[str, Field(description="S3 endpoint URL for MinIO/Ceph; empty for AWS.")] = ""
    region: str = ""
    path_style: Annotated[bool, Field(description="Path-style S3 addressing (MinIO needs it).")] = True
    credentials_secret: Annotated[
        str, Field(description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for the Jobs.")
    ] = ""
    retain: Annotated[
        bool, Field(description="false: the operator deletes the run's folder (<uri>/<namespace>/<run>-<uid>) when "
                                "the ValuationRun is deleted; true keeps results after the object is gone.")
    ] = True

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str) -> str:
        return check_uri(v)


def _amount_text(value: Any) -> Any:
    """An amount given as a YAML number as its decimal text (``0.1`` stays ``"0.1"``); strings as they are."""
    if isinstance(value, bool):
        raise ValueError("expected a decimal amount such as 10000 or \"10000.50\", not true/false")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return value


Amount = Annotated[str, BeforeValidator(_amount_text)]


class PayoutSpec(_Model):
    """Pay the contributors when the run finishes, as `datacredit payout` does: payouts/<period>.json, .csv, .png."""

    currency: Annotated[
        str, Field(pattern=r"^[A-Za-z]{3}$", description="ISO 4217 code; sets the minor unit (USD 2 decimals, "
                                                          "JPY 0, KWD 3).")
    ] = "USD"
    pool: Annotated[
        Amount, Field(description="What to pay out, in currency units, at most the currency's decimals: 10000 or "
                                  "\"10000.50\" (a decimal in quotes: money is exact, a YAML float is not).")
    ]
    floor: Annotated[
        Amount, Field(description="Minimum payout in currency units; smaller amounts are carried over to the "
                                  "next period (`datacredit payout --carry`) and their share goes to the others.")
    ] = "0"
    rule: Annotated[
        Literal["shapley", "blend", "lower-bound", "pro-rata"],
        Field(description="shapley: share of the positive values; pro-rata: share of images; blend: alpha x image "
                          "share + (1 - alpha) x value share; lower-bound: pays on max(ci95 low, 0), the rest in "
                          "escrow."),
    ] = "shapley"
    alpha: Annotated[
        float | None,
        Field(ge=0, le=1, description="blend only: weight of the image-count share; empty: from the interval "
                                      "widths."),
    ] = None
    period: Annotated[
        str | None,
        Field(pattern=PERIOD_PATTERN, description="Name of the payout (payouts/<period>.*), e.g. 2025-06; empty: "
                                                  "the UTC date the run finished."),
    ] = None

    @field_validator("period", mode="before")
    @classmethod
    def _date_text(cls, v: Any) -> Any:
        """An unquoted YAML date (``period: 2025-06-30``) as its text."""
        return v.isoformat() if isinstance(v, dt.date) and not isinstance(v, dt.datetime) else v

    @field_validator("pool", "floor")
    @classmethod
    def _minor_units(cls, v: str, info: ValidationInfo) -> str:
        if "currency" not in info.data:  # the currency is invalid (and reported): no minor unit to check against
            return v
        try:
            minor = parse_amount(v, currency_exponent(info.data["currency"]), info.field_name or "amount")
        except PayoutError as e:
            raise ValueError(str(e)) from None
        if info.field_name == "pool" and minor <= 0:
            raise ValueError(f"pool {v!r} must be positive")
        if info.field_name == "floor":
            if minor < 0:
                raise ValueError(f"floor {v!r} must not be negative")
            pool = info.data.get("pool")
            if pool is not None and minor > parse_amount(pool, currency_exponent(info.data["currency"])):
                raise ValueError(f"floor {v!r} is more than the pool {pool!r}")
        return v

    @field_validator("alpha")
    @classmethod
    def _blend_only(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("rule", "blend") != "blend":
            raise ValueError(f"alpha only applies to rule blend (rule is {info.data['rule']!r})")
        return v


class ValuationRunSpec(_Model):
    """What to value, with which method, where."""

    model: ModelSpec = DdpmModel()
    dataset: DatasetSpec
    property: PropertySpec = PropertySpec()
    method: MethodSpec = MethodSpec()
    estimator: EstimatorSpec = EstimatorSpec()
    execution: ExecutionSpec = ExecutionSpec()
    storage: StorageSpec = StorageSpec()
    seed: Annotated[int, Field(ge=0, le=2**31 - 1, description="Seed of training, fine-tuning and sampling.")] = 0
    suspend: Annotated[bool, Field(description="Stop starting new Jobs (operator only).")] = False
    payout: Annotated[
        PayoutSpec | None,
        Field(description="Pay the contributors from the values when the run finishes (payouts/ in storage; "
                          "the operator shows a summary in status.payout). Not part of the config hash: "
                          "changing it re-runs no coalition."),
    ] = None


class Metadata(BaseModel):
    """Kubernetes object metadata; the API server adds fields we keep but ignore."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS1123)]
    namespace: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS1123)] = "default"


class ValuationRun(BaseModel):
    """A ValuationRun manifest, exactly what `kubectl apply` and `datacredit run` take."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)
    api_version: Annotated[Literal["datacredit.dev/v1alpha1"], Field(alias="apiVersion")] = API_VERSION
    kind: Literal["ValuationRun"] = KIND
    metadata: Metadata
    spec: ValuationRunSpec
    status: dict[str, Any] | None = None

    def config_hash(self) -> str:
        """Hash of everything that changes utilities (not execution, storage or payout): names the run and
        coalitions."""
        s = self.spec
        keyed = {k: getattr(s, k).model_dump(mode="json") for k in ("dataset", "property", "method")}
        keyed["model"] = s.model.hash_view()
        keyed["seed"] = s.seed
        return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()

    def to_manifest(self) -> dict[str, Any]:
        """The manifest as a dict with camelCase keys, defaults filled in."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})


class SpecError(BadInput):
    """A manifest failed validation; `problems` lists (field path, reason)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {path}: {msg}" for path, msg in problems)
        super().__init__(f"{source}: {len(problems)} invalid field(s)\n{lines}")


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def _untagged(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The field path without the family tag pydantic puts after `model` (spec.model.ldm.autoencoder)."""
    return tuple(p for i, p in enumerate(loc) if not (i and loc[i - 1] == "model" and p in FAMILY_MODELS))


def _problem(err: Any) -> tuple[str, str]:
    """(field path, reason) of one pydantic error."""
    loc, msg = _untagged(err["loc"]), err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = _unknown_field(err["loc"])
    elif err["type"] == "family":  # the tag did not match: name the field that holds it
        loc, msg = (*loc, "family"), f"{err['input'].get('family')!r}: {msg}" if isinstance(err["input"], dict) else msg
    return _loc(loc), msg


def _unknown_field(loc: tuple[Any, ...]) -> str:
    """Why a key is refused: a typo, or a field of another model family than the one named."""
    if len(loc) >= 2 and loc[-2] in FAMILY_MODELS:
        owners = [name for name, cls in FAMILY_MODELS.items()
                  if any(loc[-1] in (f, info.alias) for f, info in cls.model_fields.items())]
        if owners:
            return f"not a field of model family {loc[-2]!r} (it belongs to {', '.join(owners)})"
    return "unknown field (check the spelling; keys are camelCase)"


def parse_manifest(data: Any, source: str = "manifest") -> ValuationRun:
    """Validate a manifest dict; raise SpecError naming every invalid field."""
    if not isinstance(data, dict):
        raise SpecError(source, [("(root)", "expected a YAML mapping with apiVersion, kind, metadata, spec")])
    try:
        return ValuationRun.model_validate(data)
    except ValidationError as e:
        raise SpecError(source, [_problem(err) for err in e.errors()]) from None


MAX_MANIFEST_BYTES = 1 << 20  # the API server's own limit on an object is about 1.5 MB


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases: a few lines of `*ref` can expand to gigabytes ("billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in a manifest", mark)
        return super().compose_node(parent, index)


def load_manifest(path: str | Path) -> ValuationRun:
    """Read and validate a YAML manifest file (exactly one ValuationRun document, at most 1 MiB, no aliases)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(str(p), [("(file)", "no such file")])
    if (size := p.stat().st_size) > MAX_MANIFEST_BYTES:
        raise SpecError(str(p), [("(file)", f"{size:,} bytes, more than {MAX_MANIFEST_BYTES:,}: not a manifest?")])
    try:
        docs = [d for d in yaml.load_all(p.read_text(encoding="utf-8"), Loader=_NoAliasLoader) if d is not None]
    except UnicodeDecodeError as e:
        raise SpecError(str(p), [("(file)", f"not UTF-8 text ({e.reason} at byte {e.start})")]) from None
    except yaml.YAMLError as e:
        raise SpecError(str(p), [("(yaml)", str(e).replace("\n", " "))]) from None
    if len(docs) != 1:
        raise SpecError(str(p), [("(file)", f"expected exactly one YAML document, found {len(docs)}")])
    return parse_manifest(docs[0], str(p))
