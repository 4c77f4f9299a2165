"""Workload tier: the embedding-model properties (cluster-entropy, classifier-entropy, aesthetic) with tiny
models saved in their real formats and loaded back through the property code."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")

from datacredit import layout  # noqa: E402
from datacredit.jobs.digits import digit_arrays  # noqa: E402
from datacredit.jobs.properties import get_property  # noqa: E402
from datacredit.jobs.properties.diversity import CLUSTER_FILE, entropy_bits  # noqa: E402
from datacredit.jobs.properties.registry import property_for  # noqa: E402
from datacredit.spec import PropertySpec, SpecError, parse_manifest  # noqa: E402
from datacredit.storage import S3Options, open_storage, upload_dir, write_json  # noqa: E402
from tests.tiny import TinyData, tiny_manifest  # noqa: E402
from tests.tiny_models import save_linear_head, save_tiny_clip  # noqa: E402

pytestmark = pytest.mark.workload


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIPVisionModelWithProjection folder (safetensors) with a CLIP image processor config."""
    folder = save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")
    assert (folder / "model.safetensors").exists()
    return folder


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """80 sklearn digits (N, 1, 8, 8) in [-1, 1]."""
    imgs, _ = digit_arrays()
    return torch.from_numpy(imgs[:80]).float().div(127.5).sub(1).unsqueeze(1)


_head = save_linear_head


# ---------------------------------------------------------------- cluster-entropy


def test_cluster_entropy_copies_single_bound_and_cache(clip_dir: Path, digits: torch.Tensor, tmp_path: Path) -> None:
    prop = get_property("cluster-entropy", weights=clip_dir, clusters=8)
    info = prop.fit(digits, None, tmp_path, seed=0)
    assert info["clusters"] == 8 and info["reference"] == len(digits) and info["embeddingDim"] == 16
    assert (tmp_path / CLUSTER_FILE).exists()

    copies = prop.score(digits)
    assert copies > 0.6 * math.log2(8), copies  # the reference set itself spreads over the clusters
    assert prop.score(digits[5:6].repeat(20, 1, 1, 1)) == 0.0  # one image repeated: one cluster
    noise = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for samples in (digits, noise, digits[:7]):
        assert 0.0 <= prop.score(samples) <= math.log2(8) + 1e-9

    # the assignment is the argmin of the mean dot-product distance to each cluster's members (paper's code)
    with np.load(tmp_path / CLUSTER_FILE) as z:
        ref, labels = z["embeddings"], z["labels"]
    emb = prop.embedder(noise).double().numpy()
    dist = float((ref @ ref.T).max()) - emb @ ref.T
    expected = np.array([np.argmin([dist[i, labels == c].mean() for c in range(8)]) for i in range(len(emb))])
    np.testing.assert_array_equal(prop.assign(noise), expected)
    assert prop.score(noise) == pytest.approx(entropy_bits(np.bincount(expected)))

    # a coalition worker: a fresh instance loads the cached clustering and scores identically
    again = get_property("cluster-entropy", weights=clip_dir, clusters=8)
    assert again.fit(None, None, tmp_path) == info
    assert again.embedder.model is prop.embedder.model  # loaded once per process
    assert again.score(noise) == prop.score(noise) and again.score(digits) == copies
    with pytest.raises(FileNotFoundError, match="fit the property"):
        get_property("cluster-entropy", weights=clip_dir).fit(None, None, tmp_path / "empty")


def test_blip_style_vision_model(digits: torch.Tensor, tmp_path: Path) -> None:
    """A vision model without projection or preprocessor config: pooler_output at config.image_size, CLIP mean/std."""
    from datacredit.jobs.properties.embedding import CLIP_MEAN, CLIP_STD

    torch.manual_seed(0)
    cfg = transformers.BlipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=4)
    transformers.BlipVisionModel(cfg).save_pretrained(tmp_path / "blip")
    prop = get_property("cluster-entropy", weights=tmp_path / "blip", clusters=3)
    assert prop.fit(digits[:30], None, tmp_path / "cache")["embeddingDim"] == 24
    assert 0.0 <= prop.score(digits[30:50]) <= math.log2(3) + 1e-9

    model = transformers.BlipVisionModel.from_pretrained(tmp_path / "blip").eval()
    x = torch.nn.functional.interpolate((digits[:4].repeat(1, 3, 1, 1) + 1) / 2, size=(16, 16), mode="bicubic",
                                        antialias=True, align_corners=False).clamp(0, 1)
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(prop.embedder(digits[:4]), model(pixel_values=x).pooler_output)


