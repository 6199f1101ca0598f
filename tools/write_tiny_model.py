"""Write the tiny random-weight SD3 pipeline (what `SD3_MODEL=tiny` serves) to a folder, in diffusers' layout.

The folder loads with `StableDiffusion3Pipeline.from_pretrained`, serves with `SD3_MODEL=<folder>`, and is a
base model to make LoRA adapters for, the way adapters are made for SD3 Medium (docs/loras.md):

    .venv/bin/python tools/write_tiny_model.py outputs/tiny-model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sd3-medium"))

from sd3_service.pipelines.tiny import build_tiny_pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write it (made if missing)")
    folder = parser.parse_args(argv).folder
    build_tiny_pipeline().save_pretrained(folder)
    print(f"wrote the tiny SD3 pipeline to {folder} ({sum(f.stat().st_size for f in folder.rglob('*') if f.is_file())} "
          "bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
