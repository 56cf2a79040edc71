"""Shared plumbing with no knowledge of the method: file IO, fingerprints, input validation, model loading,
device and process helpers. Nothing here imports from the rest of the package."""
