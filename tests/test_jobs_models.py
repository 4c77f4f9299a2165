"""Workload tier: tiny UNets, real torch-pruning, save/load round trips, training and DDIM determinism."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("torch_pruning")

from datacredit.jobs.pipeline import sample_untrained  # noqa: E402
from datacredit.jobs.prune import prune_unet  # noqa: E402
from datacredit.jobs.sample import sample_ddim  # noqa: E402
from datacredit.jobs.train import Checkpoint, EMAState, train_ddpm  # noqa: E402
from datacredit.jobs.unet import build_unet, count_params, load_unet, save_unet  # noqa: E402

pytestmark = pytest.mark.workload

TINY = {"sample_size": 8, "in_channels": 1, "block_out_channels": (16, 32), "norm_num_groups": 8}


def _tiny(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_unet(**{**TINY, **kw})


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 8, 8, generator=g), torch.tensor([0, 400, 999])


def _data(n: int = 32):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1


@pytest.mark.parametrize("head_dim", [None, 4])
def test_prune_round_trip(tmp_path, head_dim):
    model = _tiny(attention_head_dim=head_dim)
    x, t = _inputs()
    pruned, stats = prune_unet(model, 0.3)
    assert stats.params_after == count_params(pruned) < stats.params_before
    # the paper's count: (C - int(0.7 C)) // 8 channels of each of the 8 GroupNorm groups go, so 32 -> 24 and
    # 16 -> 16 (narrow layers keep every channel, as torch-pruning 1.3.2 left them)
    assert {(stats.widths_before[k], w) for k, w in stats.widths_after.items()} == {(16, 16), (32, 24)}
    for name, m in pruned.named_modules():
        if isinstance(m, torch.nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0, name
            assert m.weight.shape[0] == m.num_channels
    with torch.no_grad():
        y = pruned(x, t).sample
    assert y.shape == x.shape and torch.isfinite(y).all()

    save_unet(pruned, tmp_path / "m", meta={"note": "pruned"})
    loaded = load_unet(tmp_path / "m")
    assert count_params(loaded) == count_params(pruned)
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, y)
    # the loaded model keeps training (shapes, attributes and the optimiser all agree)
    train_ddpm(loaded, _data(8), steps=2, batch_size=4, ema=False)


def test_prune_ratio_matches_the_paper_on_its_cifar_unet():
    """The paper's CIFAR UNet (DDPM-CIFAR10: 128/256/256/256, 2 layers, attention in the 2nd down block,
    32 GroupNorm groups) at ratio 0.3: 35.75M -> 19.85M parameters, widths 128 -> 96 and 256 -> 192."""
    model = build_unet(32, 3, (128, 256, 256, 256), layers_per_block=2, norm_num_groups=32,
                       attention_blocks=(False, True, False, False))
    assert [type(b).__name__ for b in model.up_blocks] == ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    assert count_params(model) == pytest.approx(35.75e6, rel=0.001)
    pruned, stats = prune_unet(model, 0.3)
    assert stats.params_after == pytest.approx(19.85e6, rel=0.02)
    assert stats.widths_after["down_blocks.0.resnets.0"] == 96
    assert stats.widths_after["down_blocks.1.resnets.0"] == 192
    with torch.no_grad():
        assert pruned(torch.randn(1, 3, 32, 32), torch.tensor([10])).sample.shape == (1, 3, 32, 32)


def test_unpruned_save_load_and_bad_dir(tmp_path):
    model = _tiny(attention=False)
    x, t = _inputs()
    save_unet(model, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(load_unet(tmp_path / "m")(x, t).sample, model(x, t).sample)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError):
        load_unet(tmp_path / "bad")


def test_prune_ratio_zero_is_identity():
    model = _tiny()
    before = count_params(model)
    _, stats = prune_unet(model, 0.0)
    assert stats.params_after == before
    with pytest.raises(ValueError):
        prune_unet(model, 1.0)


def test_train_is_deterministic_and_continues_ema(tmp_path):
    data = _data()
    runs = [train_ddpm(_tiny(), data, steps=3, lr=1e-3, batch_size=8, seed=5) for _ in range(2)]
    assert runs[0].losses == runs[1].losses
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters(), strict=True):
        assert torch.equal(a, b)
    other = train_ddpm(_tiny(), data, steps=3, lr=1e-3, batch_size=8, seed=6)
    assert other.losses != runs[0].losses

    ema = runs[0].ema
    assert isinstance(ema, EMAState) and ema.step == 3
    Checkpoint(runs[0].model, ema).save(tmp_path / "ckpt")
    ckpt = Checkpoint.load(tmp_path / "ckpt")
    assert ckpt.ema is not None and ckpt.ema.step == 3
    before = [p.clone() for p in ckpt.ema.model.parameters()]
    cont = train_ddpm(ckpt.model, data[:1], steps=2, batch_size=8, seed=0, ema=ckpt.ema)  # one image
    assert cont.ema.step == 5 and len(cont.losses) == 2
    assert all(torch.equal(a, b) for a, b in zip(before, ckpt.ema.model.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(before, cont.ema.model.parameters(), strict=True))


def test_train_without_images_is_a_no_op():
    model = _tiny()
    before = [p.clone() for p in model.parameters()]
    r = train_ddpm(model, torch.empty(0, 1, 8, 8), steps=5, ema=False)
    assert r.losses == [] and r.ema is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_ddim_sampling_is_deterministic():
    model = _tiny().eval()
    a = sample_ddim(model, 6, steps=3, seed=1, batch_size=6)
    b = sample_ddim(model, 6, steps=3, seed=1, batch_size=4)
    assert a.shape == (6, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, sample_ddim(model, 6, steps=3, seed=2))
    c = sample_ddim(model, 4, steps=3, seed=1, eta=1.0, batch_size=2)
    torch.testing.assert_close(c, sample_ddim(model, 4, steps=3, seed=1, eta=1.0, batch_size=4))


def test_null_samples_split_over_untrained_inits():
    pruned, _ = prune_unet(_tiny(), 0.5)  # ∅ is sampled from the unpruned architecture its config still lists
    kw = {"n_samples": 6, "ddim_steps": 2, "seed": 3}
    one, _ = sample_untrained(pruned, init_seed=7, inits=1, **kw)
    many, seconds = sample_untrained(pruned, init_seed=7, inits=3, **kw)
    assert one.shape == many.shape == (6, 1, 8, 8) and seconds["finetune"] == 0.0
    torch.testing.assert_close(many, sample_untrained(pruned, init_seed=7, inits=3, **kw)[0])  # seeded
    assert not torch.allclose(one, many)
    # more inits than samples: one sample per initialisation, never an empty model
    assert sample_untrained(pruned, init_seed=7, inits=50, **kw)[0].shape == (6, 1, 8, 8)


def test_load_plain_diffusers_folder(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path / "pipe" / "unet")
    x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(load_unet(tmp_path / "pipe")(x, t).sample, model(x, t).sample)
    with pytest.raises(FileNotFoundError):
        load_unet(tmp_path / "nothing")
