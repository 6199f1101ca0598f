"""The OpenAI Images API surface: `/v1/images/generations`, `/edits`, `/variations`, `/v1/models`."""

from sd3_service.api.openai.document import openai_paths
from sd3_service.api.openai.surface import error_response, guarded_routes, router, unroutable

__all__ = ["error_response", "guarded_routes", "openai_paths", "router", "unroutable"]
