"""Where a base model may be read from: the model roots the operator configured.

A base_model a user names is read by the platform's processes with their own rights; outside the
roots it would be a way to probe the server's files (does /etc/x exist? is this another tenant's
checkpoint?). So with roots configured a base_model must be a folder under one of them, and the
refusal is the same whether the path outside exists or not."""

from __future__ import annotations

from pathlib import Path

from .errors import InvalidArgument, PermissionDenied


def check_model_root(field: str, base_model: str, roots: list[Path], setting: str) -> Path | None:
    """The resolved folder when `roots` are configured (PermissionDenied outside them, or when
    it is no folder), None when they are not (anything goes)."""
    if not roots:
        return None
    if "\x00" in base_model:
        raise InvalidArgument(field, "must not contain a NUL character")
    resolved = Path(base_model).expanduser().resolve()
    if not any(resolved.is_relative_to(Path(root).resolve()) for root in roots) \
            or not resolved.is_dir():
        raise PermissionDenied(f"{field}: not a model folder under the allowed model roots "
                               f"({setting})")
    return resolved
