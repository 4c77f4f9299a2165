"""GPU-side workloads (``datacredit.jobs``): imports torch, so never import it from ``datacredit`` core.

Modules: ``device`` (device, seeding, threads), ``images`` (decode / check / grids), ``digits`` (the demo
data), ``unet`` (build, save/load pruned UNets), ``prune`` (torch-pruning), ``train`` (DDPM + EMA,
checkpoints), ``sample`` (DDIM), ``properties`` (registry: ``quality``, ``diversity``), ``pipeline``
(prepare / coalition stages on tensors), ``sizing`` (timing and separation check for the demo).
"""