def test_cluster_entropy_errors(clip_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"spec\.property\.weights: required"):
        get_property("cluster-entropy")
    with pytest.raises(SpecError, match=r"spec\.property\.weights: .*no config\.json"):
        get_property("cluster-entropy", weights=tmp_path)
    with pytest.raises(SpecError, match=r"spec\.property\.options\.bogus"):
        get_property("cluster-entropy", weights=clip_dir, options={"bogus": "1"})
    with pytest.raises(SpecError, match=r"spec\.property\.options\.batch_size"):
        get_property("cluster-entropy", weights=clip_dir, options={"batch_size": "zero"})
    with pytest.raises(SpecError, match=r"spec\.property\.quantile"):  # set but not used by cluster-entropy
        property_for(PropertySpec(name="cluster-entropy", weights=str(clip_dir), quantile=0.5), lambda u, f: Path(u))
    with pytest.raises(SpecError, match=r"spec\.property\.weights"):
        property_for(PropertySpec(name="cluster-entropy", clusters=4), lambda u, f: Path(u))


# ---------------------------------------------------------------- aesthetic


def test_aesthetic_quantile_and_head(clip_dir: Path, digits: torch.Tensor, tmp_path: Path) -> None:
    head = _head(tmp_path / "head.pth", seed=0)
    samples = digits[:24]
    top = get_property("aesthetic", weights=clip_dir, head=head, quantile=1.0)
    per_image = top.scores(samples)
    assert per_image.shape == (24,) and np.ptp(per_image) > 0
    assert top.score(samples) == pytest.approx(per_image.max())
    assert get_property("aesthetic", weights=clip_dir, head=head).quantile == 0.9
    p90 = get_property("aesthetic", weights=clip_dir, head=head).score(samples)
    assert per_image.min() < p90 < per_image.max()
    assert p90 == pytest.approx(np.quantile(per_image, 0.9))

    # per-image scores = the head on L2-normalised image_embeds of the transformers processor + model
    model = transformers.CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    processor = transformers.CLIPImageProcessor.from_pretrained(clip_dir)
    rgb = [np.repeat(np.asarray((x[0] + 1) * 127.5).round().astype(np.uint8)[..., None], 3, axis=2) for x in samples]
    state = torch.load(head, weights_only=True)
    with torch.no_grad():
        emb = model(**processor(images=rgb, return_tensors="pt")).image_embeds
    emb = emb / emb.norm(dim=1, keepdim=True)
    manual = (emb @ state["weight"].T + state["bias"]).squeeze(1).numpy()
    np.testing.assert_allclose(per_image, manual, atol=0.05 * np.abs(manual).max())
    np.testing.assert_array_equal(np.argsort(per_image)[-5:], np.argsort(manual)[-5:])

    # another head (here the negated one, as .safetensors) changes the scores accordingly
    from safetensors.torch import save_file

    save_file({"weight": -state["weight"], "bias": -state["bias"]}, str(tmp_path / "neg.safetensors"))
    neg = get_property("aesthetic", weights=clip_dir, head=tmp_path / "neg.safetensors", quantile=1.0)
    assert neg.score(samples) == pytest.approx(-per_image.min(), abs=1e-5)
    other = get_property("aesthetic", weights=clip_dir, head=_head(tmp_path / "h1.pth", seed=1), quantile=1.0)
    assert not np.allclose(other.scores(samples), per_image)


def test_aesthetic_errors(clip_dir: Path, tmp_path: Path) -> None:
    head = _head(tmp_path / "head.pth", seed=0)
    with pytest.raises(SpecError, match=r"spec\.property\.head: required"):
        get_property("aesthetic", weights=clip_dir)
    with pytest.raises(SpecError, match=r"spec\.property\.weights: required"):
        get_property("aesthetic", head=head)
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(SpecError, match=r"spec\.property\.head: .*junk\.pth"):
        get_property("aesthetic", weights=clip_dir, head=tmp_path / "junk.pth")
    torch.save({"w": torch.zeros(1, 16)}, tmp_path / "keys.pth")
    with pytest.raises(SpecError, match=r"spec\.property\.head: .*weight and bias"):
        get_property("aesthetic", weights=clip_dir, head=tmp_path / "keys.pth")
    wide = get_property("aesthetic", weights=clip_dir, head=_head(tmp_path / "wide.pth", seed=0, dim=768))
    with pytest.raises(SpecError, match=r"768-d .* 16-d"):
        wide.score(torch.zeros(2, 1, 8, 8))


# ---------------------------------------------------------------- classifier-entropy


