"""Domain errors of the reranker core.

The core raises these; the HTTP edge (``deployments``) maps each ``kind`` to a status code in one table.
Messages are written for the API user: they never contain document text, keys or internal tracebacks.
"""

from __future__ import annotations


class RerankError(Exception):
    """Base class. ``param`` names the request field at fault, when there is one."""

    kind = "internal"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidInput(RerankError):
    """The request is malformed or asks for something the model cannot do (HTTP 400)."""

    kind = "invalid_input"


class InputTooLong(InvalidInput):
    """A pair is longer than the model's limit and truncation is off (HTTP 400)."""

    kind = "too_long"


class PayloadTooLarge(RerankError):
    """Request body, image bytes or image pixels over a configured bound (HTTP 413)."""

    kind = "too_large"


class ModelNotFound(RerankError):
    """The requested model id is not served (HTTP 404)."""

    kind = "model_not_found"


class CheckpointError(RerankError):
    """A checkpoint is malformed: missing, unexpected or mis-shaped tensors, or a bad config."""

    kind = "checkpoint"


class WeightsNotFound(CheckpointError):
    """The weights could not be found locally nor fetched (offline, not cached, wrong path)."""

    kind = "weights_not_found"
