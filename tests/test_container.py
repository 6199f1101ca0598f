"""The container image, checked without a Docker engine.

hadolint on the Dockerfile; the Dockerfile, bentofile.yaml and requirements.lock against pyproject.toml;
the build context; `bentoml build`; the weights-baking step; and the image's own start command, run on this
machine in a copy of the service folder, serving /health and /predict. The image itself is built from PyPI
alone and checked against the lock by `bash dev.sh image` (imagecheck/).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import dockerfile
import httpx
import pytest
import yaml
from docker.utils.build import exclude_paths
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
SERVICE_DIR = ROOT / "sd3-medium"
VENV_BIN = Path(sys.executable).parent
ARTIFACT_MOUNT = "/opt/ds/model/deployed_model"
STATE_DIR = "/var/lib/sd3"
LOCK_IN_IMAGE = "/opt/sd3/requirements.lock"
PIN = re.compile(r"(?<![\w.=-])([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.!+_-]+)")


# --- reading the files -------------------------------------------------------------------------------

def instructions(name: str | None = None) -> list[dockerfile.Command]:
    commands = dockerfile.parse_file(str(DOCKERFILE))
    return [c for c in commands if name is None or c.cmd == name]


def build_args() -> dict[str, str]:
    return dict(c.value[0].split("=", 1) for c in instructions("ARG"))


def substitute(text: str, variables: dict[str, str]) -> str:
    """Docker's `${VAR}`, `${VAR:-default}` and `${VAR:+alternative}`."""
    def one(match: re.Match) -> str:
        value = variables.get(match[1], "")
        if match[2] == ":-":
            return value or match[3]
        if match[2] == ":+":
            return match[3] if value else ""
        return value
    return re.sub(r"\$\{(\w+)(?:(:[-+])([^}]*))?\}", one, text)


def image_env(args: dict[str, str] | None = None) -> dict[str, str]:
    """The ENV of the image built with `args` (the Dockerfile's defaults by default)."""
    variables = {**build_args(), **(args or {})}
    env: dict[str, str] = {}
    for command in instructions("ENV"):
        pairs = command.value
        for key, value in zip(pairs[::2], pairs[1::2]):
            env[key] = substitute(value, {**variables, **env})
    return env


def pins(text: str) -> dict[str, str]:
    return {canonicalize_name(name): version for name, version in PIN.findall(text)}


