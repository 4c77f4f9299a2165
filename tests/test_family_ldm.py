"""Family ldm: a tiny VQModel saved with save_pretrained, latents encoded once, head-consistent pruning, and
two coalitions end to end through the worker steps."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("torch_pruning")

from diffusers import AutoencoderKL, VQModel  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402

from datacredit import layout  # noqa: E402
from datacredit.errors import ModelError  # noqa: E402
from datacredit.jobs.families import Assets, TrainData, get_family  # noqa: E402
from datacredit.jobs.families.ldm import AUTOENCODER, LATENTS, check_heads, decode, encode, head_dim  # noqa: E402
from datacredit.jobs.prune import prune_unet  # noqa: E402
from datacredit.jobs.sample import sample_ddim  # noqa: E402
from datacredit.jobs.train import Checkpoint  # noqa: E402
from datacredit.jobs.unet import build_unet, load_unet, save_unet  # noqa: E402
from datacredit.jobs.worker import run_coalition, run_prepare  # noqa: E402
from datacredit.seeds import Seeds  # noqa: E402
from datacredit.spec import parse_manifest  # noqa: E402
from datacredit.storage import open_storage, write_json  # noqa: E402
from tests.tiny import TinyData, tiny_manifest  # noqa: E402
from tests.tiny_models import save_tiny_vqmodel  # noqa: E402

pytestmark = pytest.mark.workload

ASSETS = Assets(lambda uri, field: Path(uri))


_save_vq = save_tiny_vqmodel


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny VQ-VAE in the vqvae/ folder of a pipeline-like folder."""
    return _save_vq(tmp_path_factory.mktemp("vq") / "vqvae")


def _manifest(tiny: TinyData, vq: Path, storage: Path, **model) -> dict:
    m = tiny_manifest("ldm", str(tiny.images), str(tiny.reference), {"uri": str(storage)})
    spec = m["spec"]
    spec["model"] = {"family": "ldm", "autoencoder": str(vq),
                     "architecture": {"sampleSize": 8, "blockOutChannels": [16, 32]},
                     "train": {"steps": 6, "learningRate": 2e-3, "batchSize": 16}, **model}
    spec["property"] = {**spec["property"], "samples": 8}
    spec["method"] = {"prune": {"ratio": 0.5, "finetuneSteps": 3},
                      "finetune": {"steps": 3, "learningRate": 1e-3, "batchSize": 8}, "sampler": {"steps": 3}}
    return m