class _MeanClassifier(torch.nn.Module):
    """Class = nearest of 3 centres to the image mean; needs (N, 3, 16, 16) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("centres", torch.tensor([-0.9, 0.0, 0.9]))
        self.lin = torch.nn.Linear(3 * 16 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return -((m[:, None] - self.centres[None, :]) ** 2) + 0.0 * self.lin(x.flatten(1))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated in favour of torch.export
def test_classifier_entropy_hand_count(tmp_path: Path) -> None:
    path = tmp_path / "attr.pt"
    torch.jit.save(torch.jit.script(_MeanClassifier()), str(path))
    values = [-0.9] * 6 + [0.0] * 3 + [0.9] * 2 + [0.8]
    samples = torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    prop = get_property("classifier-entropy", weights=path, options={"size": "16", "batch_size": "5"})
    assert prop.fit(None, None, tmp_path) == {}
    counts = np.array([6, 3, 3]) / 12
    assert prop.score(samples) == pytest.approx(-(counts * np.log2(counts)).sum())
    assert prop.score(samples[:6]) == 0.0
    info = prop.fit(samples, None, tmp_path)
    assert info["classes"] == 3 and info["referenceEntropy"] == pytest.approx(prop.score(samples))
    with pytest.raises(RuntimeError):  # without options.size the 8x8 samples do not fit the classifier
        get_property("classifier-entropy", weights=path).score(samples)
    with pytest.raises(SpecError, match=r"spec\.property\.weights: required"):
        get_property("classifier-entropy")
    with pytest.raises(SpecError, match=r"spec\.property\.weights: .*TorchScript"):
        get_property("classifier-entropy", weights=tmp_path / "missing.pt")


# ---------------------------------------------------------------- weights from S3


@pytest.mark.s3
def test_weights_and_head_from_s3(s3_server, s3_env: S3Options, clip_dir: Path, digits: torch.Tensor,
                                  tmp_path: Path) -> None:
    from datacredit.jobs.worker import _fetch

    options = s3_env
    s3_server.make_bucket("props")
    store = open_storage("s3://props/models", options)
    upload_dir(store, "clip", clip_dir)
    head = _head(tmp_path / "head.pth", seed=0)
    store.write_bytes("aesthetic/head.pth", head.read_bytes())

    def fetch(uri: str, field: str) -> Path:
        return _fetch(uri, field, options)

    spec = PropertySpec(name="aesthetic", weights="s3://props/models/clip", head="s3://props/models/aesthetic/head.pth",
                        quantile=1.0)
    remote = property_for(spec, fetch)
    local = get_property("aesthetic", weights=clip_dir, head=head, quantile=1.0)
    assert remote.score(digits[:10]) == pytest.approx(local.score(digits[:10]))
    diversity = property_for(PropertySpec(name="cluster-entropy", weights="s3://props/models/clip", clusters=4), fetch)
    assert diversity.fit(digits, None, tmp_path / "cache")["clusters"] == 4
    with pytest.raises(Exception, match=r"spec\.property\.weights"):
        property_for(PropertySpec(name="cluster-entropy", weights="s3://props/models/nothing-here"), fetch)


# ---------------------------------------------------------------- end to end through the worker


def test_worker_cluster_entropy_run(tiny_data: TinyData, clip_dir: Path, tmp_path: Path) -> None:
    from datacredit.jobs.worker import run_coalition, run_prepare

    manifest = tiny_manifest("tiny-ce", str(tiny_data.images), str(tiny_data.reference), {"uri": str(tmp_path)})
    manifest["spec"]["property"] = {"name": "cluster-entropy", "samples": 32, "reference": str(tiny_data.reference),
                                    "weights": str(clip_dir), "clusters": 4}
    run = parse_manifest(manifest)
    run_uri = str(tmp_path / "run")
    store = open_storage(run_uri)
    write_json(store, layout.RUN, {"manifest": run.to_manifest(), "configHash": run.config_hash()})
    run_prepare(run_uri)
    with np.load(io.BytesIO(store.read_bytes(f"{layout.PROPERTY_CACHE}/{CLUSTER_FILE}"))) as z:
        assert sorted(set(z["labels"].tolist())) == [0, 1, 2, 3] and len(z["embeddings"]) == 60
    utilities = [run_coalition(run_uri, members)["utility"] for members in ([0, 1, 2], [3])]
    for u in utilities:
        assert math.isfinite(u) and 0.0 <= u <= 2.0 + 1e-9
    assert run_coalition(run_uri, [3])["property"] == "cluster-entropy"
