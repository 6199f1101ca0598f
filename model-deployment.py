#!/usr/bin/env python3
"""Package, register, deploy, call and tear down SD3 Medium on OCI Data Science Model Deployment.

This file only parses the command line; the work is in the `provisioner` package next to it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere, find `provisioner`

from provisioner import commands  # noqa: E402
from provisioner.console import exit_with  # noqa: E402
from provisioner.details import DeploymentChanges, build_predict_body  # noqa: E402
from provisioner.settings import parse_env_assignments, resolve_settings, setting_help  # noqa: E402

OVERVIEW = """\
Take this repository to a live SD3 Medium endpoint on OCI Data Science Model Deployment.

  package    zip sd3-medium/ into the model artifact (local, no OCI call)
  register   create a model in the catalog and upload the artifact
  deploy     create the GPU model deployment and wait until it is ACTIVE
  up         package + register + deploy
  status     show a deployment (by OCID or display name)
  update     change a deployment's model, image, instance count or shape
  delete     delete a deployment
  predict    call a deployment (one signed request, never retried)

Settings come from flags, then env vars (SD3_DEPLOY_<NAME>, OCI_CLI_PROFILE, ...), then
deploy.toml (see deploy.example.toml). `<command> --help` lists each command's options.
"""


def _setting(parser: argparse._ActionsContainer, key: str, **kwargs) -> None:
    """A flag for a provisioner setting; unset flags stay None so env vars and deploy.toml can fill them."""
    parser.add_argument(f"--{key.replace('_', '-')}", dest=key, default=None, help=setting_help(key), **kwargs)


def _common(parser: argparse.ArgumentParser, *, dry_run: bool = True, wait: bool = False,
            timeouts: bool = False) -> None:
    group = parser.add_argument_group("configuration and authentication")
    group.add_argument("--config", type=Path, default=None,
                       help="settings file [default: ./deploy.toml if it exists] (env SD3_DEPLOY_CONFIG)")
    _setting(group, "auth", choices=("api_key", "security_token", "resource_principal", "instance_principal"))
    _setting(group, "profile")
    _setting(group, "config_file")
    _setting(group, "region")
    _setting(group, "compartment_id")
    if dry_run:
        group.add_argument("--dry-run", dest="dry_run", action="store_const", const=True, default=None,
                           help="print the request bodies as JSON and send nothing (env SD3_DEPLOY_DRY_RUN)")
    if wait:
        group.add_argument("--no-wait", dest="wait", action="store_const", const=False, default=None,
                           help="return once OCI accepted the request (env SD3_DEPLOY_WAIT=false)")
    if wait or timeouts:
        _setting(group, "wait_timeout", type=float)
        _setting(group, "poll_interval", type=float)


def _artifact_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model artifact")
    _setting(group, "source_dir")
    _setting(group, "artifact")


def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model catalog")
    _setting(group, "project_id")
    _setting(group, "name")
    _setting(group, "description")
    _setting(group, "large_artifact_threshold", type=int)
    _setting(group, "artifact_bucket")
    _setting(group, "artifact_namespace")
    _setting(group, "artifact_prefix")
    _setting(group, "part_size", type=int)


def _deployment_options(parser: argparse.ArgumentParser, *, with_catalog: bool) -> None:
    group = parser.add_argument_group("model deployment")
    if with_catalog:
        _setting(group, "project_id")
        _setting(group, "name")
        _setting(group, "description")
    _setting(group, "image")
    _setting(group, "image_digest")
    _setting(group, "shape")
    _setting(group, "instance_count", type=int)
    _setting(group, "autoscale", metavar="MIN:MAX")
    _setting(group, "bandwidth_mbps", type=int)
    _setting(group, "subnet_id")
    _setting(group, "private_endpoint_id")
    _setting(group, "log_group_id")
    _setting(group, "access_log_id")
    _setting(group, "predict_log_id")
    _setting(group, "api", choices=("native", "openai"))
    group.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                       help="an env var of the service (BUCKET_NAME, NAMESPACE, OBJECT_PREFIX, SD3_MODEL, ...); "
                            "NAME alone takes the value from this shell (use it for HF_TOKEN); repeatable; "
                            "adds to deploy.toml's [environment]; checked against Model Deployment's rules "
                            "(2048 bytes in all) before anything is sent")


def _deployment_ref(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("deployment", nargs="?", default=None,
                        help="model deployment OCID or display name [default: the `name` setting]")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = argparse.ArgumentParser(prog="model-deployment.py", description=OVERVIEW,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, summary: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, epilog="example:\n  " + example,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command("package", "Zip sd3-medium/ into the model artifact: stored (uncompressed), deterministic, no "
                "caches; includes sd3-medium/model/ weights when present. Prints size and sha256.",
                "python model-deployment.py package")
    _artifact_options(p)
    p.add_argument("--config", type=Path, default=None, help="settings file [default: ./deploy.toml if it exists]")

    p = command("register", "Package the artifact, create a model in the catalog (sha256 and project version in "
                "its metadata) and upload the artifact: directly below large_artifact_threshold, else through "
                "artifact_bucket and export_model_artifact.",
                "python model-deployment.py register --compartment-id ocid1.compartment... --project-id "
                "ocid1.datascienceproject...")
    _common(p, timeouts=True)  # the export of a large artifact is always followed to the end
    _artifact_options(p)
    p.add_argument("--no-package", action="store_true",
                   help="upload the zip already at --artifact instead of packaging anew")
    _model_options(p)

    p = command("deploy", "Create the model deployment (custom container on port 8080), wait until it is ACTIVE "
                "and print the predict URL. On FAILED, prints the work request's errors and logs.",
                "python model-deployment.py deploy --image iad.ocir.io/mytenancy/sd3-medium:0.1.0 "
                "--env BUCKET_NAME=sd3-images --env HF_TOKEN")
    _common(p, wait=True)
    group = p.add_argument_group("model")
    _setting(group, "model")
    _deployment_options(p, with_catalog=True)

    p = command("up", "package + register + deploy in one go; every input is checked before the first call.",
                "python model-deployment.py up --config deploy.toml")
    _common(p, wait=True)
    _artifact_options(p)
    _model_options(p)
    _deployment_options(p, with_catalog=False)

    p = command("status", "Show a model deployment: state, predict URL, model, image, shape, env vars (secrets "
                "masked); for a FAILED one, its last work request's errors and logs.",
                "python model-deployment.py status sd3-medium")
    _common(p)
    _deployment_ref(p)
    p.add_argument("--json", action="store_true", help="print the whole deployment as JSON")

    p = command("update", "Change a deployment's model, image, instance count or shape, and wait until it is "
                "ACTIVE again. Everything not given stays as it is.",
                "python model-deployment.py update sd3-medium --image iad.ocir.io/mytenancy/sd3-medium:0.1.1")
    _common(p, wait=True)
    _deployment_ref(p)
    group = p.add_argument_group("changes")
    group.add_argument("--model", dest="change_model", metavar="OCID|NAME",
                       help="new model: an OCID, or a display name (the newest ACTIVE model of that name)")
    group.add_argument("--image", dest="change_image", metavar="IMAGE", help="new OCIR image (drops the old digest)")
    group.add_argument("--image-digest", dest="change_image_digest", metavar="DIGEST",
                       help="digest (sha256:...) pinning the image")
    group.add_argument("--instance-count", dest="change_instance_count", type=int, metavar="N",
                       help="new fixed instance count")
    group.add_argument("--shape", dest="change_shape", metavar="SHAPE", help="new compute shape, e.g. VM.GPU.A10.2")

    p = command("delete", "Delete a model deployment (the model stays in the catalog).",
                "python model-deployment.py delete sd3-medium")
    _common(p, wait=True)
    _deployment_ref(p)

    p = command("predict", "Send one signed request to a deployment's /predict (never resent: a resend would "
                "generate again) without waiting on the server, poll its request_id with a progress bar until "
                "done, print the JSON answer, optionally download the images. --request-id alone resumes "
                "polling an earlier request.",
                'python model-deployment.py predict sd3-medium --prompt "a red fox in snow" --seed 7 '
                "--download ./images")
    _common(p)
    _deployment_ref(p)
    p.add_argument("--no-wait", dest="no_wait", action="store_true",
                   help="print the 202 answer (the request_id and its status) and exit; resume with --request-id")
    p.add_argument("--stream", action="store_true",
                   help="send it to the deployment's streaming route (predictWithResponseStream) and draw the "
                        "progress from its events instead of polling")
    group = p.add_argument_group("request (see the service's POST /predict contract)")
    group.add_argument("--prompt", metavar="TEXT", help="what to draw")
    group.add_argument("--body", metavar="JSON", help="the whole JSON body; the other request flags override its fields")
    group.add_argument("--negative-prompt", dest="negative_prompt", metavar="TEXT", help="what not to draw")
    group.add_argument("--steps", dest="num_inference_steps", type=int, metavar="N",
                       help="num_inference_steps, 1-50 [service default: 28]")
    group.add_argument("--guidance-scale", dest="guidance_scale", type=float, metavar="X",
                       help="0-20 [service default: 7.0]")
    group.add_argument("--width", type=int, metavar="PX", help="256-1536, multiple of 16 [service default: 1024]")
    group.add_argument("--height", type=int, metavar="PX", help="256-1536, multiple of 16 [service default: 1024]")
    group.add_argument("--seed", type=int, help="0 to 2^32-1, for a reproducible image [default: random]")
    group.add_argument("--num-images", dest="num_images", type=int, metavar="N", help="1-4 [service default: 1]")
    group.add_argument("--output-format", dest="output_format", choices=("png", "jpeg", "webp"))
    group.add_argument("--request-id", dest="request_id", metavar="ID",
                       help="idempotency key [default: a fresh one]; repeating a failed call with the same id "
                            "returns its first answer instead of generating again; alone (no --prompt or --body), "
                            "polls that earlier request until done")
    group.add_argument("--image", metavar="FILE|oci://…",
                       help="start from this image (image to image): a PNG, JPEG or WebP file, sent in base64, or "
                            "oci://<bucket>@<namespace>/<object>, which the deployment reads itself")
    group.add_argument("--mask", metavar="FILE|oci://…",
                       help="with --image: repaint only the mask's white area (inpainting); the image's size")
    group.add_argument("--strength", type=float, metavar="X",
                       help="with --image: how much of it to repaint, 0 < X <= 1 [service default: 0.8]")
    group.add_argument("--download", type=Path, metavar="DIR", help="save the images into DIR")
    return parser


PREDICT_FIELDS = ("negative_prompt", "num_inference_steps", "guidance_scale", "width", "height", "seed",
                  "num_images", "output_format", "request_id", "strength")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    flags = vars(args)
    if args.command in ("deploy", "up"):
        flags["environment"] = parse_env_assignments(args.env, os.environ)
    config_path = args.config or (Path(os.environ["SD3_DEPLOY_CONFIG"]) if os.environ.get("SD3_DEPLOY_CONFIG")
                                  else Path("deploy.toml"))
    settings = resolve_settings(flags, os.environ, config_path,
                                config_required=bool(args.config or os.environ.get("SD3_DEPLOY_CONFIG")),
                                command=args.command)
    ref = getattr(args, "deployment", None) or settings.name

    if args.command == "package":
        commands.package(settings)
    elif args.command == "register":
        commands.register(settings, settings.artifact if args.no_package else None)
    elif args.command == "deploy":
        commands.deploy(settings)
    elif args.command == "up":
        commands.up(settings)
    elif args.command == "status":
        commands.status(settings, ref, as_json=args.json)
    elif args.command == "update":
        changes = DeploymentChanges(model_id=args.change_model, image=args.change_image,
                                    image_digest=args.change_image_digest,
                                    instance_count=args.change_instance_count, shape=args.change_shape)
        commands.update(settings, ref, changes)
    elif args.command == "delete":
        commands.delete(settings, ref)
    elif args.command == "predict":
        overrides = {field: flags[field] for field in PREDICT_FIELDS}
        images = {"image": args.image, "mask_image": args.mask}
        if args.prompt is None and args.body is None and args.request_id and not any(
                value is not None for value in [*images.values(), *overrides.values()] if value != args.request_id):
            body = {"request_id": args.request_id}  # resume polling an earlier request
        else:
            body = build_predict_body(args.prompt, args.body, overrides, images=images)
        commands.predict(settings, ref, body, args.download, wait=not args.no_wait, stream=args.stream)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - exit_with re-raises anything that is not an operator-facing error
        exit_with(exc)
