"""The networks and what defines their inputs (SPEC sections 1-3, 6).

- tokenizer: RecTok (ViT encoder, pixel decoder, semantic decoder), its presets and posterior;
- dit: DiT^DH (trunk + wide head), presets, latent normalisation;
- layers: the blocks both share (RMSNorm, SwiGLU, RoPE attention);
- flow: the forward flow x_t = (1 - t) x0 + t eps, the time shift and the masking schedule;
- teacher: the frozen DINOv3 / DINOv2 teacher and its targets; teacher_weights: loading its
  weights from every layout offline;
- discriminator: the PatchGAN of the GAN loss.
"""
