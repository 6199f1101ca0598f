"""The native API surface: `/predict` (requests and polls), `/txt2img`, `/img2img`, `/health`."""

from sd3_service.api.native.document import DESCRIPTION, native_paths
from sd3_service.api.native.surface import (Img2ImgInput, PredictInput, PredictOutput, Txt2ImgInput, error_response,
                                            guarded_routes, health, image, predict)

__all__ = ["DESCRIPTION", "Img2ImgInput", "PredictInput", "PredictOutput", "Txt2ImgInput", "error_response", "guarded_routes",
           "health", "image", "native_paths", "predict"]
