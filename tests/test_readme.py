"""The README's tables are made from the models; they must not drift from the code."""

import re
from pathlib import Path

import readme_tables

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tables_match_the_contract_and_settings():
    text = README.read_text()
    assert readme_tables.render(text) == text, "run: python tools/readme_tables.py --write"


def test_readme_starts_with_the_serve_and_test_commands_ci_runs():
    text = README.read_text()
    quick_start = text[text.index("## Quick start"):text.index("## Calling")]
    assert "bash dev.sh serve" in quick_start and "bash dev.sh test" in quick_start
    assert "bash dev.sh test" in (README.parent / ".ci" / "run").read_text()


def test_every_document_the_readme_links_exists():
    for link in re.findall(r"\]\(((?:docs|bench)/[^)#]+)", README.read_text()):
        assert (README.parent / link).is_file(), link
