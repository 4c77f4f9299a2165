"""Workload tier: image decoding, the demo data, and the classifier-based properties with their cache."""

from __future__ import annotations

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
Image = pytest.importorskip("PIL.Image")

from datacredit.jobs.digits import demo_data  # noqa: E402
from datacredit.jobs.images import decode_check, encode_png, load_images, save_grid  # noqa: E402
from datacredit.jobs.properties import available_properties, get_property, register_property  # noqa: E402
from datacredit.jobs.properties.frechet import feature_stats, frechet_distance  # noqa: E402

pytestmark = pytest.mark.workload


@pytest.fixture(scope="module")
def demo():
    return demo_data(n_clean=4, bad=("noise", "blank", "duplicate"), holdout=200, seed=0)


@pytest.fixture(scope="module")
def fitted(demo, tmp_path_factory):
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("prop-cache")
    ref = load_images(demo.reference, 8, 1)
    props = {}
    for name in ("quality", "diversity"):
        props[name] = get_property(name)
        props[name].fit(ref, demo.reference_labels, cache, seed=0)
    return props, cache


def _png(mode: str = "L", size: tuple[int, int] = (5, 7)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def test_load_images_and_decode_check(tmp_path):
    good_l, good_rgb = _png("L"), _png("RGB", (16, 16))
    x = load_images([good_l, good_rgb], size=8, channels=3)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert load_images([good_rgb], 8, 1).shape == (1, 1, 8, 8)
    assert decode_check(good_l) is None
    assert decode_check(b"") is not None
    assert decode_check(b"not an image at all") is not None
    assert decode_check(good_l[: len(good_l) // 2]) is not None  # truncated PNG
    with pytest.raises(ValueError):
        load_images([good_l], 8, 2)
    back = load_images([encode_png(x[0])], 8, 3)
    torch.testing.assert_close(back[0], x[0], atol=1 / 127.5, rtol=0)
    path = save_grid(x, tmp_path / "grid.png")
    assert decode_check(path.read_bytes()) is None


def test_demo_data(demo):
    assert set(demo.bad) == {"noise", "blank", "duplicate"}
    assert len(demo.contributors) == 7 and len(demo.reference) == len(demo.reference_labels) == 200
    assert all(decode_check(b) is None for b in demo.contributors["noise"][:5])
    dup = load_images(demo.contributors["duplicate"][:3], 8, 1)
    assert torch.equal(dup[0], dup[2])
    by_class = demo_data(n_clean=5, bad=(), split="class", holdout=100)
    assert all(len(set(v.tolist())) == 2 for v in by_class.labels.values())


def test_frechet_distance_matches_definition():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 6)), rng.normal(size=(200, 6)) * 1.5 + 0.3
    (m1, s1), (m2, s2) = feature_stats(a), feature_stats(b)
    from scipy import linalg

    ref = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-8)
    few = feature_stats(rng.normal(size=(3, 6)))  # singular covariance: still finite
    assert np.isfinite(frechet_distance(*few, m1, s1))


def test_properties_fit_cache_and_separate(demo, fitted):
    props, cache = fitted
    info = props["quality"].info
    assert info["classifier"]["accuracy"] >= 0.95
    assert props["diversity"].info["classifier"]["cached"] is True  # shared with quality
    clean = load_images(sum((demo.contributors[f"clean-{i}"] for i in range(4)), []), 8, 1)[:128]
    noise = load_images(demo.contributors["noise"][:128], 8, 1)
    blank = load_images(demo.contributors["blank"][:128], 8, 1)
    dup = load_images(demo.contributors["duplicate"][:128], 8, 1)
    q = {k: props["quality"].score(v) for k, v in {"clean": clean, "noise": noise, "blank": blank, "dup": dup}.items()}
    assert q["clean"] > max(q["noise"], q["blank"], q["dup"])
    assert props["diversity"].score(clean) > 3.0 > 0.5 > props["diversity"].score(dup)

    reloaded = get_property("quality")
    reloaded.fit(None, None, cache)  # what a coalition worker does
    assert reloaded.info["classifier"]["cached"] is True
    assert reloaded.score(clean) == pytest.approx(q["clean"], rel=1e-9)


