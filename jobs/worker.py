"""The two worker steps, shared by the local executor and the Kubernetes Jobs.

prepare:   data set -> [train full model] -> prune -> fine-tune on all data -> property fit -> manifest.json
coalition: fine-tune the sparsified model on the coalition's images -> sample -> property -> result.json
"""

from __future__ import annotations

import io
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datacredit import __version__, layout
from datacredit.dataset import IMAGE_SUFFIXES, DatasetError, discover
from datacredit.ids import coalition_id, contributor_id
from datacredit.spec import SpecError, ValuationRun, parse_manifest
from datacredit.storage import S3Options, Storage, download_dir, open_storage, read_json, upload_dir, write_json

from .device import set_threads
from .images import decode_check, decode_image, save_grid
from .pipeline import coalition_utility, prepare_sparsified
from .properties import get_property
from .train import Checkpoint


def _versions() -> dict[str, str]:
    import diffusers
    import torch_pruning

    return {"datacredit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "torch_pruning": torch_pruning.__version__, "python": platform.python_version()}


def _load_run(store: Storage) -> ValuationRun:
    try:
        doc = read_json(store, layout.RUN)
    except FileNotFoundError:
        raise SpecError(store.uri, [("run.json", "missing: start runs with `datacredit run` or the operator")]) \
            from None
    return parse_manifest(doc["manifest"], f"{store.uri}/{layout.RUN}")


def _cache_root() -> Path:
    root = Path(os.environ.get("DATACREDIT_WORK_DIR", tempfile.gettempdir())) / "datacredit-work"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _local_copy(store: Storage, prefix: str, tag: str) -> Path:
    """A local folder with the storage prefix's files (local storage is used in place)."""
    from datacredit.storage import LocalStorage

    if isinstance(store, LocalStorage):
        return store.root / prefix
    final = _cache_root() / tag / prefix.replace("/", "_")
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".dl-"))
    download_dir(store, prefix, tmp / "d")
    try:
        os.replace(tmp / "d", final)  # atomic; another process may have won the race, which is fine
    except OSError:
        shutil.rmtree(tmp / "d", ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return final


def _fetch_model_dir(uri: str, options: S3Options) -> Path:
    """A local folder for a diffusers checkpoint given as a path or s3:// URI."""
    if not uri.startswith("s3://"):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise DatasetError(f"model.checkpoint: {uri} is not a folder")
        return path
    return _local_copy(open_storage(uri, options), "", "ckpt-" + contributor_id(uri))


def _load_checkpoint(path: Path) -> torch.nn.Module:
    """A diffusers UNet2DModel folder (or pipeline folder with unet/) or one saved by datacredit."""
    try:
        return Checkpoint.load(path).inference_model
    except FileNotFoundError as e:
        raise DatasetError(f"model.checkpoint: {e}") from None


# ---------------------------------------------------------------- prepare


def _load_dataset(run: ValuationRun, options: S3Options) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Decode every image once; skip and report corrupt ones; error on contributors left empty."""
    spec = run.spec.dataset
    source = open_storage(spec.images, options)
    found = discover(spec, options, source)
    size, channels = run.spec.model.architecture.sample_size, spec.channels
    images: list[np.ndarray] = []
    owner: list[int] = []
    skipped: list[dict[str, str]] = []
    contributors = []
    for idx, (name, keys) in enumerate(found.contributors.items()):
        kept = 0
        for key in keys:
            blob = source.read_bytes(key)
            problem = decode_check(blob)
            if problem:
                skipped.append({"path": key, "contributor": name, "reason": problem})
                continue
            images.append(_u8(decode_image(blob, size, channels)))
            owner.append(idx)
            kept += 1
        contributors.append({"name": name, "id": contributor_id(name), "images": kept})
    empty = [c["name"] for c in contributors if c["images"] == 0]
    if empty:
        raise DatasetError(f"contributor(s) left with no readable images: {', '.join(empty)} "
                           f"(see the {len(skipped)} skipped file(s) in manifest.json)")
    table = {"contributors": contributors, "skipped": skipped, "ignored": found.ignored}
    return np.stack(images), np.asarray(owner, dtype=np.int32), table


def _u8(image: np.ndarray) -> np.ndarray:
    """A decoded image in [-1, 1] as uint8 (what dataset.npz stores)."""
    return np.clip(np.rint((image + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images as float in [-1, 1]."""
    return torch.from_numpy(images).float().div(127.5).sub(1.0)


def _reference(run: ValuationRun, options: S3Options) -> tuple[torch.Tensor, np.ndarray]:
    """Held-out real images (one subfolder per class) for the property."""
    uri = run.spec.property.reference
    if not uri:
        raise SpecError("manifest", [("spec.property.reference",
                                      f"required by property {run.spec.property.name!r}: held-out real images, "
                                      "one subfolder per class")])
    store = open_storage(uri, options)
    keys = [k for k in store.list() if k.lower().endswith(IMAGE_SUFFIXES) and "/" in k]
    if not keys:
        raise DatasetError(f"property.reference: no images in class subfolders under {uri}")
    classes = sorted({k.split("/", 1)[0] for k in keys})
    size, channels = run.spec.model.architecture.sample_size, run.spec.dataset.channels
    imgs, labels = [], []
    for k in keys:
        blob = store.read_bytes(k)
        if decode_check(blob) is None:
            imgs.append(_u8(decode_image(blob, size, channels)))
            labels.append(classes.index(k.split("/", 1)[0]))
    return _to_tensor(np.stack(imgs)), np.asarray(labels)


def run_prepare(run_uri: str, *, options: S3Options | None = None, progress: bool = False) -> dict[str, Any]:
    """The prepare step; idempotent (returns the stored result when prepare/result.json exists)."""
    options = options or S3Options()
    store = open_storage(run_uri, options)
    if store.exists(layout.PREPARE_RESULT):
        return read_json(store, layout.PREPARE_RESULT)
    set_threads()
    run = _load_run(store)
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    images, owner, table = _load_dataset(run, options)
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images, owner=owner)
    store.write_bytes(layout.DATASET, buf.getvalue())
    seconds["data"] = time.monotonic() - t0
    data = _to_tensor(images)
    arch, s = run.spec.model.architecture, run.spec

    t0 = time.monotonic()
    full = _load_checkpoint(_fetch_model_dir(s.model.checkpoint, options)) if s.model.checkpoint else None
    seconds["load"] = time.monotonic() - t0
    t = s.model.train
    prepared = prepare_sparsified(
        data,
        full=full,
        arch={"block_out_channels": tuple(arch.block_out_channels), "layers_per_block": arch.layers_per_block,
              "attention": arch.attention},
        train_steps=t.steps,
        train_lr=t.learning_rate,
        batch_size=t.batch_size,
        prune_ratio=s.method.prune.ratio,
        importance=s.method.prune.importance,
        finetune_steps=s.method.prune.finetune_steps,
        finetune_lr=s.method.finetune.learning_rate,
        seed=s.seed,
        progress=progress,
    )
    seconds.update(prepared.info["seconds"])

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        prepared.sparsified.save(Path(d) / "sparsified")
        upload_dir(store, layout.SPARSIFIED, Path(d) / "sparsified")
        prop = get_property(s.property.name)
        ref, labels = _reference(run, options)
        prop.fit(ref, labels, Path(d) / "property", seed=s.seed)
        upload_dir(store, layout.PROPERTY_CACHE, Path(d) / "property")
    seconds["property_fit"] = time.monotonic() - t0

    manifest = {
        "manifest": run.to_manifest(),
        "configHash": run.config_hash(),
        "planner": {"method": s.estimator.name, "budget": s.estimator.budget, "seed": s.estimator.seed,
                    "nPlayers": len(table["contributors"])},
        **table,
    }
    write_json(store, layout.MANIFEST, manifest)
    result = {
        "paramsFull": prepared.info["params_full"],
        "paramsPruned": prepared.info["params_pruned"],
        "prune": prepared.info["prune"],
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "images": int(len(images)),
        "skipped": len(table["skipped"]),
        "versions": _versions(),
        "summary": (f"{len(table['contributors'])} contributors, {len(images)} images "
                    f"({len(table['skipped'])} skipped), params {prepared.info['params_full']:,} -> "
                    f"{prepared.info['params_pruned']:,}"),
    }
    write_json(store, layout.PREPARE_RESULT, result)
    return result


