"""The README: short, its test command is CI's, and it points inside the repository.

Its Python blocks run in ``tests/test_docs.py`` (with the pages'), the example's printed line
checked there too.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = re.findall(r"```bash\n(.*?)\n```", text, re.S)[1]
    assert test_command.replace('pip install -e', 'pip install -q -e') in ci
    assert '".[dev]"' in test_command  # the docs extra comes in through dev


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    assert "../shared" not in text
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target