class _Calls:
    """Counts VQModel.encode / decode calls (wrapping the real methods)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.counts = {"encode": 0, "decode": 0}
        for name in self.counts:
            real = getattr(VQModel, name)

            def wrapped(vq, *a, _real=real, _name=name, **kw):
                self.counts[_name] += 1
                return _real(vq, *a, **kw)

            monkeypatch.setattr(VQModel, name, wrapped)


def test_resolution_and_bad_autoencoder(tiny_data: TinyData, vq_dir: Path, tmp_path: Path) -> None:
    family = get_family("ldm")
    run = parse_manifest(_manifest(tiny_data, vq_dir, tmp_path / "r"))
    assert family.resolution(run, ASSETS) == 8 * 2  # sampleSize x 2 ** (2 blocks - 1)
    m = _manifest(tiny_data, vq_dir.parent, tmp_path / "r")  # a pipeline folder with vqvae/ works too
    m["spec"]["dataset"]["resolution"] = 24
    assert family.resolution(parse_manifest(m), ASSETS) == 24

    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=2).save_pretrained(tmp_path / "kl")
    (tmp_path / "empty").mkdir()
    for folder, said in ((tmp_path / "kl", "AutoencoderKL, not a diffusers VQModel"), (tmp_path / "empty", "config")):
        with pytest.raises(ModelError, match=f"spec.model.autoencoder: .*{said}"):
            family.resolution(parse_manifest(_manifest(tiny_data, folder, tmp_path / "r")), ASSETS)


def test_pruning_keeps_attention_heads_consistent(tmp_path: Path) -> None:
    assert head_dim([16, 32]) == 16 and head_dim([224, 448, 672, 896]) == 32 and head_dim([32, 64]) == 32
    torch.manual_seed(0)
    model = build_unet(8, 3, (16, 32), attention_head_dim=head_dim([16, 32]))
    before = {n: copy.deepcopy(m) for n, m in model.named_modules() if isinstance(m, Attention)}
    assert {m.heads for m in before.values()} == {2}
    pruned, _ = prune_unet(model, 0.5)
    heads = check_heads(pruned)
    assert set(heads) == set(before)
    for name, m in pruned.named_modules():
        if not isinstance(m, Attention):
            continue
        old = before[name]
        assert m.heads == old.heads and m.to_q.out_features < old.to_q.out_features
        # which original rows each projection kept (biases are distinct random numbers)
        kept = {p: [int((getattr(old, p).bias - b).abs().argmin()) for b in getattr(m, p).bias]
                for p in ("to_q", "to_k", "to_v")}
        assert kept["to_q"] == kept["to_k"] == kept["to_v"], name
        per_head = np.bincount(np.asarray(kept["to_q"]) // (old.to_q.out_features // old.heads), minlength=m.heads)
        assert len(set(per_head.tolist())) == 1, (name, per_head)
    save_unet(pruned, tmp_path / "u")
    assert check_heads(load_unet(tmp_path / "u")) == heads


def test_prepare_reuses_latents_and_coalitions_run(tiny_data: TinyData, vq_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _Calls(monkeypatch)
    run = parse_manifest(_manifest(tiny_data, vq_dir, tmp_path / "run"))
    store = open_storage(str(tmp_path / "run"))
    write_json(store, layout.RUN, {"manifest": run.to_manifest(), "configHash": run.config_hash()})

    result = run_prepare(str(tmp_path / "run"))
    assert result["resolution"] == 16 and result["paramsPruned"] < result["paramsFull"]
    assert result["seconds"]["encode"] >= 0
    assert {v[0] for v in result["prune"]["attention"].values()} == {2}
    encodes = calls.counts["encode"]
    assert encodes >= 1 and calls.counts["decode"] == 0

    # every artifact is stored; the latents are the VQ encoding of the stored data set, in its order
    sparsified = store.root / layout.SPARSIFIED
    assert {LATENTS, AUTOENCODER, "model", "ema"} <= {p.name for p in sparsified.iterdir()}
    with np.load(io.BytesIO(store.read_bytes(layout.DATASET))) as z:
        images = torch.from_numpy(z["images"]).float().div(127.5).sub(1.0)
        owner = z["owner"]
    latents = np.load(sparsified / LATENTS)
    assert latents.shape == (len(images), 3, 8, 8)
    vq = VQModel.from_pretrained(str(vq_dir)).eval()
    np.testing.assert_allclose(latents[:5], encode(vq, images[:5]).numpy(), atol=1e-5)
    assert json.loads((sparsified / AUTOENCODER).read_text())["uri"] == str(vq_dir)
    loaded = Checkpoint.load(sparsified)
    assert check_heads(loaded.model) == check_heads(loaded.inference_model) == result["prune"]["attention"]
    calls.counts["encode"] = encodes  # the check above encoded too

    utilities = [run_coalition(str(tmp_path / "run"), members)["utility"] for members in ([0, 1], [2, 3])]
    assert all(np.isfinite(utilities))
    assert calls.counts["encode"] == encodes and calls.counts["decode"] >= 2  # decode only, latents reused

    family = get_family("ldm")
    state = family.load(run, sparsified, TrainData(images, owner, [""] * len(images)), ASSETS)
    mask = np.isin(owner, [0, 2])
    a, seconds = family.coalition(run, state, mask, seeds=Seeds(7, 7))
    b, _ = family.coalition(run, state, mask, seeds=Seeds(7, 7))
    assert a.shape == (8, 1, 16, 16) and a.min() >= -1 and a.max() <= 1 and {"finetune", "decode"} <= set(seconds)
    assert torch.equal(a, b)
    c, _ = family.coalition(run, state, np.isin(owner, [1]), seeds=Seeds(7, 7))
    assert not torch.equal(a, c)
    # ∅ is the model trained on no data: the untrained initialisation (the same one every time), not the
    # sparsified model that saw everyone
    null, null_seconds = family.coalition(run, state, np.zeros(len(owner), dtype=bool), seeds=Seeds(7, 7))
    again, _ = family.coalition(run, state, np.zeros(len(owner), dtype=bool), seeds=Seeds(8, 7))
    other, _ = family.coalition(run, state, np.zeros(len(owner), dtype=bool), seeds=Seeds(7, 8))
    assert torch.equal(null, again) and null_seconds["finetune"] == 0.0  # no data, so the data seed is unused
    assert not torch.equal(null, other)  # another noise seed: another initialisation and sampling noise
    sparse_only = decode(state.vq, sample_ddim(state.sparsified.inference_model, 8, run.spec.method.sampler.steps,
                                               seed=7, clip_sample=False), state.channels)
    assert not torch.allclose(null, sparse_only, atol=1e-3)
    assert calls.counts["encode"] == encodes

    # a different VQModel behind spec.model.autoencoder is refused: the stored latents are not its latents
    other = _save_vq(tmp_path / "other-vq", codes=16)
    moved = parse_manifest(_manifest(tiny_data, other, tmp_path / "run"))
    with pytest.raises(ModelError, match="spec.model.autoencoder: .* differs"):
        family.load(moved, sparsified, TrainData(images, owner, [""] * len(images)), ASSETS)
