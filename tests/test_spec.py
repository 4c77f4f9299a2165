"""Spec validation: good manifests parse with defaults, bad ones are refused naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from datacredit.spec import SpecError, load_manifest, parse_manifest
from tests.tiny import with_change as changed

GOOD = {
    "apiVersion": "datacredit.dev/v1alpha1",
    "kind": "ValuationRun",
    "metadata": {"name": "cifar20-quality"},
    "spec": {"dataset": {"images": "s3://bucket/data/cifar20/"}},
}


def with_change(path: str, value: object) -> dict:
    """GOOD with one field set (dotted path; value None deletes)."""
    return changed(GOOD, path, value)


def test_defaults_fill_in() -> None:
    run = parse_manifest(GOOD)
    assert run.metadata.namespace == "default"
    assert run.spec.method.prune.ratio == 0.3
    assert run.spec.estimator.name == "kernel"
    m = run.to_manifest()
    assert m["spec"]["method"]["finetune"]["learningRate"] == run.spec.method.finetune.learning_rate
    assert parse_manifest(m) == run  # round trip through camelCase


BAD = [
    ("apiVersion", "datacredit.dev/v2", "apiVersion"),
    ("kind", "Experiment", "kind"),
    ("metadata.name", "Bad_Name", "metadata.name"),
    ("spec.dataset", None, "spec.dataset"),
    ("spec.dataset.images", "", "spec.dataset.images"),
    ("spec.dataset.contributors", {"by": "manifest"}, "spec.dataset.contributors"),
    ("spec.dataset.contributors", {"by": "artist"}, "spec.dataset.contributors.by"),
    ("spec.model", {"family": "gan"}, "spec.model.family"),
    ("spec.model", {"family": "ldm"}, "spec.model.autoencoder"),
    ("spec.model", {"family": "sd-lora"}, "spec.model.checkpoint"),
    ("spec.model", {"family": "sd-lora", "checkpoint": "sd", "lora": {"rank": 0}}, "spec.model.lora.rank"),
    ("spec.model", {"lora": {"rank": 4}}, "spec.model.lora"),  # a ddpm has no LoRA
    ("spec.property", {"quantile": 1.5}, "spec.property.quantile"),
    ("spec.dataset.captions", "txt", "spec.dataset.captions"),
    ("spec.method", {"prune": {"ratio": 1.5}}, "spec.method.prune.ratio"),
    ("spec.method", {"finetune": {"steps": 0}}, "spec.method.finetune.steps"),
    ("spec.method", {"finetune": {"learningRate": -1}}, "spec.method.finetune.learningRate"),
    ("spec.estimator", {"budget": 1}, "spec.estimator.budget"),
    ("spec.estimator", {"name": "tmc"}, "spec.estimator.name"),
    ("spec.estimator", {"tolerance": 0}, "spec.estimator.tolerance"),
    ("spec.execution", {"parallelism": 0}, "spec.execution.parallelism"),
    ("spec.execution", {"resources": {"memory": "lots"}}, "spec.execution.resources.memory"),
    ("spec.storage", {"uri": "gs://bucket/x"}, "spec.storage.uri"),
    ("spec.storage", {"uri": "s3://"}, "spec.storage.uri"),
    ("spec.storage", {"uri": "s3://bucket/runs?v=1"}, "spec.storage.uri"),
    ("spec.storage", {"uri": "s3://bucket/runs#a"}, "spec.storage.uri"),
    ("spec.storage", {"uri": "./runs?x"}, "spec.storage.uri"),
    ("spec.storage", {"uri": "file://"}, "spec.storage.uri"),
    ("spec.property", {"samples": 2}, "spec.property.samples"),
    ("spec.estimator", {"bugdet": 10}, "spec.estimator.bugdet"),
    ("spec.model", {"architecture": {"blockOutChannels": []}}, "spec.model.architecture.blockOutChannels"),
]


@pytest.mark.parametrize(("path", "value", "field"), BAD, ids=[b[2] for b in BAD])
def test_bad_manifest_names_field(path: str, value: object, field: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_manifest(with_change(path, value))
    fields = [p for p, _ in e.value.problems]
    assert field in fields, fields


def test_every_problem_is_reported_at_once() -> None:
    doc = with_change("spec.estimator", {"budget": 0, "tolerance": 5})
    doc["spec"]["execution"] = {"parallelism": -1}
    with pytest.raises(SpecError) as e:
        parse_manifest(doc)
    assert {p for p, _ in e.value.problems} == {
        "spec.estimator.budget", "spec.estimator.tolerance", "spec.execution.parallelism"}


def test_load_manifest_file_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_manifest(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match="yaml"):
        load_manifest(bad)
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(GOOD) + "---\n" + yaml.safe_dump(GOOD))
    with pytest.raises(SpecError, match="exactly one"):
        load_manifest(two)


def test_config_hash_ignores_execution_and_storage() -> None:
    a = parse_manifest(GOOD)
    b = parse_manifest(with_change("spec.execution", {"parallelism": 7}))
    c = parse_manifest(with_change("spec.seed", 3))
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_payout_section_parses_with_defaults_and_exact_amounts() -> None:
    assert parse_manifest(GOOD).spec.payout is None
    run = parse_manifest(with_change("spec.payout", {"pool": 10000}))
    p = run.spec.payout
    assert p is not None and (p.pool, p.currency, p.rule, p.alpha, p.floor, p.period) == (
        "10000", "USD", "shapley", None, "0", None)
    full = parse_manifest(with_change("spec.payout", {"pool": "10000.50", "currency": "EUR", "rule": "blend",
                                                      "alpha": 0.25, "floor": 5, "period": "2025-06"})).spec.payout
    assert full is not None and (full.pool, full.floor, full.alpha, full.period) == ("10000.50", "5", 0.25, "2025-06")
    assert parse_manifest(with_change("spec.payout", {"pool": 0.1})).spec.payout.pool == "0.1"  # as it prints
    assert parse_manifest(with_change("spec.payout", {"pool": 500, "currency": "JPY"})).spec.payout.pool == "500"
    dated = yaml.safe_load("pool: 1\nperiod: 2025-06-30\n")  # an unquoted date is the period's text
    assert parse_manifest(with_change("spec.payout", dated)).spec.payout.period == "2025-06-30"
    m = run.to_manifest()
    assert m["spec"]["payout"] == {"pool": "10000", "currency": "USD", "rule": "shapley", "floor": "0"}
    assert parse_manifest(m) == run


PAYOUT_BAD = [
    ({}, "spec.payout.pool", "Field required"),
    ({"pool": 0}, "spec.payout.pool", "must be positive"),
    ({"pool": "-5"}, "spec.payout.pool", "must be positive"),
    ({"pool": "1.001"}, "spec.payout.pool", "more than 2 decimal"),
    ({"pool": "ten"}, "spec.payout.pool", "not a decimal"),
    ({"pool": True}, "spec.payout.pool", "true/false"),
    ({"pool": 10, "currency": "JPY", "floor": "0.5"}, "spec.payout.floor", "more than 0 decimal"),
    ({"pool": 10, "floor": 11}, "spec.payout.floor", "more than the pool"),
    ({"pool": 10, "floor": "-1"}, "spec.payout.floor", "negative"),
    ({"pool": 10, "currency": "dollars"}, "spec.payout.currency", "pattern"),
    ({"pool": 10, "rule": "equal"}, "spec.payout.rule", "'pro-rata'"),
    ({"pool": 10, "alpha": 0.5}, "spec.payout.alpha", "only applies to rule blend"),
    ({"pool": 10, "rule": "blend", "alpha": 1.5}, "spec.payout.alpha", "less than or equal to 1"),
    ({"pool": 10, "period": "../x"}, "spec.payout.period", "pattern"),
    ({"pool": 10, "carry": "p1"}, "spec.payout.carry", "unknown field"),
]


@pytest.mark.parametrize(("payout", "field", "message"), PAYOUT_BAD, ids=[f"{b[1]}-{b[2]}" for b in PAYOUT_BAD])
def test_bad_payout_section_names_the_field(payout: dict, field: str, message: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_manifest(with_change("spec.payout", payout))
    problems = dict(e.value.problems)
    assert field in problems and message in problems[field], problems


def test_config_hash_ignores_the_payout() -> None:
    """Paying differently must not rename (and so re-run) the coalitions."""
    a = parse_manifest(GOOD)
    b = parse_manifest(with_change("spec.payout", {"pool": "100", "rule": "blend", "alpha": 0.5}))
    c = parse_manifest(with_change("spec.payout", {"pool": "999.99", "period": "2025-07"}))
    assert a.config_hash() == b.config_hash() == c.config_hash()


def test_hostile_manifest_files_are_refused_naming_the_problem(tmp_path: Path) -> None:
    laughs = tmp_path / "laughs.yaml"
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    laughs.write_text("\n".join(lines) + "\n")
    with pytest.raises(SpecError, match="aliases"):
        load_manifest(laughs)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(SpecError, match="more than 1,048,576"):
        load_manifest(big)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_manifest(binary)


def test_each_model_family_has_its_own_section_and_says_whose_field_a_stray_one_is() -> None:
    from datacredit.spec import FAMILY_MODELS, DdpmModel, LdmModel, SdLoraModel

    assert isinstance(parse_manifest(GOOD).spec.model, DdpmModel)  # family left out: ddpm
    ldm = parse_manifest(with_change("spec.model", {"family": "ldm", "autoencoder": "s3://b/vq"})).spec.model
    sd = parse_manifest(with_change("spec.model", {"family": "sd-lora", "checkpoint": "/sd", "prompt": "a cat",
                                                   "lora": {"checkpoint": "/lora"}})).spec.model
    assert isinstance(ldm, LdmModel) and isinstance(sd, SdLoraModel) and set(FAMILY_MODELS) == {"ddpm", "ldm",
                                                                                                   "sd-lora"}
    # what prepare reads and the default caption come from the family
    assert ldm.uris() == [("spec.model.checkpoint", None), ("spec.model.autoencoder", "s3://b/vq")]
    assert sd.uris()[-1] == ("spec.model.lora.checkpoint", "/lora") and sd.default_caption() == "a cat"
    assert ldm.default_caption() == ""
    with pytest.raises(SpecError) as e:
        parse_manifest(with_change("spec.model", {"family": "ddpm", "autoencoder": "s3://b/vq", "lorra": {}}))
    problems = dict(e.value.problems)
    assert problems["spec.model.autoencoder"] == "not a field of model family 'ddpm' (it belongs to ldm)"
    assert problems["spec.model.lorra"].startswith("unknown field")
    with pytest.raises(SpecError) as e:
        parse_manifest(with_change("spec.model", {"family": "gan"}))
    assert dict(e.value.problems)["spec.model.family"].startswith("'gan': unknown model family; known: ddpm")


BEFORE = {"ddpm": "e05851bbf0a3", "ldm": "8748e7148396", "sd-lora": "b309c73e36d4"}  # by the flat ModelSpec


def test_config_hash_of_a_family_section_is_the_one_of_the_flat_section_before_it() -> None:
    # the hashes below were computed by the flat ModelSpec these sections replaced (run folders are named by
    # them, so a manifest written before keeps resuming its run)
    assert parse_manifest(GOOD).config_hash()[:12] == BEFORE["ddpm"]
    ldm = with_change("spec.model", {"family": "ldm", "autoencoder": "s3://b/vq"})
    assert parse_manifest(ldm).config_hash()[:12] == BEFORE["ldm"]
    sd = with_change("spec.model", {"family": "sd-lora", "checkpoint": "/sd", "prompt": "a cat"})
    assert parse_manifest(sd).config_hash()[:12] == BEFORE["sd-lora"]
