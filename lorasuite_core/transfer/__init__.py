"""The migration numerics: vocabulary, residual maps, calibration activations, CKA, layer and unit matching, carrying and re-factorising deltas."""
