"""`python -m llmstudio.cli`: the same as the `llmstudio` command."""

import sys

from . import main

sys.exit(main())
