"""The README's example runs and prints what the README says it prints."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example():
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    claimed = re.search(r"prints `(.*?)`", text).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    assert out.getvalue().strip() == claimed


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = re.findall(r"```bash\n(.*?)\n```", text, re.S)[1]
    assert test_command.replace('pip install -e', 'pip install -q -e') in ci


def test_the_optax_and_flax_section_runs():
    """Every Python block of "With optax and flax", in order, in one namespace."""
    text = README.read_text()
    section = text.split("\n## With optax and flax\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 8
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
