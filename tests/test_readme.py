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
