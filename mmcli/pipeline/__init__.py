"""Plumbing shared by both stages: ids, manifests, labels, fingerprints, errors, run records."""
