"""Size the digits demo: time every stage and check that the utility separates planted bad contributors.

    python benchmarks/demo_sizing.py --blocks 32,64 --seeds 0,1,2 --out sizing.json

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

from datacredit.jobs.device import seed_everything, set_threads
from datacredit.jobs.digits import demo_data
from datacredit.jobs.images import load_images, save_grid
from datacredit.jobs.pipeline import Prepared, coalition_utility, prepare_sparsified
from datacredit.jobs.properties import get_property
from datacredit.jobs.prune import prune_unet
from datacredit.jobs.sample import sample_ddim
from datacredit.jobs.train import Checkpoint, train_ddpm
from datacredit.jobs.unet import build_unet, count_params


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _clock(fn, *a, **kw) -> tuple[float, float]:
    """(wall, CPU) seconds of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn(*a, **kw)
    return time.perf_counter() - w, time.process_time() - c


def time_stages(args: argparse.Namespace, steps: int = 20) -> dict:
    """Seconds per training step (full and pruned model, both batch sizes), per DDIM sampling run and per
    property score, as (wall, CPU) pairs; CPU seconds are what a 1-thread run takes on an idle core."""
    torch.manual_seed(0)
    x = torch.rand(512, 1, 8, 8) * 2 - 1
    full = build_unet(8, 1, args.blocks, norm_num_groups=args.groups)
    train_ddpm(full, x, 2, batch_size=args.batch_size)  # warm-up
    out: dict = {"params_full": count_params(full)}
    for bs in sorted({args.batch_size, args.ft_batch_size}):
        w, c = _clock(train_ddpm, full, x, steps, batch_size=bs)
        out[f"full_train_step_bs{bs}"] = (w / steps, c / steps)
    pruned, _ = prune_unet(full, args.prune_ratio)
    out["params_pruned"] = count_params(pruned)
    for bs in sorted({args.batch_size, args.ft_batch_size}):
        w, c = _clock(train_ddpm, pruned, x, steps, batch_size=bs)
        out[f"pruned_train_step_bs{bs}"] = (w / steps, c / steps)
    for n in sorted({128, args.samples}):
        out[f"pruned_sample_{n}x{args.ddim_steps}"] = _clock(sample_ddim, pruned, n, args.ddim_steps)
    data = demo_data(seed=0)
    prop = get_property("quality")
    cache = Path(tempfile.mkdtemp(prefix="dc-timing-"))
    out["property_fit"] = _clock(prop.fit, load_images(data.reference, 8, 1), data.reference_labels, cache)
    samples = torch.rand(args.samples, 1, 8, 8) * 2 - 1
    out[f"property_score_{args.samples}"] = _clock(prop.score, samples)
    return {k: [round(v, 4) for v in val] if isinstance(val, tuple) else val for k, val in out.items()}


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
    ap.add_argument("--prepared", type=Path, default=None,
                    help="checkpoint folder: loaded when present, else written after prepare")
    ap.add_argument("--timing", action="store_true", help="only time the stages (wall and CPU seconds)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--grids", type=Path, default=None, help="folder for sample grids")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    seed_everything(0)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "loadavg_start": os.getloadavg()}
    if args.timing:
        report["timing"] = time_stages(args)
        print(json.dumps(report, indent=1, default=str))
        return report

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
    if args.prepared and (args.prepared / "sparsified").is_dir():
        prep = Prepared(Checkpoint.load(args.prepared / "sparsified"), Checkpoint.load(args.prepared / "full"),
                        json.loads((args.prepared / "info.json").read_text()))
    else:
        prep = prepare_sparsified(everything, arch=arch, train_steps=args.train_steps, train_lr=args.train_lr,
                                  batch_size=args.batch_size, prune_ratio=args.prune_ratio,
                                  finetune_steps=args.prune_ft_steps, finetune_lr=args.train_lr, seed=0)
        if args.prepared:
            prep.sparsified.save(args.prepared / "sparsified")
            prep.full.save(args.prepared / "full")
            (args.prepared / "info.json").write_text(json.dumps(prep.info, default=str))
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
