"""Workload tier: ``fid`` and ``inception-score`` with Inception-v3 weights in torch-fidelity's real format
(random values: the real network is never downloaded), the cached FID reference statistics, weights from S3, and
one run through the worker.

Inception works at 299 x 299 (about 0.2 s per image on one CPU thread), so every test uses a handful of images.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchmetrics")
pytest.importorskip("torch_fidelity")

from datacredit import layout  # noqa: E402
from datacredit.jobs.digits import digit_arrays  # noqa: E402
from datacredit.jobs.properties import get_property  # noqa: E402
from datacredit.jobs.properties.inception import WEIGHTS_FILE, inception_network, to_uint8_rgb  # noqa: E402
from datacredit.jobs.properties.registry import property_for  # noqa: E402
from datacredit.spec import PropertySpec, SpecError, parse_manifest  # noqa: E402
from datacredit.storage import S3Options, open_storage, write_json  # noqa: E402
from tests.tiny import TinyData, tiny_manifest  # noqa: E402

pytestmark = pytest.mark.workload


def write_random_inception_weights(path: Path, seed: int = 0) -> Path:
    """torch-fidelity's Inception-v3 state dict (same keys and shapes as ``pt_inception-2015-12-05-6726825d.pth``)
    with random values, saved with ``torch.save``.

    The real class is built, but its constructor's weight load is made lenient and fed an empty state dict, so it
    keeps its random initialisation and nothing is downloaded. Convolutions get He initialisation so features keep
    their scale through the ~100 layers (PyTorch's default init shrinks them to ~1e-8)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ANN001, ANN202
            return super().load_state_dict(state_dict, strict=False, assign=assign)

    empty = path.with_name("empty-state-dict.pth")
    torch.save({}, empty)
    torch.manual_seed(seed)
    net = _RandomInception("random-inception", ["2048"], feature_extractor_weights_path=str(empty))
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    _calibrate_classifier(net)
    torch.save(net.state_dict(), path)
    empty.unlink()
    return path


def _calibrate_classifier(net: torch.nn.Module) -> None:
    """Give the random classifier head logits that vary between images. A random network maps every image to
    nearly the same pool features (a common part much larger than what differs), so a random head puts all of them
    in one class and the Inception Score of any images is 1.0 (on some CPUs exactly). The head is centred on the
    mean features of a few digits and noise images (it ignores their direction) and scaled to their spread."""
    imgs, _ = digit_arrays()
    digits = torch.from_numpy(imgs[:8].astype(np.float32) / 127.5 - 1.0)[:, None]
    noise = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    net.eval()
    with torch.no_grad():
        features = net(to_uint8_rgb(torch.cat([digits, noise])))[0].double()
        mean = features.mean(0)
        spread = (features - mean).norm(dim=1).mean()
        weight = torch.randn(net.fc.weight.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        direction = mean / mean.norm()
        weight = (weight - torch.outer(weight @ direction, direction)) * (3.0 / spread)  # blind to the common part
        net.fc.weight.copy_(weight.float())  # IS reads "logits_unbiased": the head without its bias


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / WEIGHTS_FILE)


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    """8x8 grayscale digits in [-1, 1] (reference and other digits) and uniform noise."""
    imgs, _ = digit_arrays()
    x = torch.from_numpy(imgs.astype(np.float32) / 127.5 - 1.0)[:, None]
    noise = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {"reference": x[:12], "other": x[100:112], "noise": noise}


def test_weights_are_in_the_real_format(weights: Path) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state = torch.load(weights, weights_only=True)
    net = FeatureExtractorInceptionV3("check", ["2048"], feature_extractor_weights_path=str(weights))
    assert set(state) == set(net.state_dict()) and len(state) > 500
    assert state["fc.weight"].shape == (1008, 2048)


def test_to_uint8_rgb() -> None:
    gray = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5)
    out = to_uint8_rgb(gray)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 1, 5)
    assert out[0, :, 0].tolist() == [[0, 64, 128, 255, 255]] * 3  # rounded half to even, clamped
    rgb = torch.rand(2, 3, 4, 4) * 2 - 1
    assert to_uint8_rgb(rgb).shape == (2, 3, 4, 4)
    u8 = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)  # what the worker's dataset stores maps back exactly
    assert torch.equal(to_uint8_rgb(u8.float() / 127.5 - 1.0), u8)
    with pytest.raises(ValueError):
        to_uint8_rgb(torch.zeros(1, 2, 4, 4))


