"""The provisioner's pure part: settings resolution and the `oci` request objects built from them."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import oci
import pytest
from oci.data_science import models as ds

from provisioner import details as build
from provisioner.artifact import ArtifactInfo
from provisioner.settings import ConfigError, DeploySettings, parse_env_assignments, resolve_settings

MODEL_ID = "ocid1.datasciencemodel.oc1.iad.aaaamodel"
DEPLOYMENT_ID = "ocid1.datasciencemodeldeployment.oc1.iad.aaaamd"
DIGEST = "sha256:" + "ab" * 32


def settings(**values) -> DeploySettings:
    base = {"compartment_id": "ocid1.compartment.oc1..c", "project_id": "ocid1.datascienceproject.oc1..p",
            "image": "iad.ocir.io/ns/sd3-medium:0.1.0"}
    return DeploySettings(**{**base, **values})


# --- settings ---------------------------------------------------------------------------------

def test_flags_win_over_env_vars_which_win_over_the_config_file(tmp_path):
    config = tmp_path / "deploy.toml"
    config.write_text('shape = "VM.GPU.A10.2"\ninstance_count = 3\nname = "from-file"\nimage = "file-image"\n'
                      'artifact = "out/a.zip"\n[environment]\nBUCKET_NAME = "file-bucket"\nOBJECT_PREFIX = "p/"\n')
    environ = {"SD3_DEPLOY_SHAPE": "VM.GPU.A100.1", "SD3_DEPLOY_INSTANCE_COUNT": "2", "OCI_CLI_PROFILE": "work"}
    flags = {"shape": "BM.GPU.H100.8", "image": None, "environment": {"BUCKET_NAME": "flag-bucket"}}

    resolved = resolve_settings(flags, environ, config)

    assert resolved.shape == "BM.GPU.H100.8"  # flag
    assert resolved.instance_count == 2  # env var over the file
    assert resolved.profile == "work"  # the OCI CLI's own env var is honoured
    assert resolved.name == "from-file" and resolved.image == "file-image"  # file, where nothing else says
    assert resolved.artifact == tmp_path / "out" / "a.zip"  # relative to the config file
    assert resolved.environment == {"BUCKET_NAME": "flag-bucket", "OBJECT_PREFIX": "p/"}
    assert resolved.bandwidth_mbps == 10 and resolved.auth == "api_key"  # defaults


def test_config_file_with_unknown_key_or_bad_value_is_refused(tmp_path):
    config = tmp_path / "deploy.toml"
    config.write_text('shap = "VM.GPU.A10.1"\n')
    with pytest.raises(ConfigError, match="unknown key.*shap"):
        resolve_settings({}, {}, config)
    config.write_text('instance_count = "many"\n')
    with pytest.raises(ConfigError, match="instance_count"):
        resolve_settings({}, {}, config)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_settings({}, {}, tmp_path / "missing.toml", config_required=True)
    assert resolve_settings({}, {}, tmp_path / "missing.toml").name == "sd3-medium"  # optional when not asked for


def test_env_flag_takes_value_from_the_shell_when_only_a_name_is_given():
    assert parse_env_assignments(["A=1", "HF_TOKEN", "B=x=y"], {"HF_TOKEN": "hf_secret"}) == \
        {"A": "1", "HF_TOKEN": "hf_secret", "B": "x=y"}
    with pytest.raises(ConfigError, match="HF_TOKEN is not set"):
        parse_env_assignments(["HF_TOKEN"], {})


def test_bool_and_auth_values_are_checked():
    assert resolve_settings({}, {"SD3_DEPLOY_WAIT": "false"}, None).wait is False
    with pytest.raises(ConfigError, match="wait"):
        resolve_settings({}, {"SD3_DEPLOY_WAIT": "maybe"}, None)
    with pytest.raises(ConfigError, match="auth"):
        resolve_settings({"auth": "password"}, {}, None)


# --- the service's env vars ---------------------------------------------------------------

def test_environment_of_exactly_2048_bytes_passes_and_one_more_byte_is_refused():
    # NAME=value plus one byte each: "BIG=" (4) + value + 1 = 2048 -> a 2043-byte value.
    build.validate_environment({"BIG": "x" * 2043})
    assert build.environment_bytes({"BIG": "x" * 2043}) == 2048
    with pytest.raises(ConfigError, match="2049 bytes"):
        build.validate_environment({"BIG": "x" * 2044})
    # Bytes, not characters: a 2-byte UTF-8 character counts twice.
    assert build.environment_bytes({"AB": "é"}) == len("AB=") + 2 + 1


@pytest.mark.parametrize("name, reason", [
    ("1ABC", "start with a letter"), ("A-B", "start with a letter"), ("X", "2 to 31"),
    ("A" * 32, "2 to 31"), ("TRAILING_", "end with _"), ("TENANCY_OCID", "set by the platform"),
])
def test_environment_names_follow_model_deployment_rules(name, reason):
    with pytest.raises(ConfigError, match=reason):
        build.validate_environment({name: "v"})


def test_every_environment_problem_is_named_at_once():
    with pytest.raises(ConfigError) as caught:
        build.validate_environment({"1A": "v", "B_": "v", "OK": "x" * 3000})
    message = str(caught.value)
    assert "'1A'" in message and "'B_'" in message and "bytes" in message


def test_secret_env_values_are_masked_wherever_they_appear():
    tree = {"a": [{"environment_variables": {"HF_TOKEN": "hf_abc", "BUCKET_NAME": "b", "MY_SECRET": "s"}}],
            "environment": {"API_KEY_X": "k", "EMPTY_TOKEN": ""}}
    masked = build.mask_secrets(tree)
    assert masked["a"][0]["environment_variables"] == {"HF_TOKEN": "****", "BUCKET_NAME": "b", "MY_SECRET": "****"}
    assert masked["environment"] == {"API_KEY_X": "****", "EMPTY_TOKEN": ""}
    assert tree["a"][0]["environment_variables"]["HF_TOKEN"] == "hf_abc"  # a copy, not in place


# --- create_model_deployment ---------------------------------------------------------------

def test_deployment_details_carry_every_field_with_a_fixed_instance_count():
    env = {"BUCKET_NAME": "images", "NAMESPACE": "ns", "OBJECT_PREFIX": "sd3/"}
    built = build.build_deployment_details(settings(image_digest=DIGEST, instance_count=2, bandwidth_mbps=20,
                                                    environment=env), MODEL_ID)

    assert isinstance(built, ds.CreateModelDeploymentDetails)
    assert (built.display_name, built.compartment_id, built.project_id) == \
        ("sd3-medium", "ocid1.compartment.oc1..c", "ocid1.datascienceproject.oc1..p")
    config = built.model_deployment_configuration_details
    assert isinstance(config, ds.SingleModelDeploymentConfigurationDetails)
    model = config.model_configuration_details
    assert model.model_id == MODEL_ID and model.bandwidth_mbps == 20
    assert model.instance_configuration.instance_shape_name == "VM.GPU.A10.1"
    assert model.instance_configuration.subnet_id is None  # managed networking
    assert isinstance(model.scaling_policy, ds.FixedSizeScalingPolicy) and model.scaling_policy.instance_count == 2
    container = config.environment_configuration_details
    assert isinstance(container, ds.OcirModelDeploymentEnvironmentConfigurationDetails)
    assert (container.image, container.image_digest) == ("iad.ocir.io/ns/sd3-medium:0.1.0", DIGEST)
    assert (container.server_port, container.health_check_port) == (8080, 8080)
    assert container.environment_variables == env
    assert built.category_log_details is None


def test_autoscale_builds_a_threshold_policy_on_predict_traffic():
    built = build.build_deployment_details(settings(autoscale="1:4", instance_count=9), MODEL_ID)
    policy = built.model_deployment_configuration_details.model_configuration_details.scaling_policy
    assert isinstance(policy, ds.AutoScalingPolicy) and policy.is_enabled
    (threshold,) = policy.auto_scaling_policies
    assert isinstance(threshold, ds.ThresholdBasedAutoScalingPolicyDetails)
    assert (threshold.minimum_instance_count, threshold.maximum_instance_count,
            threshold.initial_instance_count) == (1, 4, 1)
    (rule,) = threshold.rules
    assert isinstance(rule, ds.CustomMetricExpressionRule)
    assert "PredictRequestCount" in rule.scale_out_configuration.query
    assert "MODEL_DEPLOYMENT_OCID" in rule.scale_in_configuration.query


@pytest.mark.parametrize("text", ["4", "0:2", "3:1", "a:b", "1:2:3"])
def test_autoscale_must_be_min_colon_max(text):
    with pytest.raises(ConfigError, match="autoscale"):
        build.parse_autoscale(text)


def test_subnet_and_logs_are_sent_when_configured():
    built = build.build_deployment_details(settings(subnet_id="ocid1.subnet.oc1..s", log_group_id="ocid1.loggroup.oc1..g",
                                                    access_log_id="ocid1.log.oc1..a", predict_log_id="ocid1.log.oc1..p"),
                                           MODEL_ID)
    model = built.model_deployment_configuration_details.model_configuration_details
    assert model.instance_configuration.subnet_id == "ocid1.subnet.oc1..s"
    logs = built.category_log_details
    assert (logs.access.log_id, logs.access.log_group_id) == ("ocid1.log.oc1..a", "ocid1.loggroup.oc1..g")
    assert (logs.predict.log_id, logs.predict.log_group_id) == ("ocid1.log.oc1..p", "ocid1.loggroup.oc1..g")


@pytest.mark.parametrize("values, message", [
    ({"image": None}, "image is required"),
    ({"image_digest": "sha256:short"}, "image_digest"),
    ({"access_log_id": "ocid1.log.oc1..a"}, "need log_group_id"),
    ({"log_group_id": "ocid1.loggroup.oc1..g"}, "neither"),
    ({"instance_count": 0}, "at least 1"),
    ({"environment": {"BIG": "x" * 3000}}, "2048"),
])
def test_invalid_deployment_settings_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        build.build_deployment_details(settings(**values), MODEL_ID)


def test_request_json_drops_unset_fields_and_masks_secrets():
    built = build.build_deployment_details(settings(environment={"HF_TOKEN": "hf_live_value"}), MODEL_ID)
    printed = build.request_json(built)
    text = json.dumps(printed)
    assert "hf_live_value" not in text and '"HF_TOKEN": "****"' in text
    assert "null" not in text
    assert printed["model_deployment_configuration_details"]["environment_configuration_details"]["server_port"] == 8080


# --- the model -------------------------------------------------------------------------------

def test_model_details_record_artifact_sha256_and_project_version(tmp_path):
    artifact = ArtifactInfo(path=tmp_path / "a.zip", size=1234, sha256="f" * 64, file_count=3)
    built = build.build_model_details(settings(name="sd3", description="d"), artifact, "0.1.0")
    assert isinstance(built, ds.CreateModelDetails)
    assert (built.display_name, built.description) == ("sd3", "d")
    metadata = {m.key: m.value for m in built.custom_metadata_list}
    assert metadata == {"artifact_sha256": "f" * 64, "artifact_bytes": "1234", "project_version": "0.1.0"}
    assert all(m.category == "other" for m in built.custom_metadata_list)


def test_project_version_comes_from_pyproject():
    assert build.read_project_version(Path(__file__).parent.parent / "pyproject.toml") == "0.1.0"


def test_large_artifacts_go_through_a_bucket_with_a_content_addressed_name(tmp_path):
    artifact = ArtifactInfo(path=tmp_path / "a.zip", size=100, sha256="0123456789abcdef" + "0" * 48, file_count=1)
    assert build.uses_bucket(settings(large_artifact_threshold=100), artifact)
    assert not build.uses_bucket(settings(large_artifact_threshold=101), artifact)
    assert build.artifact_object_name(settings(), artifact) == "model-artifacts/sd3-medium-0123456789abcdef.zip"
    export = build.build_export_details("ns", "bucket", "model-artifacts/x.zip", "us-ashburn-1")
    assert isinstance(export.artifact_export_details, ds.ArtifactExportDetailsObjectStorage)
    assert oci.util.to_dict(export) == {"artifact_export_details": {
        "artifact_source_type": "ORACLE_OBJECT_STORAGE", "namespace": "ns", "source_bucket": "bucket",
        "source_object_name": "model-artifacts/x.zip", "source_region": "us-ashburn-1"}}


# --- update_model_deployment --------------------------------------------------------------

def current_deployment(scaling: ds.ScalingPolicy | None = None) -> ds.ModelDeployment:
    return ds.ModelDeployment(
        id=DEPLOYMENT_ID,
        model_deployment_configuration_details=ds.SingleModelDeploymentConfigurationDetails(
            model_configuration_details=ds.ModelConfigurationDetails(
                model_id=MODEL_ID, bandwidth_mbps=20,
                instance_configuration=ds.InstanceConfiguration(instance_shape_name="VM.GPU.A10.1",
                                                                subnet_id="ocid1.subnet.oc1..s"),
                scaling_policy=scaling or ds.FixedSizeScalingPolicy(instance_count=1)),
            environment_configuration_details=ds.OcirModelDeploymentEnvironmentConfigurationDetails(
                image="iad.ocir.io/ns/sd3:1", image_digest=DIGEST, server_port=8080, health_check_port=8080,
                environment_variables={"BUCKET_NAME": "images"})))


def test_update_of_the_image_keeps_everything_else_and_drops_the_old_digest():
    built = build.build_update_details(build.DeploymentChanges(image="iad.ocir.io/ns/sd3:2"), current_deployment())
    config = built.model_deployment_configuration_details
    assert isinstance(config, ds.UpdateSingleModelDeploymentConfigurationDetails)
    assert config.model_configuration_details is None  # untouched part is not sent
    container = config.environment_configuration_details
    assert isinstance(container, ds.UpdateOcirModelDeploymentEnvironmentConfigurationDetails)
    assert container.image == "iad.ocir.io/ns/sd3:2" and container.image_digest is None
    assert container.environment_variables == {"BUCKET_NAME": "images"}
    assert (container.server_port, container.health_check_port) == (8080, 8080)


def test_update_of_shape_and_count_keeps_model_subnet_and_bandwidth():
    changes = build.DeploymentChanges(instance_count=3, shape="VM.GPU.A10.2")
    model = build.build_update_details(changes, current_deployment()).model_deployment_configuration_details \
        .model_configuration_details
    assert model.model_id == MODEL_ID and model.bandwidth_mbps == 20
    assert model.instance_configuration.instance_shape_name == "VM.GPU.A10.2"
    assert model.instance_configuration.subnet_id == "ocid1.subnet.oc1..s"
    assert model.scaling_policy.instance_count == 3


def test_update_refuses_nothing_and_instance_count_on_autoscaling():
    with pytest.raises(ConfigError, match="nothing to update"):
        build.build_update_details(build.DeploymentChanges(), current_deployment())
    autoscaling = ds.AutoScalingPolicy(auto_scaling_policies=[])
    with pytest.raises(ConfigError, match="autoscales"):
        build.build_update_details(build.DeploymentChanges(instance_count=2), current_deployment(autoscaling))


# --- calling the deployment --------------------------------------------------------------

def test_predict_endpoint_is_the_deployment_url_without_its_ocid_unless_overridden():
    url = f"https://modeldeployment.us-ashburn-1.oci.customer-oci.com/{DEPLOYMENT_ID}"
    assert build.predict_url(url) == url + "/predict"
    assert build.predict_service_endpoint(url, DEPLOYMENT_ID, None) == \
        "https://modeldeployment.us-ashburn-1.oci.customer-oci.com"
    assert build.predict_service_endpoint(url, DEPLOYMENT_ID, "https://private.example/") == "https://private.example"
    with pytest.raises(ConfigError, match="OCI_MODEL_DEPLOYMENT_ENDPOINT"):
        build.predict_service_endpoint("https://elsewhere/x", DEPLOYMENT_ID, None)


def test_raw_request_command_is_pasteable_and_carries_the_auth():
    body = {"prompt": "it's a cat", "num_inference_steps": 10}
    command = build.raw_request_command("https://h/ocid/predict", body,
                                        settings(auth="security_token", profile="work"))
    words = shlex.split(command)
    assert words[:6] == ["oci", "raw-request", "--http-method", "POST", "--target-uri", "https://h/ocid/predict"]
    assert json.loads(words[words.index("--request-body") + 1]) == body
    assert words[-4:] == ["--auth", "security_token", "--profile", "work"]
    assert "--auth" not in build.raw_request_command("u", body, settings())


def test_predict_body_from_prompt_flags_and_json():
    assert build.build_predict_body("a fox", None, {"seed": 7, "width": None}) == {"prompt": "a fox", "seed": 7}
    assert build.build_predict_body(None, '{"prompt": "x", "seed": 1}', {"seed": 2}) == {"prompt": "x", "seed": 2}
    with pytest.raises(ConfigError, match="prompt is required"):
        build.build_predict_body(None, '{"seed": 1}', {})
    with pytest.raises(ConfigError, match="not valid JSON"):
        build.build_predict_body(None, "{", {})


def test_the_example_config_is_valid_and_builds_a_deployment(tmp_path):
    example = Path(__file__).parent.parent / "deploy.example.toml"
    filled = tmp_path / "deploy.toml"  # what an operator makes of it: every <placeholder> replaced
    filled.write_text(re.sub(r"<[A-Za-z][\w -]*>", "filled", example.read_text()))
    resolved = resolve_settings({}, {}, filled, config_required=True)
    assert (resolved.shape, resolved.instance_count, resolved.auth) == ("VM.GPU.A10.1", 1, "api_key")
    assert set(resolved.environment) == {"BUCKET_NAME", "NAMESPACE", "OBJECT_PREFIX"}
    built = build.build_deployment_details(resolved, MODEL_ID)
    assert built.model_deployment_configuration_details.environment_configuration_details.image == resolved.image


def test_the_untouched_example_config_is_refused_naming_each_placeholder_and_where_to_set_it():
    example = Path(__file__).parent.parent / "deploy.example.toml"
    with pytest.raises(ConfigError) as refused:
        resolve_settings({}, {}, example, config_required=True)
    message = str(refused.value)
    assert "placeholders from deploy.example.toml" in message
    for line in ("compartment_id = 'ocid1.compartment.oc1..<unique_id>': set it with --compartment-id, "
                 "env SD3_DEPLOY_COMPARTMENT_ID or deploy.toml `compartment_id`",
                 "project_id = 'ocid1.datascienceproject.oc1.<region>.<unique_id>'",
                 "image = '<region-key>.ocir.io/<namespace>/sd3-medium:0.1.0'",
                 "[environment] NAMESPACE = '<namespace>': set it in deploy.toml's [environment] table or with "
                 "--env NAMESPACE=VALUE"):
        assert line in message, message
    # A flag that replaces one placeholder takes it off the list.
    with pytest.raises(ConfigError) as refused:
        resolve_settings({"image": "iad.ocir.io/tenancy/sd3-medium:0.1.0"}, {}, example, config_required=True)
    assert "image =" not in str(refused.value) and "compartment_id =" in str(refused.value)


@pytest.mark.parametrize("command", ["status", "predict", "delete", "update", "package"])
def test_a_command_refuses_only_the_placeholders_of_the_settings_it_uses(tmp_path, command):
    example = Path(__file__).parent.parent / "deploy.example.toml"
    copied = tmp_path / "deploy.toml"  # copied, and only the compartment filled in
    compartment = "ocid1.compartment.oc1..aaaamine"
    copied.write_text(example.read_text().replace("ocid1.compartment.oc1..<unique_id>", compartment))
    resolved = resolve_settings({}, {}, copied, config_required=True, command=command)
    assert resolved.compartment_id == compartment and "<" in resolved.image
    with pytest.raises(ConfigError, match="image = "):
        resolve_settings({}, {}, copied, config_required=True, command="deploy")
    with pytest.raises(ConfigError, match="compartment_id = "):  # one a command uses is still refused
        resolve_settings({}, {}, example, config_required=True, command=command if command != "package" else "status")


def test_comparisons_in_autoscaling_queries_are_not_placeholders():
    resolved = resolve_settings({"autoscale_scale_in_query": "PredictRequestCount[1m].sum() < 2 and x > 1"}, {}, None)
    assert resolved.autoscale_scale_in_query.endswith("x > 1")
