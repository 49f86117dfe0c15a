"""Domain errors. Services raise these; the gRPC layer maps each to its status code."""

from __future__ import annotations

import grpc


class StudioError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(StudioError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}" if field else reason)


class NotFound(StudioError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(StudioError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(StudioError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(StudioError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(StudioError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(StudioError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
