from llmstudio.service import main

from .app import build

main("serving", build)
