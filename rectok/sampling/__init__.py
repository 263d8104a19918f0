"""Generation (SPEC section 7).

- euler: the Euler sampler on the shifted time grid with classifier-free guidance / AutoGuidance;
- generate: what sample.py drives: checkpoints -> sampler (optionally CUDA-graphed) -> npz shards.
"""