def pyproject_pins() -> tuple[dict[str, str], dict[str, str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = pins("\n".join(project["dependencies"]))
    test = pins("\n".join(project["optional-dependencies"]["test"]))
    assert len(runtime) == len(project["dependencies"]) and len(test) == len(project["optional-dependencies"]["test"]), \
        "every dependency in pyproject.toml is pinned with =="
    return runtime, test


def lock_pins() -> dict[str, str]:
    return pins("\n".join(line for line in LOCK.read_text().splitlines() if not line.startswith("#")))


def pip_install_runs() -> list[str]:
    return [c.value[0] for c in instructions("RUN") if "pip install" in c.value[0]]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the Dockerfile ---------------------------------------------------------------------------------

def test_hadolint_finds_nothing():
    run = subprocess.run([str(VENV_BIN / "hadolint"), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout + run.stderr) == (0, "")


def test_dockerfile_installs_exactly_the_pyproject_runtime_pins_with_the_lock():
    runtime, _ = pyproject_pins()
    runs = pip_install_runs()
    assert len(runs) == 2, "torch alone, then the rest"
    installed = pins(substitute("\n".join(runs), build_args()))
    assert installed == runtime
    for run in runs:
        assert f"-c {LOCK_IN_IMAGE}" in run
    assert ("requirements.lock", LOCK_IN_IMAGE) in [c.value for c in instructions("COPY")]


def test_torch_is_the_cuda_build_of_the_locked_release():
    args = build_args()
    torch_run = pip_install_runs()[0]
    assert '"torch==${TORCH_VERSION}"' in torch_run and '--index-url "${TORCH_INDEX_URL}"' in torch_run
    assert args["TORCH_VERSION"] == lock_pins()["torch"] == "2.13.0"
    assert substitute(args["TORCH_INDEX_URL"], args) == "https://download.pytorch.org/whl/cu128"


def test_base_image_is_pinned_by_tag_and_digest():
    base = build_args()["BASE_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    assert [c.value for c in instructions("FROM")] == [("${BASE_IMAGE}",)]


def test_runs_as_a_fixed_non_root_user():
    users = [c.value[0] for c in instructions("USER")]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users
    uid = users[-1].split(":")[0]
    assert any(f"useradd --uid {uid} " in c.value[0] for c in instructions("RUN"))


def test_curl_health_check_port_and_start_command():
    assert any(re.search(r"apt-get install .*\bcurl\b", c.value[0]) for c in instructions("RUN"))
    assert [c.value for c in instructions("EXPOSE")] == [("8080",)]
    assert image_env()["PORT"] == "8080"
    (check,) = instructions("HEALTHCHECK")
    assert check.value[0] == "CMD" and "curl -fsS" in check.value[3]
    assert "${PORT:-8080}${MODEL_DEPLOY_HEALTH_ENDPOINT:-/health}" in check.value[3]
    assert "--start-period=600s" in check.flags  # MD's 10 minutes to become healthy
    assert [c.value[0] for c in instructions("WORKDIR")] == [ARTIFACT_MOUNT]
    (cmd,) = instructions("CMD")
    assert cmd.json and cmd.value == ("sh", "-c", "exec bentoml serve . --host 0.0.0.0 --port ${PORT:-8080}")


def test_writable_folders_are_outside_the_artifact_and_made_for_the_user():
    env = image_env()
    folders = {k: env[k] for k in ("HF_HOME", "TORCH_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
                                   "XDG_CACHE_HOME", "BENTOML_HOME", "IMAGE_DIR", "SPOOL_DIR", "LORA_CACHE_DIR")}
    (setup,) = [c.value[0] for c in instructions("RUN") if "mkdir -p" in c.value[0]]
    for name, folder in folders.items():
        assert folder.startswith(STATE_DIR + "/"), (name, folder)
        assert re.search(rf"\s{re.escape(folder)}\s", setup + " "), f"{name}={folder} is not created"
    assert f"chown -R sd3:sd3 {STATE_DIR}" in setup


def test_image_env_names_settings_the_service_reads():
    from sd3_service.settings import Settings

    for name in ("SD3_MODEL", "SD3_T5", "IMAGE_DIR", "SPOOL_DIR", "LORA_CACHE_DIR"):
        assert name.lower() in Settings.model_fields, name


def test_layers_keep_torch_below_the_code():
    commands = instructions()
    torch_run, deps_run = [c for c in commands if c.cmd == "RUN" and "pip install" in c.value[0]]
    bake_run = next(c for c in commands if c.cmd == "RUN" and "SD3_BAKE_MODEL" in c.value[0])
    copies = [c for c in commands if c.cmd == "COPY"]
    assert [c.value[0] for c in copies] == ["requirements.lock", "sd3-medium/"]
    code_copy = copies[-1]
    assert torch_run.start_line < deps_run.start_line < bake_run.start_line < code_copy.start_line
    assert all(c.cmd in ("EXPOSE", "HEALTHCHECK", "CMD") for c in commands if c.start_line > code_copy.start_line)


def test_hf_token_is_a_build_secret_never_a_layer():
    bake_run = next(c for c in instructions("RUN") if "SD3_BAKE_MODEL" in c.value[0])
    assert any(f.startswith("--mount=type=secret,id=hf_token") for f in bake_run.flags)
    assert "/run/secrets/hf_token" in bake_run.value[0]
    names = list(build_args()) + list(image_env())
    assert not [n for n in names if re.search("TOKEN|SECRET|PASSWORD|KEY", n)], names


def test_build_context_holds_the_lock_and_the_service_code_only(tmp_path):
    files = ["Dockerfile", "README.md", "pyproject.toml", "requirements.lock", ".venv/bin/python", ".git/HEAD",
             "tests/test_x.py", "tools/write_lock.py", "sd3-medium/service.py", "sd3-medium/bentofile.yaml",
             "sd3-medium/sd3_service/settings.py", "sd3-medium/sd3_service/__pycache__/settings.cpython-311.pyc",
             "sd3-medium/model/model_index.json", "sd3-medium/model/transformer/diffusion_pytorch_model.safetensors",
             "sd3-medium/outputs/sd3/2026/11/25/a-0.png"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    shutil.copy(ROOT / ".dockerignore", tmp_path / ".dockerignore")
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sent = {p for p in exclude_paths(str(tmp_path), patterns) if (tmp_path / p).is_file()}
    assert sent == {".dockerignore", "Dockerfile", "requirements.lock", "sd3-medium/service.py",
                    "sd3-medium/bentofile.yaml", "sd3-medium/sd3_service/settings.py"}


# --- the lock -----------------------------------------------------------------------------------------

def test_lock_holds_every_pyproject_pin():
    runtime, test = pyproject_pins()
    locked = lock_pins()
    assert {n: locked.get(n) for n in {**runtime, **test}} == {**runtime, **test}


def test_lock_is_what_this_venv_runs():
    """The lock is the closure of pyproject's pins as installed here: regenerated, it is unchanged."""
    assert LOCK.read_text() == load_tool("write_lock").render_lock(), "requirements.lock is stale: bash dev.sh lock"


# --- bentoml build ------------------------------------------------------------------------------------

def test_bentofile_pins_are_the_pyproject_runtime_pins():
    config = yaml.safe_load((SERVICE_DIR / "bentofile.yaml").read_text())
    runtime, _ = pyproject_pins()
    assert config["service"] == "service:SD3Medium"
    assert pins("\n".join(config["python"]["packages"])) == runtime
    assert "curl" in config["docker"]["system_packages"]


def test_bentoml_build_makes_a_bento_without_weights(tmp_path):
    service = tmp_path / "sd3-medium"
    shutil.copytree(SERVICE_DIR, service, ignore=shutil.ignore_patterns("__pycache__", "outputs"))
    (service / "model").mkdir(exist_ok=True)
    (service / "model" / "model_index.json").write_text("{}")
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "SD3_MODEL": "tiny",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(["bentoml", "build", "--output", "tag"], cwd=service, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    tag = run.stdout.strip().removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = tmp_path / "bentoml" / "bentos" / name / version
    sources = {p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*") if p.is_file()}
    expected = {p.relative_to(SERVICE_DIR).as_posix() for p in [SERVICE_DIR / "service.py",
                SERVICE_DIR / "bentofile.yaml", *SERVICE_DIR.glob("sd3_service/**/*.py")]}
    assert sources == expected
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert pyproject_pins()[0].items() <= pins(requirements).items()
    assert "/predict" in [r["route"] for r in yaml.safe_load((bento / "bento.yaml").read_text())["schema"]["routes"]]


# --- baked weights ------------------------------------------------------------------------------------

def test_baked_weights_load_offline_without_a_download_warning(tmp_path):
    """The bake step of the Dockerfile, then the image's ENV: the loader finds the weights in the cache.

    The hub is not reachable here, so the cache is filled first with a saved tiny pipeline, laid out as
    a download with SD3_BAKE_T5=false leaves it (no T5 folders); the bake step and the loader then run
    offline against it, with the ENV the image gets from those build arguments.
    """
    repo_id = "example/sd3-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "huggingface" / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HOME": str(tmp_path / "huggingface"), "HF_HUB_OFFLINE": "1",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    save = f"from sd3_service.pipelines.tiny import build_tiny_pipeline; " \
           f"build_tiny_pipeline().save_pretrained({str(repo / 'snapshots' / commit)!r})"
    subprocess.run([sys.executable, "-c", save], cwd=SERVICE_DIR, env=env, check=True, timeout=300)
    for folder in ("text_encoder_3", "tokenizer_3"):  # what SD3_BAKE_T5=false leaves out of the download
        shutil.rmtree(repo / "snapshots" / commit / folder)

    bake = next(c for c in instructions("RUN") if "SD3_BAKE_MODEL" in c.value[0]).value[0]
    args = {"SD3_BAKE_MODEL": repo_id, "SD3_BAKE_T5": "false"}
    run = subprocess.run(["sh", "-c", bake], env={**env, **args}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == str(repo / "snapshots" / commit)

    baked = image_env(args)
    assert (baked["SD3_MODEL"], baked["HF_HUB_OFFLINE"], baked["SD3_T5"]) == (repo_id, "1", "false")
    unbaked = image_env()
    assert (unbaked["SD3_MODEL"], unbaked["HF_HUB_OFFLINE"]) == ("auto", "")
    load = "from sd3_service.pipelines.loading import load_pipeline; from sd3_service.settings import Settings; " \
           "loaded = load_pipeline(Settings()); " \
           "print(loaded.source.kind, type(loaded.pipe).__name__, loaded.pipe.text_encoder_3 is None)"
    run = subprocess.run([sys.executable, "-c", load], cwd=SERVICE_DIR, capture_output=True, text=True,
                         env={**env, **{k: baked[k] for k in ("SD3_MODEL", "HF_HUB_OFFLINE", "SD3_T5")},
                              "SD3_DEVICE": "cpu"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-3:] == ["hub", "StableDiffusion3Pipeline", "True"]
    assert "Downloading" not in run.stderr


# --- the start command --------------------------------------------------------------------------------

def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def host_like_image(tmp_path):
    """The image's environment on this machine: its ENV with /var/lib/sd3 and $HOME moved under tmp_path,
    and a copy of the service folder standing for the artifact mounted at WORKDIR."""
    artifact = tmp_path / "deployed_model"
    shutil.copytree(SERVICE_DIR, artifact, ignore=lambda folder, names: [  # weights in sd3-medium/model/ stay out
        name for name in names if name in ("__pycache__", "outputs") or (folder, name) == (str(SERVICE_DIR), "model")])
    state = tmp_path / "state"
    env = {k: v.replace(STATE_DIR, str(state)) for k, v in image_env().items()}
    env["HOME"] = str(tmp_path / "home")
    setup = next(c.value[0] for c in instructions("RUN") if "mkdir -p" in c.value[0])
    for folder in re.findall(rf"{STATE_DIR}/[\w/]+", setup) + [env["HOME"]]:
        Path(folder.replace(STATE_DIR, str(state))).mkdir(parents=True, exist_ok=True)
    env["SD3_MODEL"] = "tiny"
    if not port_is_free(8080):  # shared machine: the command honours PORT, 8080 is its default
        env["PORT"] = str(free_port())
    env = {**os.environ, **env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    return artifact, state, env


def test_start_command_serves_health_and_predict(host_like_image, tmp_path):
    artifact, state, env = host_like_image
    port = int(env["PORT"])
    (cmd,) = instructions("CMD")
    (check,) = instructions("HEALTHCHECK")
    before = tree(artifact)
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(list(cmd.value), cwd=artifact, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        health_check = subprocess.run(list(check.value[1:]), env=env, timeout=30)
        assert health_check.returncode == 1, "healthy before the model loaded"
        deadline = time.monotonic() + 300
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            while True:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-4000:]
                try:
                    health = client.get("/health")
                    if health.status_code == 200:
                        break
                    assert health.status_code == 503 and health.json()["status"] == "loading"
                except httpx.TransportError:
                    pass
                time.sleep(1)
            assert health.json()["status"] == "ready"
            assert subprocess.run(list(check.value[1:]), env=env, timeout=30).returncode == 0

            answer = client.post("/predict", json={"prompt": "A cat holding a sign that says hello World",
                                                   "num_inference_steps": 2, "guidance_scale": 7.0,
                                                   "width": 256, "height": 256, "seed": 7})
        assert answer.status_code == 200, answer.text
        (image,) = answer.json()["images"]
        assert image["stored"] is True and (image["width"], image["height"]) == (256, 256)
        written = Path(image["uri"].removeprefix("file://"))
        assert written.is_relative_to(state / "images") and written.stat().st_size == image["bytes"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    assert tree(artifact) == before, "the server wrote into the (read-only) artifact"
