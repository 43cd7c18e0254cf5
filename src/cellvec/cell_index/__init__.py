"""Cell vectors, reference atlases, mapping, refinement and evaluation."""
