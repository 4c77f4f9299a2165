"""Benchmark: the paper's Table 1 (LDS) and Table 2 (cost) at CPU scale, on the digits demo.

Builds the digits demo with ``--contributors`` contributors (three of them planted bad: noise, blank,
duplicate), runs the sparsified-FT valuation (KernelSHAP), then ``datacredit evaluate``'s machinery: LDS of
sparsified-FT Shapley, LOO by retraining, FT-Shapley and retraining Shapley at the same compute budget (seconds)
as the sparsified-FT run, pixel and embedding similarity, Banzhaf and a datamodel fitted on the run's coalitions,
D-TRAK on the full model and pro-rata by image count; counterfactuals; the speedup of one sparsified-FT
coalition over a full retrain; and the Pearson correlation of sparsified-FT and retrained utilities on the test
coalitions (the paper's Appendix D check), which explains a loss when there is one.

Run ``python benchmarks/paper_table.py`` (8 contributors; about 40 minutes on 2 busy cores) to write
benchmarks/results/paper_table.json and docs/paper_table.md, or ``--tiny`` (CI, a few minutes) which writes
only under ``--out`` (default: a temporary folder). ``--family ldm`` and ``--family sd-lora`` measure the same
tables for the other families on 4 contributors, with tiny autoencoders / a tiny Stable Diffusion pretrained on
digits first (:mod:`tiny_pretrained`); sd-lora adds the caption proxy's rows. They write
benchmarks/results/paper_table_<family>.json and docs/paper_table_<family>.md. Retrained utilities are stored in
the run, so a rerun with the same ``--dir`` reuses them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from datacredit.demo import QUICK, demo_manifest
from datacredit.jobs.digits import demo_data
from datacredit.jobs.evaluate import EvalSettings, GroundTruth, evaluate, report_tables, side_by_side
from datacredit.local import execute
from datacredit.runstate import open_run
from datacredit.spec import parse_manifest

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("ddpm", "ldm", "sd-lora")
RESULTS = {f: ROOT / "benchmarks" / "results" / ("paper_table.json" if f == "ddpm" else
                                                 f"paper_table_{f.replace('-', '_')}.json") for f in FAMILIES}
DOC = {f: ROOT / "docs" / ("paper_table.md" if f == "ddpm" else f"paper_table_{f.replace('-', '_')}.md")
       for f in FAMILIES}
BAD = ("noise", "blank", "duplicate")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

SIZES = {
    "full": {"contributors": 8, "train": {"steps": 150, "learningRate": 2e-3, "batchSize": 32}, "budget": 32,
             "estimator": "kernel", "repeats": 3,
             "settings": EvalSettings(alphas=(0.25, 0.5, 0.75), subsets=8, seeds=2)},
    "tiny": {"contributors": 4, "train": {"steps": 30, "learningRate": 2e-3, "batchSize": 32}, "budget": 16,
             "estimator": "exact", "repeats": 1,
             "settings": EvalSettings(alphas=(0.5,), subsets=3, seeds=2,
                                      baselines=("loo", "ft-shapley", "pixel", "embedding", "d-trak"))},
    # latent: a UNet on the latents of a tiny VQ-VAE pretrained on digits, the tiny mode's 4 contributors
    "ldm": {"contributors": 4, "train": {"steps": 400, "learningRate": 2e-3, "batchSize": 32}, "budget": 16,
            "estimator": "exact", "repeats": 2,
            "settings": EvalSettings(alphas=(0.5,), subsets=5, seeds=2, fraction=0.25)},
    # text-conditional: a LoRA on a tiny Stable Diffusion pretrained on digits; clean contributors own whole
    # digit classes and caption each image with its digit's name, the noise contributor captions "noise"
    "sd-lora": {"contributors": 4, "train": {"steps": 120, "learningRate": 2e-3, "batchSize": 32}, "budget": 16,
                "estimator": "exact", "repeats": 2, "finetuneSteps": 20,
                "settings": EvalSettings(alphas=(0.5,), subsets=5, seeds=2, fraction=0.25)},
}


def build(root: Path, size: dict[str, Any]) -> dict[str, Any]:
    """Write the demo data with ``size['contributors']`` contributors; return the manifest."""
    n_bad = min(len(BAD), size["contributors"] - 2)
    folder = root / "data-quick"
    if not (folder / "images").exists():
        data = demo_data(n_clean=size["contributors"] - n_bad, bad=BAD[:n_bad], seed=0)
        for name, blobs in data.contributors.items():
            (folder / "images" / name).mkdir(parents=True, exist_ok=True)
            for i, b in enumerate(blobs):
                (folder / "images" / name / f"{i:04d}.png").write_bytes(b)
        for i, (b, label) in enumerate(zip(data.reference, data.reference_labels, strict=True)):
            (folder / "reference" / str(int(label))).mkdir(parents=True, exist_ok=True)
            (folder / "reference" / str(int(label)) / f"{i:04d}.png").write_bytes(b)
    m = demo_manifest(root, quick=True)
    m["metadata"]["name"] = f"paper-table-{size['contributors']}"
    m["spec"]["model"]["train"] = size["train"]
    m["spec"]["estimator"] = {"name": size["estimator"], "budget": size["budget"], "seed": 0}
    return m


def _digits_16px() -> Any:
    """Every sklearn digit as (N, 1, 16, 16) in [-1, 1]: what the tiny autoencoders are pretrained on (a base model
    has seen the domain)."""
    import torch

    from datacredit.jobs.digits import digit_arrays

    x = torch.from_numpy(digit_arrays()[0]).float().div(127.5).sub(1)[:, None]
    return torch.nn.functional.interpolate(x, size=16, mode="bilinear")


def build_ldm(root: Path, size: dict[str, Any]) -> dict[str, Any]:
    """The latent setting: the ddpm data at 16 px, a UNet on the 3x8x8 latents of a tiny VQ-VAE pretrained on
    digits (:mod:`tiny_pretrained`); the manifest."""
    from tiny_pretrained import pretrained_vqmodel  # benchmarks/ is on the path when this runs as a script

    m = build(root, size)
    m["metadata"]["name"] = f"paper-table-ldm-{size['contributors']}"
    vq = pretrained_vqmodel(root / "vq", _digits_16px(), steps=300)
    m["spec"]["model"] = {"family": "ldm", "autoencoder": str(vq), "train": size["train"],
                          "architecture": {"sampleSize": 8, "blockOutChannels": QUICK["blocks"]}}
    m["spec"]["dataset"]["resolution"] = 16
    return m


def build_sd_lora(root: Path, size: dict[str, Any]) -> dict[str, Any]:
    """The conditional setting: digits at 16 px with sidecar captions (a clean image's digit name, "noise" for the
    noise contributor), a tiny Stable Diffusion pretrained on all digits (:mod:`tiny_pretrained`); the manifest."""
    from tiny_pretrained import pretrained_pipeline  # benchmarks/ is on the path when this runs as a script


    folder = root / "data-sd"
    data = demo_data(n_clean=size["contributors"] - 1, bad=("noise",), split="class", seed=0)
    if not (folder / "images").exists():
        for name, blobs in data.contributors.items():
            (folder / "images" / name).mkdir(parents=True, exist_ok=True)
            words = [DIGIT_WORDS[int(k)] for k in data.labels[name]] if name in data.labels else ["noise"] * len(blobs)
            for i, (b, word) in enumerate(zip(blobs, words, strict=True)):
                (folder / "images" / name / f"{i:04d}.png").write_bytes(b)
                (folder / "images" / name / f"{i:04d}.txt").write_text(word + "\n")
        for i, (b, label) in enumerate(zip(data.reference, data.reference_labels, strict=True)):
            (folder / "reference" / str(int(label))).mkdir(parents=True, exist_ok=True)
            (folder / "reference" / str(int(label)) / f"{i:04d}.png").write_bytes(b)
    pipe = pretrained_pipeline(root / "sd", _digits_16px().repeat(1, 3, 1, 1), vae_steps=300, unet_steps=400)
    k = size["finetuneSteps"]
    return {"apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun",
            "metadata": {"name": f"paper-table-sd-lora-{size['contributors']}"},
            "spec": {"model": {"family": "sd-lora", "checkpoint": str(pipe), "prompt": "",
                               "lora": {"rank": 8}, "train": size["train"]},
                     "dataset": {"images": str(folder / "images"), "channels": 1, "resolution": 16,
                                 "captions": "sidecar"},
                     "property": {"name": "quality", "samples": 32, "reference": str(folder / "reference")},
                     "method": {"prune": {"ratio": 0.5, "finetuneSteps": k},
                                "finetune": {"steps": k, "learningRate": 2e-3, "batchSize": 32},
                                "sampler": {"steps": 10, "guidanceScale": 1.0}},
                     "estimator": {"name": size["estimator"], "budget": size["budget"], "seed": 0},
                     "execution": {"parallelism": 1},
                     "storage": {"uri": str(root / "runs")}}}


def _fmt(d: dict[str, Any] | None) -> str:
    if not d or d["mean"] is None or not math.isfinite(d["mean"]):
        return "n/a"
    return f"{d['mean']:+.1f} ± {(d['ci95'][1] - d['ci95'][0]) / 2:.1f}"


def markdown(report: dict[str, Any], meta: dict[str, Any]) -> str:
    """Table 1 (LDS), the counterfactuals and Table 2 (cost) as markdown."""
    alphas = report["settings"]["alphas"]
    lines = [f"Measured by `{meta['command']}` ({meta['contributors']} contributors, property "
             f"`{report['property']}`, {report['settings']['subsets']} test coalitions per α, "
             f"{report['settings']['seeds']} retraining seeds; 95% CI = 1.96·sd/√seeds; "
             f"wall {meta['wallSeconds']:.0f} s).",
             "", "**Table 1: LDS (%)**", "",
             "| Method | " + " | ".join(f"α = {a}" for a in alphas) + " | coalitions / seconds |",
             "|---|" + "---:|" * (len(alphas) + 1)]
    for name, by_alpha in report["lds"].items():
        b = report["budget"].get(name)
        spend = f"{b['coalitions']} / {b['seconds']:.0f}" if b else "-"
        lines.append(f"| {name} | " + " | ".join(_fmt(by_alpha[str(a)]) for a in alphas) + f" | {spend} |")
    st = report["settings"]
    if "D-TRAK" in report["lds"]:
        lines += ["", f"D-TRAK: gradients of the unpruned full model's mean squared output over {st['trak_timesteps']} "
                      f"(timestep, noise) draws per image, projected to {st['trak_dim']:,} dimensions, kernel ridge "
                      f"λ = {st['trak_ridge']}, summed over a contributor's images and averaged over the full model's "
                      "samples; it trains no coalition."]
    if "caption proxy (no training)" in report["lds"]:
        lines += ["", "Caption proxy: the unpruned full LoRA sampled on a coalition's captions only (one caption per "
                      "sample, drawn from its images; ∅ the empty prompt), with no training: a proxy for the "
                      "utility, not the utility."]
    for name, why in report.get("skipped", {}).items():
        lines += ["", f"{name}: skipped, {why}."]
    frac = st["fraction"]
    lines += ["", f"**Counterfactual: ΔF (%) vs. the full set after retraining, removing {frac:.0%}**", "",
              "| Method | remove top | removed | remove bottom | removed |", "|---|---:|---|---:|---|"]
    for name, d in report["counterfactual"].items():
        lines.append(f"| {name} | {_fmt(d['top'])} | {', '.join(d['top']['removed'])} | {_fmt(d['bottom'])} | "
                     f"{', '.join(d['bottom']['removed'])} |")
    c, a, t = report["cost"], report["agreement"], meta["sideBySideSeconds"]
    lines += ["", "**Table 2: efficiency** (median seconds on all contributors, measured alternately in one process)",
              "", "| | digits |", "|---|---:|",
              f"| Parameters, full → pruned | {c['paramsFull']:,} → {c['paramsPruned']:,} |",
              f"| Full-model train steps / FT steps k | {meta['trainSteps']} / {meta['finetuneSteps']} |",
              f"| Full retrain (train + sample + score) | {t['retrain']:.2f} s |",
              f"| Sparsified-FT coalition | {t['sparsified']:.2f} s |",
              f"| FT (unpruned) coalition | {t['ftFull']:.2f} s |",
              f"| Speedup vs. retrain: sparsified-FT / FT unpruned | {meta['speedup']:.1f}× / "
              f"{meta['speedupFTFull']:.1f}× |",
              "", f"Sparsified-FT vs. retrained utilities on the {a['pairs']} test coalitions: Pearson "
              f"{a['pearsonSparsifiedVsRetrain']:.2f}, Spearman {a['spearmanSparsifiedVsRetrain']:.2f}"
              + (f"; FT (unpruned) vs. retrained: Pearson {a['pearsonFTFullVsRetrain']:.2f}"
                 if a.get("pearsonFTFullVsRetrain") is not None else "")
              + (f"; caption proxy vs. retrained: Pearson {a['pearsonProxyVsRetrain']:.2f}"
                 if a.get("pearsonProxyVsRetrain") is not None else "") + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CI size: 4 contributors, a few minutes; writes under --out")
    ap.add_argument("--family", choices=FAMILIES, default="ddpm",
                    help="ddpm: the digits demo (default); ldm: a UNet on a tiny VQ-VAE's latents, 4 contributors; "
                         "sd-lora: a LoRA on a tiny Stable Diffusion, with captions, adding the caption proxy's rows "
                         "(each about 10 minutes once their tiny models are pretrained)")
    ap.add_argument("--contributors", type=int, help="Contributors (default 8; tiny 4); three are planted bad.")
    ap.add_argument("--subsets", type=int, help="LDS test coalitions per alpha (default 8; tiny 3).")
    ap.add_argument("--seeds", type=int, help="Retraining seeds per test coalition (default 2).")
    ap.add_argument("--dir", type=Path, help="Work folder for data and runs (default: a temporary folder).")
    ap.add_argument("--out", type=Path, help="Results JSON (default: benchmarks/results/paper_table.json; "
                                             "tiny: <tmp>/paper_table.json).")
    args = ap.parse_args()
    size = dict(SIZES[args.family if args.family != "ddpm" else "tiny" if args.tiny else "full"])
    if args.contributors:
        size["contributors"] = args.contributors
    for key in ("subsets", "seeds"):
        if getattr(args, key):
            size["settings"] = replace(size["settings"], **{key: getattr(args, key)})
    work = args.dir or Path(tempfile.mkdtemp(prefix="paper-table-"))
    out = args.out or (work / "paper_table.json" if args.tiny else RESULTS[args.family])
    console = Console(stderr=True)
    started = time.monotonic()
    run = parse_manifest({"ddpm": build, "ldm": build_ldm, "sd-lora": build_sd_lora}[args.family](work.resolve(), size))
    execute(run, console=console)
    uri = open_run(run).uri
    report = evaluate(uri, size["settings"], console=console)
    timing = side_by_side(GroundTruth(uri, open_run(run).options), repeats=size["repeats"])
    meta = {"command": "python benchmarks/paper_table.py " + " ".join(sys.argv[1:]),
            "contributors": size["contributors"], "finetuneSteps": run.spec.method.finetune.steps,
            "trainSteps": size["train"]["steps"], "wallSeconds": time.monotonic() - started,
            "sideBySideSeconds": timing, "speedup": timing["retrain"] / timing["sparsified"],
            "speedupFTFull": timing["retrain"] / timing["ftFull"]}
    for table in report_tables(report):
        Console().print(table)
    md = markdown(report, meta)
    print(md)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "report": report}, indent=1) + "\n")
    if not args.tiny and args.out is None:
        title = {"ddpm": "", "ldm": ", latent (ldm)", "sd-lora": ", text-conditional (sd-lora)"}[args.family]
        DOC[args.family].write_text(f"# Paper tables at CPU scale{title} (generated by benchmarks/paper_table.py)\n\n"
                                    + md)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
