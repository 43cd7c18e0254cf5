"""Evaluation: metrics, cross-validation against baselines and real peers, curves and scenarios.

Kept apart from `cell_index` so that the mapping path stays small: mapping needs
only `metrics` (to score a query with known labels). Nothing is imported here, so
importing `cellvec.evaluation.metrics` does not pull in the evaluation machinery;
the public entry point is `cellvec.evaluate`.
"""
