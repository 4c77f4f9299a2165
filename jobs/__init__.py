"""GPU-side workloads (``datacredit.jobs``): imports torch, so never import it from ``datacredit`` core.

Modules: ``worker`` (the prepare and coalition steps around storage), ``families`` (``ddpm``, ``ldm``,
``sd-lora``: prepare / load / coalition of each model family), ``properties`` (registry of global properties),
``device`` (device, seeding, threads), ``images`` (decode / check / grids), ``digits`` (the demo data),
``unet`` (build, save/load pruned UNets), ``prune`` (torch-pruning), ``train`` (DDPM + EMA, checkpoints),
``sample`` (DDIM), ``pipeline`` (the ddpm stages on tensors).
"""
