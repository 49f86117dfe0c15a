"""Scheduler: owns fine-tuning jobs: validation at submit, queue, placement on workers, watch,
cancel."""
