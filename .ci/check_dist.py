"""Check what `python -m build` produced before anyone installs it.

    python .ci/check_dist.py DIST_FOLDER

The wheel and the sdist both carry LICENSE; the wheel carries py.typed and
nothing outside ``declarative/`` (no stray top-level ``canon`` or ``backends``);
the metadata has an SPDX license expression, classifiers, project URLs and
the Python floor; the sdist carries the complete test tree (tests with their
conftest and helpers, the examples and README they run), so its tests collect.
"""

from __future__ import annotations

import email
import pathlib
import sys
import tarfile
import zipfile

REQUIRED_METADATA = ("License-Expression", "Classifier", "Project-URL", "Requires-Python")
SDIST_FILES = ("LICENSE", "README.md", "pyproject.toml", "tests/conftest.py", "tests/helpers.py",
               "examples/quickstart.py", "examples/tutorial.ipynb", "declarative/py.typed",
               "canon/__init__.py", "backends/__init__.py")


def check_metadata(text: str) -> None:
    message = email.message_from_string(text)
    for field in REQUIRED_METADATA:
        assert message.get_all(field), f"wheel metadata lacks {field}"
    assert message["License-Expression"] == "Apache-2.0", message["License-Expression"]
    assert message["Requires-Python"] == ">=3.11", message["Requires-Python"]
    assert "License" not in message or not message["License"], "legacy License field"


def check_wheel(path: pathlib.Path) -> None:
    with zipfile.ZipFile(path) as wheel:
        names = wheel.namelist()
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        check_metadata(wheel.read(metadata).decode())
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "wheel lacks LICENSE"
    assert "declarative/py.typed" in names, "wheel lacks py.typed"
    # backend="auto" reads its route constants at construction.
    assert "declarative/routes/route_costs.json" in names, "wheel lacks route_costs.json"
    for stage in ("declarative/canon/__init__.py", "declarative/backends/qp/__init__.py",
                  "declarative/backends/sparse_qp/__init__.py",
                  "declarative/backends/cone/__init__.py"):
        assert stage in names, f"wheel lacks {stage}"
    stray = sorted({n.split("/")[0] for n in names} - {"declarative", metadata.split("/")[0]})
    assert not stray, f"wheel installs unexpected top-level names: {stray}"
    print(f"{path.name}: {len(names)} files, LICENSE, py.typed and metadata present")


def check_sdist(path: pathlib.Path) -> None:
    with tarfile.open(path) as sdist:
        names = sdist.getnames()
    top = names[0].split("/")[0]
    present = {n.partition("/")[2] for n in names}
    missing = [f for f in SDIST_FILES if f not in present]
    assert not missing, f"sdist lacks {missing}"
    tests = sorted(n for n in present if n.startswith("tests/test_") and n.endswith(".py"))
    print(f"{path.name}: {len(names)} entries under {top}/, {len(tests)} test files with "
          "conftest, helpers, examples and LICENSE")


if __name__ == "__main__":
    dist = pathlib.Path(sys.argv[1])
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, f"expected one wheel and one sdist in {dist}"
    check_wheel(wheels[0])
    check_sdist(sdists[0])