# ---------------------------------------------------------------- coalition


@dataclass
class _Prepared:
    run: ValuationRun
    manifest: dict[str, Any]
    images: torch.Tensor
    owner: np.ndarray
    sparsified: Checkpoint
    prop: Any  # the run's property, fitted in prepare and loaded from its cache


@lru_cache(maxsize=2)
def _prepared(run_uri: str, options: S3Options) -> _Prepared:
    """What every coalition of a run reuses; cached per process (the local pool runs many coalitions)."""
    store = open_storage(run_uri, options)
    if not store.exists(layout.PREPARE_RESULT):
        raise DatasetError(f"{run_uri}: prepare has not finished (no {layout.PREPARE_RESULT})")
    run = _load_run(store)
    with np.load(io.BytesIO(store.read_bytes(layout.DATASET))) as z:
        images, owner = z["images"], z["owner"]
    tag = contributor_id(run_uri + store.read_bytes(layout.PREPARE_RESULT).decode())  # new prepare, new copy
    prop = get_property(run.spec.property.name)
    prop.fit(None, None, _local_copy(store, layout.PROPERTY_CACHE, tag), seed=run.spec.seed)
    return _Prepared(run, read_json(store, layout.MANIFEST), _to_tensor(images), owner,
                     Checkpoint.load(_local_copy(store, layout.SPARSIFIED, tag)), prop)


