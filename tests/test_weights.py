"""The start-up warning for weights that must come from the Hugging Face hub (sd3_service/weights.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from sd3_service.pipelines.weights import hub_download_warning, is_cached, warn_if_hub_download

SD3 = "stabilityai/stable-diffusion-3-medium-diffusers"
SERVICE_DIR = Path(__file__).resolve().parent.parent / "sd3-medium"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache_dir: Path, repo_id: str) -> Path:
    """Lay out `repo_id` in a Hugging Face hub cache as a download leaves it; returns the snapshot folder."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_sd3_from_an_empty_cache_warns_with_its_size_and_the_ways_out(tmp_path):
    warning = hub_download_warning(SD3, cache_dir=str(tmp_path))
    assert warning is not None
    assert SD3 in warning and "15.5 GB" in warning and "10 minutes" in warning
    assert "3 min at 100 MB/s" in warning and "13 min at 20 MB/s" in warning
    assert "sd3-medium/model/" in warning and "bake" in warning


def test_a_repo_of_unknown_size_still_warns(tmp_path):
    warning = hub_download_warning("someone/sd3-finetune", cache_dir=str(tmp_path))
    assert warning is not None and "size is not known" in warning and "10 minutes" in warning


def test_a_cached_repo_does_not_warn(tmp_path, caplog):
    snapshot = cache_repo(tmp_path, SD3)
    assert not is_cached(SD3, str(tmp_path))  # the index file itself is what counts
    (snapshot / "model_index.json").write_text("{}")
    assert is_cached(SD3, str(tmp_path))
    log = logging.getLogger("test.weights")
    with caplog.at_level(logging.WARNING, logger="test.weights"):
        assert warn_if_hub_download(SD3, log, cache_dir=str(tmp_path)) is False
    assert caplog.records == []


def test_warning_is_logged(tmp_path, caplog):
    log = logging.getLogger("test.weights")
    with caplog.at_level(logging.WARNING, logger="test.weights"):
        assert warn_if_hub_download(SD3, log, cache_dir=str(tmp_path)) is True
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert SD3 in caplog.records[0].getMessage()


def test_load_pipeline_warns_before_downloading_from_the_hub(tmp_path):
    """The real loader, offline with an empty cache: the warning comes first, then the load fails."""
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "SD3_MODEL": SD3, "SD3_DEVICE": "cpu"}
    code = "from sd3_service.pipelines.loading import load_pipeline; from sd3_service.settings import Settings; " \
           "load_pipeline(Settings())"
    run = subprocess.run([sys.executable, "-c", code], cwd=SERVICE_DIR, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0
    warning_at = run.stderr.find(f"Downloading {SD3} from the Hugging Face hub at start-up")
    assert warning_at >= 0, run.stderr[-3000:]
    assert "Traceback" in run.stderr[warning_at:]