def test_fid_reference_statistics_cached_once(weights: Path, images: dict[str, torch.Tensor], tmp_path: Path) -> None:
    cache = tmp_path / "property"
    fid = get_property("fid", weights=weights)
    info = fid.fit(images["reference"], None, cache, seed=0)
    assert not info["cached"] and info["reference_n"] == 12
    stats = sorted(p.name for p in cache.iterdir())
    assert len(stats) == 2 and stats[0].startswith("fid-ref-") and stats[1] == "fid.json", stats
    with np.load(cache / stats[0]) as z:
        assert int(z["real_features_num_samples"]) == 12 and z["real_features_cov_sum"].shape == (2048, 2048)

    same = -fid.score(images["reference"])
    digits = -fid.score(images["other"])
    noise = -fid.score(images["noise"])
    assert abs(same) < 1e-3 * noise, (same, digits, noise)
    assert digits < noise and noise > 1.0, (digits, noise)

    # the statistics are not computed again: fitting on the same reference finds them
    assert fid.fit(images["reference"], None, cache)["cached"]

    # a coalition worker: a new instance loads the statistics without the reference images, scores the same,
    # and shares the process's network
    worker = get_property("fid", weights=weights)
    assert worker.fit(None, None, cache)["reference_stats"] == stats[0]
    assert -worker.score(images["noise"]) == pytest.approx(noise, rel=1e-5)
    assert worker.metric.inception is fid.metric.inception is inception_network(weights, "2048", fid.device)

    with pytest.raises(FileNotFoundError, match="reference images first"):
        get_property("fid", weights=weights).fit(None, None, tmp_path / "empty")


def test_inception_score(weights: Path, images: dict[str, torch.Tensor], tmp_path: Path) -> None:
    score = get_property("inception-score", weights=weights, options={"splits": "10", "batch_size": "4"})
    info = score.fit(None, None, tmp_path / "cache", seed=0)  # nothing to load: a worker without prepare works too
    assert info["splits"] == 10
    mixed = torch.cat([images["other"][:4], images["noise"][:4]])
    # 8 samples: the 10 splits are capped at 8, one image each, and one image is its own marginal: IS = 1
    assert score.score(mixed) == pytest.approx(1.0, abs=1e-5)
    halves = get_property("inception-score", weights=weights, options={"splits": "2", "batch_size": "4"})
    halves.fit(None, None, tmp_path / "cache", seed=0)
    value = halves.score(mixed)
    assert math.isfinite(value) and value > 1.0 + 1e-3, value  # digits and noise: p(y|x) differ from p(y)
    assert halves.score(mixed) == value  # the random splits are seeded
    copies = halves.score(images["reference"][:1].expand(4, -1, -1, -1))
    assert copies == pytest.approx(1.0, abs=1e-5) and value > copies + 1e-3  # identical images: p(y|x) = p(y)

    # prepare records the weights' hash, workers check it
    one = get_property("inception-score", weights=weights, options={"splits": "1"})
    one.fit(images["reference"], None, tmp_path / "prepared")
    assert get_property("inception-score", weights=weights).fit(None, None, tmp_path / "prepared")["splits"] == 10
    assert one.score(mixed) >= 1.0


