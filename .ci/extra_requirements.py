"""Print the requirements of one optional-dependency extra of pyproject.toml, one per line, without the
extras it names of grasp itself (``grasp[openai]``): what ``pip install`` needs to install the extra's own
packages without rebuilding grasp. Usage: ``python .ci/extra_requirements.py llm``."""

import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
    "optional-dependencies"
]
print("\n".join(r for r in extras[sys.argv[1]] if not r.startswith("grasp")))