def run_coalition(run_uri: str, members: list[int], *, attempt: int = 1,
                  options: S3Options | None = None) -> dict[str, Any]:
    """The coalition step; idempotent: an existing result.json is returned as is."""
    options = options or S3Options()
    set_threads()
    store = open_storage(run_uri, options)
    p = _prepared(run_uri, options)
    contributors = p.manifest["contributors"]
    bad = [m for m in members if not 0 <= m < len(contributors)]
    if bad or len(set(members)) != len(members):
        raise DatasetError(f"--members {members}: indices must be distinct and in [0, {len(contributors)})")
    member_ids = [contributors[m]["id"] for m in sorted(members)]
    cid = coalition_id(member_ids, p.manifest["configHash"])
    key = layout.coalition_result(cid)
    if store.exists(key):
        return read_json(store, key)
    s = p.run.spec
    seed = s.seed + int(cid[1:9], 16) % 1_000_000  # per-coalition, stable across executors and attempts

    mask = torch.from_numpy(np.isin(p.owner, sorted(members)))
    ft = s.method.finetune
    out = coalition_utility(p.sparsified, p.images[mask], p.prop, steps=ft.steps,
                            lr=ft.learning_rate, batch_size=ft.batch_size, n_samples=s.property.samples,
                            ddim_steps=s.method.sampler.steps, seed=seed)
    utility, samples, seconds = out.utility, out.samples, dict(out.seconds)
    seconds["total"] = sum(seconds.values())
    if not np.isfinite(utility):
        raise RuntimeError(f"property {s.property.name!r} returned {utility} for coalition {cid}")

    with tempfile.TemporaryDirectory() as d:
        grid = save_grid(samples[:64], Path(d) / "samples.png")
        store.write_bytes(f"{layout.attempt_dir(cid, attempt)}/samples.png", grid.read_bytes())
    result = {
        "id": cid,
        "members": sorted(members),
        "memberNames": [contributors[m]["name"] for m in sorted(members)],
        "utility": utility,
        "property": s.property.name,
        "attempt": attempt,
        "seed": seed,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "versions": _versions(),
    }
    if not write_json(store, key, result, if_absent=True):  # another attempt won the race: keep its result
        return read_json(store, key)
    return result

