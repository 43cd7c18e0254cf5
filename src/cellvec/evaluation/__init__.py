"""Evaluation: cross-validation against baselines and real peers, curves and scenarios.

Kept apart from `cell_index` so that the mapping path stays small: mapping needs
only `cellvec.metrics` (to score a query with known labels), which sits below both
and imports neither. Nothing is imported here; the public entry point is
`cellvec.evaluate`.
"""
