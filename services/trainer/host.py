"""This host as the trainer sees it: the /proc files and the local model directories are read
here, and only here; what they mean is decided by core.py's pure functions. The heartbeat (what
the scheduler places jobs by) and the hardware check (what the worker refuses) both ask this
module, so they agree."""

from __future__ import annotations

from pathlib import Path

from .core import cpu_has_bf16, mem_available_bytes


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: unknown
        return ""


def cpu_info() -> str:
    return _read("/proc/cpuinfo")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16, AMX); elsewhere torch emulates
    it ~25x slower than fp32."""
    return cpu_has_bf16(cpu_info())


def cpu_hardware() -> tuple[int, bool]:
    """(available RAM in bytes, native bf16) of this host; (0, False) where /proc is not."""
    return mem_available_bytes(_read("/proc/meminfo")), cpu_has_native_bf16()


def check_local_model_dir(base_model: str) -> None:
    """Fail early, naming the path, when the base model is a local path that is not there.

    Absolute and ./ ../ ~ paths must exist; anything else may be a hub id (`org/name`), which
    transformers resolves (or rejects) itself.
    """
    if base_model.startswith(("/", "./", "../", "~")):
        path = Path(base_model).expanduser()
        if not (path / "config.json").is_file():
            what = "has no config.json" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"base model directory {path} {what}")
