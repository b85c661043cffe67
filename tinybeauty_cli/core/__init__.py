"""The ground floor: the model, the artifact format and safe loading, images, synthetic data, training,
atomic files, errors, progress, paths, the shared formulas, and the demo checkpoint (package data).
Nothing here imports from the rest of the package."""
