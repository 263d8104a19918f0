"""The training stages train.py runs, one job per module.

- runtime: the run (device, precision, ranks, run folder, logging), seeding and RNG state,
  block-wise compile, the optimizer step that skips non-finite updates;
- progress: the step schedule, where a run stands (step, data position, non-finite counters),
  resuming it, and the per-step log line / progress bar;
- batches: the dataset folder, the loaders, held-out images, micro-batches per optimizer step;
- tokenizer_stage: stage 1 (RecTok: FSD + RAD) and stage 2 (pixel decoder fine-tuning);
- latents: latent statistics and the latent cache of the DiT^DH stage;
- dit_stage: DiT^DH on the frozen tokenizer's latents;
- reports: image grids and the end-of-run metrics.json.
"""
