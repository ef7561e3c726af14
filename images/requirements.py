"""Print the distribution's requirements, one a line: ``python requirements.py [EXTRA ...]``.

The images install these before our code (``pip install -r``), so that a code change does
not reinstall dependencies. Reads ``pyproject.toml`` in the current directory.
"""

import sys
import tomllib

with open("pyproject.toml", "rb") as fh:
    project = tomllib.load(fh)["project"]
extras = project.get("optional-dependencies", {})
unknown = [e for e in sys.argv[1:] if e not in extras]
if unknown:
    sys.exit(f"unknown extra(s) {', '.join(unknown)}; known: {', '.join(extras)}")
lines = list(project["dependencies"])
for extra in sys.argv[1:]:
    lines += extras[extra]
print("\n".join(lines))
