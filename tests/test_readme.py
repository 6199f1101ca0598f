"""The docs' tables are made from the models, and the commands the README and the docs give work as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import doc_tables

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_docs_tables_match_the_models_and_settings():
    for document, tables in doc_tables.DOCUMENTS.items():
        text = (README.parent / document).read_text()
        assert doc_tables.render(text, tables) == text, f"{document}: run python tools/doc_tables.py --write"


def test_readme_starts_with_the_serve_and_test_commands_ci_runs():
    text = README.read_text()
    quick_start = text[text.index("## Quick start"):text.index("## Calling")]
    assert "bash dev.sh serve" in quick_start and "bash dev.sh test" in quick_start
    assert "bash dev.sh test" in (README.parent / ".ci" / "run").read_text()


def test_every_document_the_readme_and_the_docs_link_exists():
    for link in re.findall(r"\]\(((?:docs|bench)/[^)#]+)", README.read_text()):
        assert (README.parent / link).is_file(), link
    for document in (README.parent / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([\w.-]+\.md)(?:#[\w-]+)?\)", document.read_text()):
            assert (document.parent / link).is_file(), (document.name, link)


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


def test_the_docs_make_an_adapter_for_the_tiny_model_that_the_service_takes(tmp_path):
    from sd3_service.lora_library import LoraLibrary
    from sd3_service.pipelines.generation import generate_images, generation_arguments
    from sd3_service.pipelines.loras import DeviceLoras, lora_modules
    from sd3_service.pipelines.tiny import build_tiny_pipeline
    from sd3_service.spec import ImageRequest, LoraChoice

    text = (README.parent / "docs" / "loras.md").read_text()
    command = re.search(r"```bash\n(\.venv/bin/python tools/write_tiny_model\.py \S+)\n```", text)[1]
    snippet = re.search(r"```python\n(from diffusers import StableDiffusion3Pipeline\n.*?)```", text, re.S)[1]
    (tmp_path / "sd3-medium" / "loras").mkdir(parents=True)  # run where they say, in a copy of the layout
    command = command.replace(".venv/bin/python tools/", f"{sys.executable} {README.parent / 'tools'}/")
    for argv in (["bash", "-c", command], [sys.executable, "-c", snippet]):
        result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})  # a local folder: no hub call
        assert result.returncode == 0, result.stderr
    catalog = tmp_path / "sd3-medium" / "loras"
    modules = lora_modules(build_tiny_pipeline())
    adapters = LoraLibrary(catalog, modules=lambda: modules).resolve((LoraChoice("tiny-style"),))
    request = generation_arguments(ImageRequest(prompt="a kite", width=256, height=256, num_inference_steps=2))
    plain, adapted = build_tiny_pipeline(), build_tiny_pipeline()
    DeviceLoras(adapted, "cpu").apply(adapters)
    assert generate_images(plain, seed=1, **request)[0].tobytes() != generate_images(adapted, seed=1, **request)[0].tobytes()
