"""The examples (examples/*.py) import each other as scripts do: put their folder on the path."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