def test_missing_or_wrong_weights_name_the_field(weights: Path, tmp_path: Path) -> None:
    for name in ("fid", "inception-score"):
        with pytest.raises(SpecError, match=rf"spec\.property\.weights: required .*{WEIGHTS_FILE}.*s3://"):
            get_property(name)
        with pytest.raises(SpecError, match=r"spec\.property\.weights: required"):
            property_for(PropertySpec(name=name), lambda uri, field: Path(uri))
    with pytest.raises(SpecError, match=r"spec\.property\.weights: .* is not a file"):
        get_property("fid", weights=tmp_path / "nothing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SpecError, match=r"spec\.property\.weights: .*not a readable torch state dict"):
        get_property("fid", weights=tmp_path / "junk.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(SpecError, match=r"spec\.property\.weights: .*not torch-fidelity's Inception-v3"):
        get_property("inception-score", weights=tmp_path / "other.pth")
    with pytest.raises(SpecError, match=r"spec\.property\.options\.splits: expected an integer"):
        get_property("inception-score", weights=weights, options={"splits": "zero"})
    with pytest.raises(SpecError, match=r"spec\.property\.options\.splits: property 'fid' does not use it"):
        get_property("fid", weights=weights, options={"splits": "2"})
    with pytest.raises(SpecError, match=r"spec\.property\.head"):
        property_for(PropertySpec(name="fid", weights=str(weights), head=str(weights)), lambda uri, field: Path(uri))


@pytest.mark.s3
def test_weights_from_s3(s3_server, s3_env: S3Options, weights: Path, images: dict[str, torch.Tensor],
                         tmp_path: Path) -> None:
    from datacredit.jobs.worker import _fetch

    options = s3_env
    s3_server.make_bucket("inception")
    open_storage("s3://inception/weights", options).write_bytes(WEIGHTS_FILE, weights.read_bytes())

    def fetch(uri: str, field: str) -> Path:
        return _fetch(uri, field, options)

    spec = PropertySpec(name="inception-score", weights=f"s3://inception/weights/{WEIGHTS_FILE}",
                        options={"splits": "1"})
    remote = property_for(spec, fetch)
    assert remote.weights != weights and remote.weights.read_bytes() == weights.read_bytes()
    local = get_property("inception-score", weights=weights, options={"splits": "1"})
    assert remote.net is local.net  # same content: the process loaded the network once
    remote.fit(None, None, tmp_path / "cache")
    local.fit(None, None, tmp_path / "cache")
    mixed = torch.cat([images["other"][:3], images["noise"][:3]])
    assert remote.score(mixed) == local.score(mixed)
    with pytest.raises(Exception, match=r"spec\.property\.weights"):  # the worker's fetch names the field
        property_for(PropertySpec(name="fid", weights="s3://inception/weights/nothing-here.pth"), fetch)


def test_worker_fid_run(tiny_data: TinyData, weights: Path, tmp_path: Path) -> None:
    """prepare computes the reference statistics once and stores them with the run; coalitions load them."""
    from datacredit.jobs.worker import run_coalition, run_prepare

    manifest = tiny_manifest("tiny-fid", str(tiny_data.images), str(tiny_data.reference), {"uri": str(tmp_path)})
    manifest["spec"]["property"] = {"name": "fid", "samples": 16, "reference": str(tiny_data.reference),
                                    "weights": str(weights)}
    run = parse_manifest(manifest)
    run_uri = str(tmp_path / "run")
    store = open_storage(run_uri)
    write_json(store, layout.RUN, {"manifest": run.to_manifest(), "configHash": run.config_hash()})
    result = run_prepare(run_uri)
    assert result["seconds"]["property_fit"] > 0

    cached = store.child(layout.PROPERTY_CACHE).list()
    stats = [k for k in cached if k.startswith("fid-ref-") and k.endswith(".npz")]
    assert "fid.json" in cached and len(stats) == 1, cached
    with np.load(io.BytesIO(store.read_bytes(f"{layout.PROPERTY_CACHE}/{stats[0]}"))) as z:
        assert int(z["real_features_num_samples"]) == 60  # the 60 reference digits
        assert z["real_features_sum"].shape == (2048,) and np.isfinite(z["real_features_cov_sum"]).all()

    results = [run_coalition(run_uri, members) for members in ([0, 1, 2], [3])]
    for r in results:
        assert r["property"] == "fid" and math.isfinite(r["utility"]) and r["utility"] <= 1e-6
        assert r["seconds"]["property"] > 0
    assert store.child(layout.PROPERTY_CACHE).list() == cached  # coalitions only read the cache
