from llmstudio.migrations import run_env

run_env()
