"""The model registry: models, versions, stages, artifacts and lineage."""
