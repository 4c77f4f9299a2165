"""Size the digits demo: time every stage and check that the utility separates planted bad contributors.

    python -m datacredit.jobs.sizing --blocks 32,64 --seeds 0,1,2 --out sizing.json

Prepares a sparsified model on all demo contributors (7 clean + noise, blank, duplicate), then evaluates
v(S) for a few coalitions (clean only, all, all but one bad, clean plus one bad) over several seeds with
both demo properties, and prints seconds per stage. A development tool, not used by the worker.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .device import seed_everything, set_threads
from .digits import demo_data
from .images import load_images, save_grid
from .pipeline import coalition_utility, prepare_sparsified
from .properties import get_property
from .sample import sample_ddim


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=_ints, default=(32, 64))
    ap.add_argument("--groups", type=int, default=8, help="GroupNorm groups")
    ap.add_argument("--train-steps", type=int, default=1500)
    ap.add_argument("--train-lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--prune-ratio", type=float, default=0.3)
    ap.add_argument("--prune-ft-steps", type=int, default=400)
    ap.add_argument("--ft-steps", type=int, default=150)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--ft-batch-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--ddim-steps", type=int, default=20)
    ap.add_argument("--seeds", type=_ints, default=(0, 1, 2))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--coalitions", default="clean,all,all-noise,all-blank,all-duplicate,clean+noise,"
                    "clean+blank,clean+duplicate")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--grids", type=Path, default=None, help="folder for sample grids")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    seed_everything(0)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "loadavg_start": os.getloadavg()}

    data = demo_data(seed=0)
    imgs = {name: load_images(blobs, 8, 1) for name, blobs in data.contributors.items()}
    clean = [n for n in imgs if n.startswith("clean-")]
    ref = load_images(data.reference, 8, 1)
    cache = Path(tempfile.mkdtemp(prefix="dc-sizing-"))
    props = {name: get_property(name) for name in ("quality", "diversity")}
    t0 = time.perf_counter()
    for p in props.values():
        p.fit(ref, data.reference_labels, cache, seed=0)
    report["property_fit_s"] = time.perf_counter() - t0
    report["classifier"] = props["quality"].info

    def scores(x: torch.Tensor) -> dict[str, float]:
        return {k: round(p.score(x), 3) for k, p in props.items()}

    g = torch.Generator().manual_seed(0)
    real = torch.cat([imgs[n] for n in clean])
    report["baselines"] = {
        "real": scores(real[torch.randperm(len(real), generator=g)[: args.samples]]),
        "noise": scores(imgs["noise"][: args.samples]),
    }
    print("classifier", report["classifier"], "fit s", round(report["property_fit_s"], 2), flush=True)
    print("baselines", report["baselines"], flush=True)

    everything = torch.cat(list(imgs.values()))
    arch = {"block_out_channels": args.blocks, "norm_num_groups": args.groups}
    prep = prepare_sparsified(everything, arch=arch, train_steps=args.train_steps, train_lr=args.train_lr,
                              batch_size=args.batch_size, prune_ratio=args.prune_ratio,
                              finetune_steps=args.prune_ft_steps, finetune_lr=args.train_lr, seed=0)
    report["prepare"] = prep.info
    n_train = max(1, args.train_steps)
    report["prepare"]["train_s_per_step"] = prep.info["seconds"].get("train", 0) / n_train
    n_ft = max(1, args.prune_ft_steps)
    report["prepare"]["prune_ft_s_per_step"] = prep.info["seconds"]["prune_finetune"] / n_ft
    t0 = time.perf_counter()
    full_samples = sample_ddim(prep.full.inference_model, args.samples, args.ddim_steps, seed=0)
    report["prepare"]["full_sample_s"] = time.perf_counter() - t0
    report["prepare"]["full_model"] = scores(full_samples)
    report["prepare"]["sparsified_model"] = scores(
        sample_ddim(prep.sparsified.inference_model, args.samples, args.ddim_steps, seed=0))
    print("prepare", json.dumps(report["prepare"], default=str), flush=True)
    if args.grids:
        save_grid(full_samples[:64], args.grids / "full.png")

    def members(spec: str) -> list[str]:
        base, _, extra = spec.partition("+")
        base, _, minus = base.partition("-")
        names = clean if base == "clean" else list(imgs)
        names = [n for n in names if n != minus]
        return names + ([extra] if extra else [])

    report["coalitions"] = {}
    for spec in args.coalitions.split(","):
        x = torch.cat([imgs[n] for n in members(spec)])
        runs = []
        for seed in args.seeds:
            r = coalition_utility(prep.sparsified, x, props["quality"], steps=args.ft_steps, lr=args.ft_lr,
                                  batch_size=args.ft_batch_size, n_samples=args.samples,
                                  ddim_steps=args.ddim_steps, seed=seed)
            runs.append({"quality": r.utility, "diversity": props["diversity"].score(r.samples), **r.seconds})
            if args.grids and seed == args.seeds[0]:
                save_grid(r.samples[:64], args.grids / f"{spec}.png")
        summary = {k: (statistics.mean(v[k] for v in runs), statistics.pstdev(v[k] for v in runs))
                   for k in runs[0]}
        report["coalitions"][spec] = {"runs": runs, "mean_sd": summary}
        line = "  ".join(f"{k} {m:8.3f} ± {s:.3f}" for k, (m, s) in summary.items())
        print(f"{spec:18s} {line}", flush=True)
    report["loadavg_end"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
