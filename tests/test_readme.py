"""The README's code blocks are the first code users copy: run them all.

Every ```python block runs, in order, in one namespace (later blocks may use
names from earlier ones, as a reader would), so a renamed argument or a stale
example fails here rather than in a user's notebook.
"""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    text = README.read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_has_examples():
    assert len(python_blocks()) >= 5


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_readme_python_blocks_run():
    namespace = {"__name__": "readme"}
    for index, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md block {index}", "exec"), namespace)
        except Exception as error:  # name the block that broke
            raise AssertionError(f"README python block {index} failed:\n{block}") from error