def test_property_registry(tmp_path):
    assert {"quality", "diversity"} <= set(available_properties())
    with pytest.raises(KeyError):
        get_property("no-such-property")
    with pytest.raises(FileNotFoundError):
        get_property("quality").fit(None, None, tmp_path)

    class Brightness:
        name = "brightness"

        def fit(self, reference_images, labels, cache_dir, seed=0):
            return {}

        def score(self, samples):
            return float(samples.mean())

    register_property("test-brightness", Brightness, replace=True)
    assert get_property("test-brightness").score(torch.ones(2, 1, 4, 4)) == 1.0
    with pytest.raises(ValueError):
        register_property("test-brightness", Brightness)


def test_pipeline_prepare_and_coalition(demo, fitted):
    from datacredit.jobs.pipeline import coalition_utility, prepare_sparsified

    props, _ = fitted
    images = load_images(demo.contributors["clean-0"][:64] + demo.contributors["noise"][:64], 8, 1)
    arch = {"block_out_channels": (16, 32), "norm_num_groups": 8}
    prep = prepare_sparsified(images, arch=arch, train_steps=3, batch_size=16, finetune_steps=2, seed=0)
    assert prep.info["params_pruned"] < prep.info["params_full"]
    assert prep.sparsified.ema is not None and prep.sparsified.ema.step == 2
    before = [p.clone() for p in prep.sparsified.model.parameters()]
    kw = {"steps": 2, "batch_size": 8, "n_samples": 16, "ddim_steps": 3, "seed": 3}
    a = coalition_utility(prep.sparsified, images[:10], props["quality"], **kw)
    b = coalition_utility(prep.sparsified, images[:10], props["quality"], **kw)
    assert np.isfinite(a.utility) and a.utility == b.utility
    assert a.checkpoint.ema.step == 4 and prep.sparsified.ema.step == 2  # the sparsified model is untouched
    assert all(torch.equal(x, y) for x, y in zip(before, prep.sparsified.model.parameters(), strict=True))
    empty = coalition_utility(prep.sparsified, images[:0], props["quality"], **kw)
    assert empty.checkpoint.ema.step == 2 and set(empty.seconds) == {"finetune", "sample", "property"}


def _encoded(fmt: str, size: tuple[int, int] = (8, 8), mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 7).save(buf, format=fmt)
    return buf.getvalue()


def test_decode_check_refuses_hostile_files():
    png = _encoded("PNG")
    assert decode_check(png, "a/x.png") is None and decode_check(_encoded("JPEG"), "a/x.JPG") is None
    assert decode_check(png[:8], "a/x.png")  # the PNG signature and nothing else
    assert decode_check(png[:33], "a/x.png")  # signature and header chunk, no data
    assert "GIF data in a .png file" in decode_check(_encoded("GIF"), "a/x.png")
    assert "TIFF data in a .png file" in decode_check(_encoded("TIFF"), "a/x.png")
    assert "JPEG data in a .png file" in decode_check(_encoded("JPEG"), "a/x.png")
    huge = _encoded("PNG", (13000, 13000), "1")  # 169M pixels in a few kB: refused before decoding
    assert len(huge) < 100_000 and "too large: 13000x13000" in decode_check(huge, "a/huge.png")


def test_prepare_skips_hostile_files_and_keeps_the_rest(tmp_path):
    from datacredit.jobs.worker import _load_dataset, _read_image
    from datacredit.spec import parse_manifest
    from datacredit.storage import LocalStorage, S3Options
    from tests.tiny import tiny_manifest

    images = tmp_path / "images"
    for who in ("ann", "bob"):
        (images / who).mkdir(parents=True)
        for i in range(3):
            (images / who / f"{i}.png").write_bytes(_png("L", (10, 10)))
    hostile = {"header.png": _png()[:8], "gif.png": _encoded("GIF"), "huge.png": _encoded("PNG", (13000, 13000), "1")}
    for name, blob in hostile.items():
        (images / "ann" / name).write_bytes(blob)
    run = parse_manifest(tiny_manifest("hostile", str(images), "", {"uri": str(tmp_path / "runs")}))
    data, owner, _, table = _load_dataset(run, S3Options(), 8)
    assert data.shape == (6, 1, 8, 8) and owner.tolist() == [0, 0, 0, 1, 1, 1]
    assert sorted(s["path"] for s in table["skipped"]) == sorted(f"ann/{n}" for n in hostile)
    assert [c["images"] for c in table["contributors"]] == [3, 3]
    # a key no storage may hold is one skipped file, not a failed prepare
    image, problem = _read_image(LocalStorage(str(images)), "ann/../../x.png", 8, 1)
    assert image is None and "invalid storage key" in problem
