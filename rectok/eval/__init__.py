"""Evaluation of RecTok (SPEC section 8): gFID / IS of samples, tokenizer PSNR / SSIM / rFID, and
linear probing along the flow. Command line: `python -m rectok.eval {fid,is,stats,recon,probe}`.

Modules: image_metrics (PSNR, SSIM, uint8 quantisation), image_io (ADM npz / folder readers,
ADM center crop), inception (the TF-FID Inception-v3 of torch-fidelity, local weights only),
fid (FID, IS, reference statistics), reconstruction, probe, cli.
"""
