"""The training stages train.py runs, one job per module.

- tokenizer_stage: stage 1 (RecTok: FSD + RAD along the flow, against the frozen teacher);
- decoder_stage: stage 2 (pixel-decoder fine-tuning on the frozen encoder);
- dit_stage: DiT^DH on the frozen tokenizer's latents;
- tokenizer_training: what stages 1 and 2 share (losses, discriminator, data, resume, saving, grids);
- loop: what every stage's loop shares (checkpoint entries, resume position, periodic hooks);
- config, losses, optim, ema, distributed: configuration, loss terms, AdamW + schedules, EMA, ranks;
- runtime: the run (device, precision, ranks, run folder, logging), seeding and RNG state,
  the optimizer step that skips non-finite updates;
- compiling: torch.compile from outside the models, per network or per block (--compile_scope);
- progress: the step schedule, where a run stands (step, data position, non-finite counters) and
  the per-step log line / progress bar;
- batches: the dataset folder, the loaders, held-out images, micro-batches per optimizer step;
- latents: latent statistics and the latent cache of the DiT^DH stage
  (`python -m rectok.training.latent_stats` computes the statistics on their own);
- reports: the end-of-run metrics.json.
"""
