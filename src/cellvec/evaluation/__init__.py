"""Evaluation: cross-validation against baselines and real peers, curves and scenarios.

Evaluation sits above `cell_index`: it fits encoders and maps cells exactly as
`atlas build` and `map` do, and `cell_index` never imports it back. The metrics
and the folds they are scored in live below both, in `cellvec.metrics`, so mapping
and the client score labels without importing evaluation. Nothing is imported
here; the public entry point is `cellvec.evaluate`.
"""
