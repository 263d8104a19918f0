"""Small studies that reproduce the paper's diagnostics at CPU scale (`python -m rectok.study NAME`).

- fsd: linear probing along the flow with and without flow semantic distillation, and FSD + RAD
  against alignment or masked reconstruction alone (issue 12; rectok.study.fsd).
"""
