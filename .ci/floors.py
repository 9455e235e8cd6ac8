"""Print the dependency floors of pyproject.toml as exact pins, one per line.

Each ``name>=X`` of the runtime dependencies and of the extras named on the
command line becomes ``name==X``, so the CI floor step installs exactly the
oldest versions the metadata admits: the floors are read from one place and
cannot drift from what is tested. A requirement without a ``>=`` floor is an
error (every dependency must have a tested floor).

    python .ci/floors.py test      # runtime dependencies and the test extra
"""

from __future__ import annotations

import pathlib
import re
import sys
import tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
FLOOR = re.compile(r"^\s*([A-Za-z0-9._-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*$")


def pins(extras: list[str]) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    out = []
    for requirement in requirements:
        match = FLOOR.match(requirement)
        if match is None:
            raise SystemExit(f"{PYPROJECT.name}: {requirement!r} has no plain '>=' floor")
        out.append(f"{match.group(1)}=={match.group(2)}")
    return out


if __name__ == "__main__":
    print("\n".join(pins(sys.argv[1:])))
