"""Import the pipeline's stages from a source checkout as from an installed wheel.

A checkout keeps the three stages side by side at the repository root
(``declarative/``, ``canon/``, ``backends/``: the layout is the pipeline); a
wheel nests them (``declarative/canon``, ``declarative/backends``). When the
package is imported from a checkout, a finder first in ``sys.meta_path``
resolves exactly ``declarative.canon`` and ``declarative.backends`` to the
checkout's folders, whatever the working directory and however (or whether)
the project is installed. Nothing else in the checkout (tests, examples,
benchmarks) becomes importable through ``declarative``.
"""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder
from importlib.util import spec_from_file_location
from pathlib import Path

# The stages that a source checkout keeps beside the package folder rather than inside it.
SIBLING_STAGES = ("canon", "backends")


class CheckoutStages(MetaPathFinder):
    """Finds ``<package>.<stage>`` in ``<checkout>/<stage>``, and nothing else."""

    def __init__(self, folders: dict[str, Path]):
        self.folders = folders

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return spec_from_file_location(fullname, folder / "__init__.py",
                                       submodule_search_locations=[str(folder)])


def checkout_stages(package: str, package_folder: Path) -> dict[str, Path]:
    """{module name: folder} of the sibling stages in a source checkout, else {}."""
    if any((package_folder / stage).is_dir() for stage in SIBLING_STAGES):
        return {}  # the installed, nested layout: the normal import system serves it
    folders = {f"{package}.{stage}": package_folder.parent / stage for stage in SIBLING_STAGES}
    if not all((folder / "__init__.py").is_file() for folder in folders.values()):
        return {}
    return folders


def register(package: str, package_file: str) -> None:
    """Put a `CheckoutStages` finder first when ``package_file`` lies in a checkout."""
    folders = checkout_stages(package, Path(package_file).parent)
    if not folders:
        return
    # Matched by name, not class: a reloaded package defines the class anew.
    sys.meta_path[:] = [f for f in sys.meta_path
                        if type(f).__name__ != CheckoutStages.__name__]
    # First in line: an editable install of another checkout would otherwise map
    # the stages to that checkout's folders while this package comes from here.
    sys.meta_path.insert(0, CheckoutStages(folders))
