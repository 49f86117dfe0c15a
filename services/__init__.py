"""The six LLM Studio services; each runs as `python -m services.<name>`."""
