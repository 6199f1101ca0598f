"""The README's tables are made from the models, and the commands the docs give work as written."""

import os
import re
import subprocess
import sys
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


def test_the_lifecycle_rule_command_in_the_docs_sends_the_rule_it_describes(tmp_path):
    from testbed.fakes import oci_common
    from testbed.fakes.object_storage import FakeObjectStorage

    text = (README.parent / "docs" / "object-storage.md").read_text()
    command = re.search(r"```bash\n(oci os object-lifecycle-policy put.*?)```", text, re.S)[1]
    with FakeObjectStorage(namespace="ns", buckets=("images",)) as fake:
        credentials = fake.trust(oci_common.api_key(tmp_path))
        command = command.replace("<bucket>", "images").replace(
            "oci os", f"{Path(sys.executable).with_name('oci')} --config-file {credentials.config_file} "
                      f"--endpoint {fake.endpoint} os")
        result = subprocess.run(["bash", "-c", command], input="y\n", capture_output=True, text=True, timeout=120,
                                env={**os.environ, "OCI_CLI_SUPPRESS_FILE_PERMISSIONS_WARNING": "True"})
        assert result.returncode == 0, result.stderr
        [rule] = fake.lifecycle_rules["images"]
    assert rule["action"] == "DELETE" and rule["objectNameFilter"] == {"inclusionPrefixes": ["sd3/requests/"]}
    assert rule["isEnabled"] is True and (rule["timeAmount"], rule["timeUnit"]) == (30, "DAYS")
