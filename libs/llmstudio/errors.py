"""Domain errors. Services raise these; the gRPC layer (`grpcutil.status_code`) maps each to its
status code, so a domain module never needs gRPC."""

from __future__ import annotations


class StudioError(Exception):
    """Base of the domain errors; an unknown subclass maps to INTERNAL."""


class InvalidArgument(StudioError):
    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}" if field else reason)


class NotFound(StudioError):
    pass


class AlreadyExists(StudioError):
    pass


class FailedPrecondition(StudioError):
    pass


class PermissionDenied(StudioError):
    pass


class Unauthenticated(StudioError):
    pass


class ResourceExhausted(StudioError):
    pass
