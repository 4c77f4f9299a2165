"""The two worker steps, shared by the local executor and the Kubernetes Jobs.

prepare:   data set -> [train full model] -> prune -> fine-tune on all data -> property fit -> manifest.json
coalition: fine-tune the sparsified model on the coalition's images -> sample -> property -> result.json
"""

from __future__ import annotations

import io
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datacredit import __version__, layout
from datacredit.dataset import IMAGE_SUFFIXES, discover
from datacredit.errors import BadInput, DatasetError, ModelError, NotReady
from datacredit.ids import coalition_id, contributor_id
from datacredit.runstate import member_indices, planner_for
from datacredit.seeds import Seeds, coalition_seeds
from datacredit.spec import SpecError, ValuationRun, parse_manifest
from datacredit.storage import (
    InvalidKeyError,
    S3Options,
    Storage,
    StorageUnavailable,
    download_dir,
    open_storage,
    read_json,
    upload_dir,
    write_json,
)

from .device import set_threads
from .families import Assets, TrainData, get_family
from .images import decode_check, decode_image, save_grid
from .properties.registry import property_for

log = logging.getLogger("datacredit.worker")

#: The property is a fixed instrument: fitted (the demo's classifier, random splits) with this seed whatever
#: ``spec.seed`` is, so runs that differ only in their seed measure the same property.
PROPERTY_SEED = 0


