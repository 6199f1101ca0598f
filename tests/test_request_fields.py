"""Each request field is declared once (`spec.RequestFields`), and every surface takes what OpenAI's SDK sends."""

from __future__ import annotations

import types
import typing
from typing import Annotated, Union, get_args, get_origin

import pytest
from openai.types import image_create_variation_params, image_edit_params, image_generate_params
from pydantic import ValidationError

from sd3_service.api.native.models import Img2ImgParameters, ImageParameters, PredictRequest
from sd3_service.api.openai.models import (WIRE_NAMES, EditForm, GenerationBody, VariationForm, parse_size,
                                           to_image_request)
from sd3_service.spec import LoraSpec, RequestFields

SURFACES = (ImageParameters, Img2ImgParameters, PredictRequest, GenerationBody, EditForm, VariationForm)
ENGINE_NAMES = {wire: engine for engine, wire in WIRE_NAMES.items() if wire != "size"}  # n -> num_images, ...


def bare(annotation):
    """A field's type without `None`, the checks `Annotated` carries, or the form's own adapter class."""
    if get_origin(annotation) is Annotated:
        return bare(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        kept = [bare(arg) for arg in get_args(annotation) if arg is not type(None)]
        return kept[0] if len(kept) == 1 else tuple(kept)
    if get_origin(annotation) is list:
        inner = bare(get_args(annotation)[0])
        return list, LoraSpec if isinstance(inner, type) and issubclass(inner, LoraSpec) else inner  # forms' too
    return annotation


@pytest.mark.parametrize("model", SURFACES, ids=[model.__name__ for model in SURFACES])
def test_every_surface_field_of_a_declared_parameter_keeps_its_type_and_bounds(model):
    declared = RequestFields.model_fields
    for name, field in model.model_fields.items():
        engine_name = ENGINE_NAMES.get(name, name)
        if engine_name not in declared:
            continue
        assert bare(field.annotation) == bare(declared[engine_name].annotation), (model.__name__, name)
        bounds = [item for item in declared[engine_name].metadata]
        assert all(item in field.metadata for item in bounds), (model.__name__, name, field.metadata)
        assert field.description.startswith(declared[engine_name].description) or name in (
            "num_inference_steps", "strength"), (model.__name__, name)  # both reword it for a default of their own


def test_the_native_defaults_are_the_declared_ones():
    sent = PredictRequest.model_validate({"prompt": "a kite"})
    for name in ("num_inference_steps", "guidance_scale", "width", "height", "strength", "num_images"):
        assert getattr(sent, name) == RequestFields.model_fields[name].default, name


SDK_ROUTES = {
    "generations": (image_generate_params.ImageGenerateParamsBase, GenerationBody, set()),
    "edits": (image_edit_params.ImageEditParamsBase, EditForm, {"image", "mask", "markup"}),  # files
    "variations": (image_create_variation_params.ImageCreateVariationParams, VariationForm, {"image"}),
}


@pytest.mark.parametrize("route", SDK_ROUTES)
def test_every_field_the_pinned_sdk_sends_is_a_field_of_its_route(route):
    params, model, files = SDK_ROUTES[route]
    sent = set(typing.get_type_hints(params)) - files
    assert sent <= set(model.model_fields), sent - set(model.model_fields)


@pytest.mark.parametrize("model", [PredictRequest, GenerationBody, EditForm, VariationForm],
                         ids=lambda model: model.__name__)
def test_null_is_the_default_for_every_optional_field(model):
    required = {name for name, field in model.model_fields.items() if field.is_required()}
    body = {"prompt": "a kite", "image": "aGk="} if "image" in model.model_fields else {"prompt": "a kite"}
    body = {name: value for name, value in body.items() if name in model.model_fields}
    nulls = {name: None for name in model.model_fields if name not in required | {"image", "mask_image"}}
    sent = model.model_validate(body | nulls)
    assert sent == model.model_validate(body)
    assert sent.model_fields_set == set(body)


def test_openais_larger_sizes_map_to_this_models_and_others_are_named():
    assert parse_size("1792x1024") == (1536, 880) and parse_size("1024x1792") == (880, 1536)
    assert parse_size("auto") is None and parse_size("768x1344") == (768, 1344)
    with pytest.raises(ValueError, match="1792x1024"):
        parse_size("2048x2048")


def test_a_variation_is_image_to_image_with_no_prompt_at_its_strength():
    request = to_image_request(VariationForm.model_validate({"n": "2"}), None, image=b"png bytes")
    assert (request.prompt, request.mode, request.num_images, request.strength) == ("", "img2img", 2, 0.6)
    with pytest.raises(ValidationError):
        VariationForm.model_validate({"prompt": "a kite"})  # a variation has none
