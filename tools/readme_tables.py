"""Print (or write into README.md) the request, response and configuration tables, made from the models.

The tables in the README are generated, never edited by hand: `python tools/readme_tables.py --write`.
tests/test_readme.py fails when the README and the models disagree.
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


def request_table() -> str:
    schema = PredictRequest.model_json_schema()["properties"]
    rows = ["| field | type, allowed | default | meaning |", "|---|---|---|---|"]
    for name, field in PredictRequest.model_fields.items():
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


TABLES = {"request": request_table, "response": response_table, "settings": settings_table}


def render(readme: str) -> str:
    """Replace each `<!-- table:NAME -->` … `<!-- /table:NAME -->` block with the generated table."""
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n)(?:.*?\n)?(<!-- /table:{name} -->)", re.S)
        readme, count = pattern.subn(lambda m, t=make(): m.group(1) + t + "\n" + m.group(2), readme)
        if count != 1:
            raise SystemExit(f"README.md needs exactly one <!-- table:{name} --> block")
    return readme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite README.md in place")
    args = parser.parse_args()
    readme_path = REPO / "README.md"
    rendered = render(readme_path.read_text())
    if args.write:
        readme_path.write_text(rendered)
    else:
        sys.stdout.write(rendered)


if __name__ == "__main__":
    main()
