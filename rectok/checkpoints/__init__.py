"""Everything on disk.

- store: our training checkpoints (atomic writes, manifest with sha256, verified resume, run
  folder hygiene) and the safetensors exports with their .sha256 sidecar;
- loading: a tokenizer or DiT^DH from any of our files or an official one, verified;
- official, official_tokenizer, official_dit: the official release's layouts, both ways.
"""
