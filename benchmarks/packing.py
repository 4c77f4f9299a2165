"""Coalitions per hour: packed (K per program) against one per process and one at a time, side by side.

    python benchmarks/packing.py            # demo scale on CPU (+ the paper's CIFAR scale on CUDA when there is one)
    python benchmarks/packing.py --quick    # fewer coalitions (CI-sized; prints, writes nothing)

CPU, demo scale (the digits demo's coalition settings: pruned UNet (32, 64) at 8x8, 40 fine-tuning steps of batch
32, 128 samples, 16 DDIM steps), one torch thread each, on one prepared run:

- ``process``: a fresh ``datacredit worker coalition`` process per coalition, what one Job per coalition costs
  (imports, loading the run, then the work);
- ``sequential``: one coalition after another in one warm process (the local pool before packing);
- ``packed``: all of them as one pack (``run_coalitions``).

It prints coalitions per hour and the ratios, checks the packed utilities against the sequential ones, and writes
``benchmarks/results/packing.json``. With CUDA it adds the paper's CIFAR scale (UNet (128, 256, 256, 256) at
32x32 pruned to ~20M parameters, batch 128, a few steps): eager one at a time against packed eager, packed bf16
and packed bf16 + torch.compile; without CUDA that section says it was not run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("DATACREDIT_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from datacredit import layout  # noqa: E402
from datacredit.demo import build_demo  # noqa: E402
from datacredit.runloop import write_run_json  # noqa: E402
from datacredit.spec import parse_manifest  # noqa: E402
from datacredit.storage import open_storage  # noqa: E402

OUT = Path(__file__).parent / "results" / "packing.json"


def _prepared_run(root: Path) -> str:
    """The demo's run with a short prepare (what is measured is the coalitions): its prepared folder."""
    import yaml

    from datacredit.jobs.worker import run_prepare

    doc = yaml.safe_load(build_demo(root).read_text())
    spec = doc["spec"]
    spec["model"]["train"]["steps"] = 100
    spec["method"]["prune"]["finetuneSteps"] = 20
    spec["estimator"]["replicates"] = {"coalitions": 0, "seeds": 0}  # one evaluation per coalition
    spec["storage"]["uri"] = str(root / "runs")
    run = parse_manifest(doc)
    uri = str(root / "prepared")
    write_run_json(open_storage(uri), run)
    run_prepare(uri)
    return uri


def _fresh(prepared: str, name: str) -> str:
    """A copy of the prepared run with no coalition results."""
    target = Path(prepared).parent / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(prepared, target, ignore=shutil.ignore_patterns(layout.COALITIONS))
    return str(target)


