"""Pure ML core shared by the trainer-worker and the evaluator (no bus, no gRPC)."""
