"""The dataset service: ingest, validate, split and store dataset versions; check a job's files."""
