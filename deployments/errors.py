"""One status table at the edge: domain errors -> HTTP status, error type and the shared envelope."""

from __future__ import annotations

from typing import Any

from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import ReplicaUnavailableError
from starlette.responses import JSONResponse

from rerank_core.errors import RerankError

# kind (rerank_core.errors) -> (HTTP status, error type)
STATUS_TABLE: dict[str, tuple[int, str]] = {
    "invalid_input": (400, "invalid_request_error"),
    "too_long": (400, "invalid_request_error"),
    "too_large": (413, "request_too_large"),
    "model_not_found": (404, "not_found_error"),
    "unauthorized": (401, "authentication_error"),
    "not_found": (404, "not_found_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "overloaded": (503, "server_overloaded"),
    "not_ready": (503, "service_unavailable"),
    "timeout": (504, "timeout_error"),
    "checkpoint": (500, "internal_server_error"),
    "weights_not_found": (500, "internal_server_error"),
    "internal": (500, "internal_server_error"),
}


class Unauthorized(RerankError):
    kind = "unauthorized"


class RouteNotFound(RerankError):
    kind = "not_found"


class Overloaded(RerankError):
    kind = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(Overloaded):
    kind = "not_ready"


class Timeout(RerankError):
    kind = "timeout"


def _causes(exc: BaseException, limit: int = 8):
    """``exc``, then what it wraps (``RayTaskError.cause`` or ``__cause__``), and so on (at most ``limit``)."""
    for _ in range(limit):
        yield exc
        inner = getattr(exc, "cause", None) or exc.__cause__
        if inner is None or inner is exc:
            return
        exc = inner


def unwrap(exc: BaseException) -> BaseException:
    """The domain error inside a Ray/Serve wrapper (``RayTaskError(InvalidInput)`` keeps it as ``cause``);
    without one, the innermost exception."""
    for e in _causes(exc):
        if isinstance(e, RerankError) and getattr(e, "message", None) is not None:
            return e
    return e


# a replica (or its node) died or became unreachable under a call: the call may be retried elsewhere
_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, ReplicaUnavailableError)


def replica_lost(exc: BaseException) -> bool:
    """True if ``exc`` says the replica serving a call went away (ActorDiedError, ActorUnavailableError, a
    crashed worker or node), also when Ray (``RayTaskError.cause``) or Serve (``__cause__`` of its "upstream
    actor died" error) wraps it. Domain errors are never a lost replica."""
    for e in _causes(exc):
        if isinstance(e, RerankError):
            return False
        if isinstance(e, _LOST):
            return True
    return False


def envelope(status: int, err_type: str, message: str, param: str | None = None) -> dict[str, Any]:
    """The error body both OpenAI-style and NIM-style clients read."""
    detail = {"message": message, "type": err_type, "param": param, "code": status}
    return {"object": "error", "message": message, "type": err_type, "code": status, "error": detail}


def error_response(
    status: int, err_type: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(envelope(status, err_type, message, param), status_code=status, headers=headers)


def domain_error_response(exc: RerankError, request_id: str) -> JSONResponse:
    status, err_type = STATUS_TABLE.get(exc.kind, STATUS_TABLE["internal"])
    headers: dict[str, str] = {}
    message = exc.message
    if status >= 500 and status not in (503, 504):
        message = f"internal error (request id {request_id})"
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status in (429, 503):
        headers["Retry-After"] = str(getattr(exc, "retry_after_s", 1))
    return error_response(status, err_type, message, exc.param if status < 500 else None, headers)


def internal_error_response(request_id: str) -> JSONResponse:
    return error_response(500, "internal_server_error", f"internal error (request id {request_id})")