def _coalitions(n_players: int, count: int, seed: int = 0) -> list[list[int]]:
    """``count`` distinct non-empty coalitions, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    while len(out) < count:
        members = sorted(int(i) for i in np.flatnonzero(rng.random(n_players) < 0.5))
        if members and members not in out:
            out.append(members)
    return out


def _per_process(uri: str, batch: list[list[int]]) -> float:
    """Seconds for a fresh ``datacredit worker coalition`` process per coalition, one after another."""
    exe = str(Path(sys.executable).parent / "datacredit")
    t0 = time.perf_counter()
    for members in batch:
        subprocess.run([exe, "worker", "coalition", "--run", uri, "--members", ",".join(map(str, members))],
                       check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def cpu_section(count: int, root: Path) -> dict[str, Any]:
    from datacredit.jobs.worker import prepared_run, run_coalition, run_coalitions
    from datacredit.storage import S3Options

    prepared = _prepared_run(root)
    n = len(prepared_run(prepared, S3Options()).manifest["contributors"])
    batch = _coalitions(n, count)
    print(f"cpu: {count} coalitions of {n} contributors at demo scale, one thread each", flush=True)

    seq_uri = _fresh(prepared, "sequential")
    prepared_run(seq_uri, S3Options())  # loaded once, as a warm pool worker has it
    t0 = time.perf_counter()
    sequential = [run_coalition(seq_uri, m)["utility"] for m in batch]
    t_seq = time.perf_counter() - t0
    print(f"  sequential (one warm process): {t_seq:.1f} s", flush=True)

    packed_uri = _fresh(prepared, "packed")
    prepared_run(packed_uri, S3Options())
    t0 = time.perf_counter()
    packed_results = run_coalitions(packed_uri, batch)
    t_packed = time.perf_counter() - t0
    packed = [r["utility"] for r in packed_results]
    print(f"  packed (K = {count}): {t_packed:.1f} s", flush=True)

    t_proc = _per_process(_fresh(prepared, "process"), batch)
    print(f"  one process per coalition: {t_proc:.1f} s", flush=True)

    diff = float(np.max(np.abs(np.array(packed) - np.array(sequential))))
    per_hour = {k: round(3600 * count / v, 1) for k, v in
                {"process": t_proc, "sequential": t_seq, "packed": t_packed}.items()}
    return {
        "coalitions": count, "contributors": n, "threads": 1,
        "seconds": {"process": round(t_proc, 2), "sequential": round(t_seq, 2), "packed": round(t_packed, 2)},
        "coalitionsPerHour": per_hour,
        "ratio": {"packedVsProcess": round(t_proc / t_packed, 2), "packedVsSequential": round(t_seq / t_packed, 2)},
        "maxUtilityDiffPackedVsSequential": diff,
        "utilityRange": float(np.ptp(sequential)),
    }


def cuda_section(k: int, steps: int) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"run": False, "why": "no CUDA device on this machine; the packed path's bf16 autocast and "
                                     "torch.compile are tested on CPU (tests/test_packed.py), CUDA was not run"}
    from datacredit.jobs.packed import PackItem, PackOptions, finetune_and_sample_packed
    from datacredit.jobs.pipeline import finetune_and_sample
    from datacredit.jobs.prune import prune_unet
    from datacredit.jobs.train import Checkpoint, EMAState
    from datacredit.jobs.unet import build_unet, count_params

    device = torch.device("cuda")
    full = build_unet(sample_size=32, in_channels=3, block_out_channels=(128, 256, 256, 256))
    pruned, _ = prune_unet(full, 0.3, "magnitude", seed=0)  # the paper's 35.7M -> ~20M parameters
    pruned = pruned.to(device)
    start = Checkpoint(pruned, EMAState(copy.deepcopy(pruned).eval(), 1000))
    images = torch.rand(k, 500, 3, 32, 32) * 2 - 1
    items = [PackItem(images[i], 100 + i, 7) for i in range(k)]
    base = {"steps": steps, "lr": 1e-4, "batch_size": 128, "n_samples": 256, "ddim_steps": 20}

    def timed(fn: Any) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    eager = timed(lambda: [finetune_and_sample(start, it.images, steps=steps, lr=1e-4, batch_size=128, n_samples=256,
                                               ddim_steps=20, seed=it.seed, noise_seed=it.noise_seed) for it in items])
    out: dict[str, Any] = {"run": True, "device": torch.cuda.get_device_name(), "k": k, "steps": steps,
                           "paramsPruned": count_params(pruned), "seconds": {"eagerOneAtATime": round(eager, 2)}}
    for name, extra in {"packedEager": {}, "packedBf16": {"bf16": True},
                        "packedBf16Compiled": {"bf16": True, "compile": True}}.items():
        options = PackOptions(**base, **extra)
        finetune_and_sample_packed(start, items[:2], PackOptions(**{**base, "steps": 2}, **extra), device)  # warm
        out["seconds"][name] = round(timed(lambda o=options: finetune_and_sample_packed(start, items, o, device)), 2)
    single = PackOptions(**base, bf16=True, compile=True)
    out["seconds"]["compiledBf16OneAtATime"] = round(timed(
        lambda: [finetune_and_sample_packed(start, [it], single, device) for it in items]), 2)
    out["ratio"] = {k2: round(eager / v, 2) for k2, v in out["seconds"].items() if k2 != "eagerOneAtATime"}
    out["ratio"]["packedBf16CompiledVsCompiledOneAtATime"] = round(
        out["seconds"]["compiledBf16OneAtATime"] / out["seconds"]["packedBf16Compiled"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 coalitions; print only")
    parser.add_argument("--coalitions", type=int, default=8, help="coalitions per mode (the pack size K)")
    parser.add_argument("--cuda-steps", type=int, default=20, help="fine-tuning steps at CIFAR scale on CUDA")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    count = 4 if args.quick else args.coalitions
    with tempfile.TemporaryDirectory() as d:
        report = {"cpu": cpu_section(count, Path(d)), "cuda": cuda_section(count, args.cuda_steps)}
    cpu = report["cpu"]
    print(f"coalitions/hour: packed {cpu['coalitionsPerHour']['packed']}, one per process "
          f"{cpu['coalitionsPerHour']['process']} ({cpu['ratio']['packedVsProcess']}x), one at a time in a warm "
          f"process {cpu['coalitionsPerHour']['sequential']} ({cpu['ratio']['packedVsSequential']}x); packed vs "
          f"alone: max utility difference {cpu['maxUtilityDiffPackedVsSequential']:.2e} (utilities span "
          f"{cpu['utilityRange']:.3g})")
    print(f"cuda: {json.dumps(report['cuda'])}")
    if not args.quick:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