def _versions() -> dict[str, str]:
    import diffusers
    import torch_pruning

    return {"datacredit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "torch_pruning": torch_pruning.__version__, "python": platform.python_version()}


def load_run(store: Storage) -> ValuationRun:
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


def local_copy(store: Storage, prefix: str, tag: str) -> Path:
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


def _fetch(uri: str, field: str, options: S3Options) -> Path:
    """A local file or folder for a model/weights URI (path, file:// or s3://; s3 is downloaded once)."""
    if not uri.startswith("s3://"):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.exists():
            raise ModelError(f"{field}: {uri} does not exist")
        return path
    parent, _, name = uri.rstrip("/").rpartition("/")
    tag = "asset-" + contributor_id(uri)
    if name and parent != "s3:" and open_storage(parent, options).exists(name):  # a single object
        final = _cache_root() / tag / name
        if not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{name}.{os.getpid()}")
            open_storage(parent, options).download_file(name, tmp)  # streamed: weights can be GBs
            os.replace(tmp, final)
        return final
    store = open_storage(uri, options)
    if not store.list():
        raise ModelError(f"{field}: nothing at {uri}")
    return local_copy(store, "", tag)


def _assets(options: S3Options) -> Assets:
    return Assets(lambda uri, field: _fetch(uri, field, options))


# ---------------------------------------------------------------- prepare


def _load_dataset(run: ValuationRun, options: S3Options, size: int
                  ) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """Decode every image once at ``size``; skip and report corrupt ones; error on contributors left empty.
    Captions come from sidecar .txt files (``dataset.captions: sidecar``), else the family's default
    caption (sd-lora: ``model.prompt``)."""
    spec = run.spec.dataset
    source = open_storage(spec.images, options)
    found = discover(spec, options, source)
    channels = spec.channels
    sidecars = found.texts if spec.captions == "sidecar" else frozenset()
    default_caption = run.spec.model.default_caption()
    images: list[np.ndarray] = []
    captions: list[str] = []
    owner: list[int] = []
    skipped: list[dict[str, str]] = []
    contributors = []
    for idx, (name, keys) in enumerate(found.contributors.items()):
        kept = 0
        for key in keys:
            image, problem = _read_image(source, key, size, channels)
            if problem:
                skipped.append({"path": key, "contributor": name, "reason": problem})
                continue
            images.append(image)
            owner.append(idx)
            txt = key.rsplit(".", 1)[0] + ".txt"
            captions.append(source.read_bytes(txt).decode().strip() if txt in sidecars else default_caption)
            kept += 1
        contributors.append({"name": name, "id": contributor_id(name), "images": kept})
    empty = [c["name"] for c in contributors if c["images"] == 0]
    if empty:
        raise DatasetError(f"contributor(s) left with no readable images: {', '.join(empty)} "
                           f"(see the {len(skipped)} skipped file(s) in manifest.json)")
    table = {"contributors": contributors, "skipped": skipped, "ignored": found.ignored}
    if spec.captions == "sidecar":
        table["captioned"] = sum(1 for k in found.contributors.values() for key in k
                                 if key.rsplit(".", 1)[0] + ".txt" in sidecars)
    return np.stack(images), np.asarray(owner, dtype=np.int32), captions, table


def _read_image(source: Storage, key: str, size: int, channels: int) -> tuple[np.ndarray | None, str | None]:
    """One training image as uint8 at ``size``, or why it is skipped: an odd key or a file that does not decode
    never fails the whole prepare (a storage outage still does, so it is retried)."""
    try:
        blob = source.read_bytes(key)
    except InvalidKeyError as e:
        return None, str(e)
    problem = decode_check(blob, key)
    if problem:
        return None, problem
    try:
        return _u8(decode_image(blob, size, channels)), None
    except Exception as e:  # noqa: BLE001 - a decoder failing after the check still only skips this file
        return None, f"{type(e).__name__}: {e}"


def _u8(image: np.ndarray) -> np.ndarray:
    """A decoded image in [-1, 1] as uint8 (what dataset.npz stores)."""
    return np.clip(np.rint((image + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images as float in [-1, 1]."""
    return torch.from_numpy(images).float().div(127.5).sub(1.0)


def _reference(run: ValuationRun, options: S3Options, size: int, data: TrainData
               ) -> tuple[torch.Tensor, np.ndarray | None]:
    """The property's real images: ``property.reference`` (class subfolders give labels; flat: no labels),
    else the training images."""
    uri = run.spec.property.reference
    if not uri:
        return data.images, None
    store = open_storage(uri, options)
    keys = [k for k in store.list() if k.lower().endswith(IMAGE_SUFFIXES)]
    if not keys:
        raise DatasetError(f"spec.property.reference: no images under {uri}")
    labelled = all("/" in k for k in keys)
    classes = sorted({k.split("/", 1)[0] for k in keys}) if labelled else []
    channels = run.spec.dataset.channels
    imgs, labels = [], []
    for k in keys:
        image, problem = _read_image(store, k, size, channels)
        if problem is None:
            imgs.append(image)
            labels.append(classes.index(k.split("/", 1)[0]) if labelled else -1)
    if not imgs:
        raise DatasetError(f"spec.property.reference: no readable images under {uri}")
    return _to_tensor(np.stack(imgs)), (np.asarray(labels) if labelled else None)


def _stage(progress: bool, text: str) -> None:
    """A plain progress line of prepare (stdout, flushed: the log of a prepare Job)."""
    if progress:
        print(f"prepare: {text}", flush=True)


def run_prepare(run_uri: str, *, options: S3Options | None = None, progress: bool = False) -> dict[str, Any]:
    """The prepare step; idempotent (returns the stored result when prepare/result.json exists).

    ``progress`` prints plain lines to stdout: one per stage (data, model, property) and about ten per training.
    """
    options = options or S3Options()
    store = open_storage(run_uri, options)
    if store.exists(layout.PREPARE_RESULT):
        _stage(progress, f"already done in {store.uri}")
        return read_json(store, layout.PREPARE_RESULT)
    set_threads()
    run = load_run(store)
    s = run.spec
    family, assets = get_family(s.model.family), _assets(options)
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    _stage(progress, f"data: reading {s.dataset.images}")
    size = family.resolution(run, assets)
    images, owner, captions, table = _load_dataset(run, options, size)
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images, owner=owner, captions=np.asarray(captions, dtype=str))
    store.write_bytes(layout.DATASET, buf.getvalue())
    seconds["data"] = time.monotonic() - t0
    data = TrainData(_to_tensor(images), owner, captions)
    _stage(progress, f"data: {len(images)} images of {len(table['contributors'])} contributors at {size} px "
                     f"({len(table['skipped'])} skipped) in {seconds['data']:.1f} s")

    with tempfile.TemporaryDirectory() as d:
        _stage(progress, f"model: {s.model.family}: train or load, prune, fine-tune on all data")
        t0 = time.monotonic()
        info = family.prepare(run, data, Path(d) / "sparsified", assets, progress=progress)
        seconds.update(info["seconds"])
        upload_dir(store, layout.SPARSIFIED, Path(d) / "sparsified")
        _stage(progress, f"model: params {info['params_full']:,} -> {info['params_pruned']:,} in "
                         f"{time.monotonic() - t0:.1f} s")
        t0 = time.monotonic()
        _stage(progress, f"property: fitting {s.property.name}")
        prop = property_for(s.property, assets.get)
        ref, labels = _reference(run, options, size, data)
        prop.fit(ref, labels, Path(d) / "property", seed=PROPERTY_SEED)
        upload_dir(store, layout.PROPERTY_CACHE, Path(d) / "property")
        seconds["property_fit"] = time.monotonic() - t0
        _stage(progress, f"property: fitted in {seconds['property_fit']:.1f} s")

    manifest = {
        "manifest": run.to_manifest(),
        "configHash": run.config_hash(),
        "planner": {"method": s.estimator.name, "budget": s.estimator.budget, "seed": s.estimator.seed,
                    "nPlayers": len(table["contributors"])},
        **table,
    }
    write_json(store, layout.MANIFEST, manifest)
    result = {
        "family": s.model.family,
        "resolution": size,
        "paramsFull": info["params_full"],
        "paramsPruned": info["params_pruned"],
        "prune": info["prune"],
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "images": int(len(images)),
        "skipped": len(table["skipped"]),
        "versions": _versions(),
        "summary": (f"{len(table['contributors'])} contributors, {len(images)} images "
                    f"({len(table['skipped'])} skipped), {s.model.family} params {info['params_full']:,} -> "
                    f"{info['params_pruned']:,}"),
    }
    write_json(store, layout.PREPARE_RESULT, result)
    _stage(progress, f"done: {result['summary']}")
    return result


# ---------------------------------------------------------------- coalition


@dataclass
class PreparedRun:
    """What every coalition of a run reuses: the spec, contributor table, family state and fitted property."""

    run: ValuationRun
    manifest: dict[str, Any]
    owner: np.ndarray
    state: Any  # what the family's load() returned: the sparsified model and anything else it reuses
    prop: Any  # the run's property, fitted in prepare and loaded from its cache
    replicated: frozenset[tuple[int, ...]] = frozenset()  # coalitions also evaluated under replicate seeds


@lru_cache(maxsize=2)
def prepared_run(run_uri: str, options: S3Options) -> PreparedRun:
    """What every coalition of a run reuses; cached per process (the local pool runs many coalitions)."""
    store = open_storage(run_uri, options)
    if not store.exists(layout.PREPARE_RESULT):
        raise NotReady(f"{run_uri}: prepare has not finished (no {layout.PREPARE_RESULT}); retry once it has")
    run = load_run(store)
    with np.load(io.BytesIO(store.read_bytes(layout.DATASET))) as z:
        images, owner = z["images"], z["owner"]
        captions = [str(c) for c in z["captions"]] if "captions" in z else [""] * len(images)
    tag = contributor_id(run_uri + store.read_bytes(layout.PREPARE_RESULT).decode())  # new prepare, new copy
    assets = _assets(options)
    prop = property_for(run.spec.property, assets.get)
    prop.fit(None, None, local_copy(store, layout.PROPERTY_CACHE, tag), seed=PROPERTY_SEED)
    data = TrainData(_to_tensor(images), owner, captions)
    state = get_family(run.spec.model.family).load(run, local_copy(store, layout.SPARSIFIED, tag), data, assets)
    manifest = read_json(store, layout.MANIFEST)
    replicated = frozenset(tuple(member_indices(c)) for c in
                           planner_for(run, len(manifest["contributors"])).replicated)
    return PreparedRun(run, manifest, owner, state, prop, replicated)


def _score(p: PreparedRun, samples: torch.Tensor, cid: str) -> float:
    utility = float(p.prop.score(samples))
    if not np.isfinite(utility):
        raise RuntimeError(f"property {p.run.spec.property.name!r} returned {utility} for coalition {cid}")
    return utility


@dataclass
class _Todo:
    """A coalition of a batch that has no result yet: what evaluating and storing it needs."""

    members: list[int]
    cid: str
    attempt: int
    mask: np.ndarray
    seeds: Seeds
    replicates: list[Seeds]


def run_coalition(run_uri: str, members: list[int], *, attempt: int = 1,
                  options: S3Options | None = None) -> dict[str, Any]:
    """The coalition step for one coalition; idempotent: an existing result.json is returned as is."""
    return run_coalitions(run_uri, [members], attempts=[attempt], options=options)[0]


def run_coalitions(run_uri: str, batch: Sequence[Sequence[int]], *, attempts: Sequence[int] | None = None,
                   options: S3Options | None = None) -> list[dict[str, Any]]:
    """The coalition step for a batch: the coalitions without a stored result (and their replicate seeds) are
    fine-tuned and sampled as one pack (:meth:`Family.coalitions`), then each is scored and gets its own
    ``result.json``; stored ones are returned as they are. ``attempts[i]`` is coalition i's attempt (default 1).

    ``seconds`` in a result are the coalition's share of the pack's stages; ``deviceSeconds`` its share of the
    pack's wall time on the device (what it cost), ``packedWith`` how many evaluations shared the pack."""
    options = options or S3Options()
    set_threads()
    store = open_storage(run_uri, options)
    p = prepared_run(run_uri, options)
    contributors = p.manifest["contributors"]
    attempts = list(attempts) if attempts is not None else [1] * len(batch)
    if len(attempts) != len(batch):
        raise BadInput(f"{len(attempts)} attempt number(s) for {len(batch)} coalition(s): give one per --members")
    s = p.run.spec
    crn = s.method.common_random_numbers
    results: list[dict[str, Any] | None] = [None] * len(batch)
    todo: list[tuple[int, _Todo]] = []
    for i, (members, attempt) in enumerate(zip(batch, attempts, strict=True)):
        members = sorted(int(m) for m in members)
        bad = [m for m in members if not 0 <= m < len(contributors)]
        if bad or len(set(members)) != len(members):
            raise BadInput(f"--members {members}: indices must be distinct and in [0, {len(contributors)})")
        cid = coalition_id([contributors[m]["id"] for m in members], p.manifest["configHash"])
        key = layout.coalition_result(cid)
        if store.exists(key):
            results[i] = read_json(store, key)
            continue
        reps = ([coalition_seeds(s.seed, cid, r, crn) for r in range(1, s.estimator.replicates.seeds + 1)]
                if tuple(members) in p.replicated else [])  # the between-seed noise is measured on these
        todo.append((i, _Todo(members, cid, attempt, np.isin(p.owner, members), coalition_seeds(s.seed, cid, 0, crn),
                              reps)))
    if not todo:
        return [r for r in results if r is not None]
    units = [(t.mask, seeds) for _, t in todo for seeds in (t.seeds, *t.replicates)]
    evaluated = get_family(s.model.family).coalitions(p.run, p.state, [u[0] for u in units], [u[1] for u in units])
    done, failed = 0, None
    for i, t in todo:
        own = evaluated[done : done + 1 + len(t.replicates)]
        done += len(own)
        try:
            results[i] = _store_result(store, p, t, own, len(units))
        except StorageUnavailable:
            raise  # the store is gone past the patience: the next writes would only wait as long again
        except Exception as error:  # noqa: BLE001 (raised below, once the pack's other results are stored)
            log.error("coalition %s: %s", t.cid, error)
            failed = failed or error
    if failed is not None:
        raise failed
    return [r for r in results if r is not None]


def _store_result(store: Storage, p: PreparedRun, t: _Todo, evaluated: list[tuple[torch.Tensor, dict[str, float]]],
                  packed_with: int) -> dict[str, Any]:
    """Score a coalition's samples (the first are its own, then its replicate seeds') and write its result; its
    seconds add up its evaluations' (shares of a pack's) stages, ``deviceSeconds`` all of them and the scoring."""
    contributors = p.manifest["contributors"]
    s = p.run.spec
    samples = [x for x, _ in evaluated]
    seconds: dict[str, float] = {}
    for _, took in evaluated:
        for stage, value in took.items():
            seconds[stage] = seconds.get(stage, 0.0) + value
    t0 = time.perf_counter()
    utility = _score(p, samples[0], t.cid)
    replicates = [{"replicate": r, "seeds": asdict(seeds), "utility": _score(p, x, t.cid)}
                  for r, (seeds, x) in enumerate(zip(t.replicates, samples[1:], strict=True), start=1)]
    seconds = {**seconds, "property": time.perf_counter() - t0}
    seconds["total"] = sum(seconds.values())
    with tempfile.TemporaryDirectory() as d:
        grid = save_grid(samples[0][:64], Path(d) / "samples.png")
        store.write_bytes(f"{layout.attempt_dir(t.cid, t.attempt)}/samples.png", grid.read_bytes())
    result = {
        "id": t.cid,
        "members": t.members,
        "memberNames": [contributors[m]["name"] for m in t.members],
        "utility": utility,
        "property": s.property.name,
        "attempt": t.attempt,
        "seeds": asdict(t.seeds),
        "commonRandomNumbers": s.method.common_random_numbers,
        "replicates": replicates,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "deviceSeconds": round(seconds["total"], 3),
        "device": _device_name(),
        "packedWith": packed_with,
        "versions": _versions(),
    }
    key = layout.coalition_result(t.cid)
    if not write_json(store, key, result, if_absent=True):  # another attempt won the race: keep its result
        return read_json(store, key)
    return result


def _device_name() -> str:
    """What the coalitions ran on: the CUDA device's name, else ``cpu``."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
