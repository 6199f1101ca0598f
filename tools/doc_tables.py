"""Write the docs' tables of request fields, answers and settings, made from the service's models.

The tables in docs/ are generated, never edited by hand: `python tools/doc_tables.py --write` (without
`--write` it prints what differs). tests/test_readme.py fails when a document and the models disagree.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "sd3-medium"))

from pydantic_core import PydanticUndefined  # noqa: E402

from sd3_service.api.native.models import PredictRequest, PredictResponse  # noqa: E402
from sd3_service.api.openai.models import EditForm, GenerationBody, VariationForm  # noqa: E402
from sd3_service.settings import Settings  # noqa: E402
from sd3_service.spec import StoredImage  # noqa: E402


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return "required"
    value = field.default
    if hasattr(value, "as_posix"):
        value = value.as_posix()
    return "null" if value is None else f"`{json.dumps(value)}`"


def _range(schema: dict) -> str:
    if "anyOf" in schema:
        return " or ".join(_range(option) for option in schema["anyOf"])
    if "enum" in schema:
        return " / ".join(f"`{value}`" for value in schema["enum"])
    kind = schema.get("type", "")
    bounds = []
    if "minimum" in schema or "maximum" in schema:
        bounds.append(f"{schema.get('minimum', '')}–{schema.get('maximum', '')}")
    if "minLength" in schema or "maxLength" in schema:
        bounds.append(f"{schema.get('minLength', 0)}–{schema['maxLength']} chars")
    if "multipleOf" in schema:
        bounds.append(f"multiple of {schema['multipleOf']}")
    if "pattern" in schema:
        bounds.append(f"`{schema['pattern']}`")
    return " ".join([kind, *bounds]).strip()


def fields_table(model) -> str:
    schema = model.model_json_schema()["properties"]
    rows = ["| field | type, allowed | default | meaning |", "|---|---|---|---|"]
    required_first = sorted(model.model_fields.items(), key=lambda item: not item[1].is_required())
    for name, field in required_first:
        rows.append(f"| `{name}` | {_range(schema[name])} | {_default(field)} | {field.description} |")
    return "\n".join(rows)


def response_table() -> str:
    rows = ["| field | meaning |", "|---|---|"]
    for model, prefix in ((PredictResponse, ""), (StoredImage, "images[].")):
        for name, field in model.model_fields.items():
            rows.append(f"| `{prefix}{name}` | {field.description or ''} |")
    return "\n".join(rows)


def settings_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        rows.append(f"| `{name.upper()}` | {_default(field)} | {field.description} |")
    return "\n".join(rows)


DOCUMENTS = {
    "docs/api.md": {"request": lambda: fields_table(PredictRequest), "response": response_table},
    "docs/openai.md": {"openai-generations": lambda: fields_table(GenerationBody),
                       "openai-edits": lambda: fields_table(EditForm),
                       "openai-variations": lambda: fields_table(VariationForm)},
    "docs/configuration.md": {"settings": settings_table},
}


def render(text: str, tables: dict) -> str:
    """Replace each `<!-- table:NAME -->` … `<!-- /table:NAME -->` block of `text` with the generated table."""
    for name, make in tables.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n)(?:.*?\n)?(<!-- /table:{name} -->)", re.S)
        text, count = pattern.subn(lambda m, t=make(): m.group(1) + t + "\n" + m.group(2), text)
        if count != 1:
            raise SystemExit(f"it needs exactly one <!-- table:{name} --> block")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the documents in place")
    args = parser.parse_args()
    for document, tables in DOCUMENTS.items():
        path = REPO / document
        text = path.read_text()
        rendered = render(text, tables)
        if args.write:
            path.write_text(rendered)
        elif rendered != text:
            print(f"{document}: its tables differ from the models")


if __name__ == "__main__":
    main()
