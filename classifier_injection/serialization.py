"""Files on disk: atomic writes and strictly checked safetensors reads (nothing is ever unpickled)."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

__all__ = [
    "FLOAT_DTYPES",
    "atomic_save_safetensors",
    "atomic_write",
    "atomic_write_text",
    "check_state_dict",
    "default_permissions",
    "few",
    "fsync",
    "read_safetensors",
]

#: The safetensors library's own bound on the JSON header; checked before the header is parsed.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Floating dtypes a weights file may hold; integer buffers must match the model exactly.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's bytes to disk, so that a rename cannot publish an empty file after a crash."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool = True) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it over ``path`` atomically.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        IsADirectoryError: ``path`` is a directory.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: pass overwrite=True to replace it")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _plain_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # mkstemp's file is private (0600); the result should read like any other file
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def default_permissions(directory: bool = False) -> int:
    """The mode a plain ``open`` gives a new file (0666), or ``mkdir`` a new directory (0777), less the umask."""
    umask = os.umask(0)  # the only portable way to read it
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _plain_mode(path: Path) -> int:
    """The permissions ``open(path, "w")`` would leave: the file's own, else :func:`default_permissions`."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return default_permissions()


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``tensors`` (and string ``metadata``) as a safetensors file, atomically (see :func:`atomic_write`)."""
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(metadata) if metadata is not None else None
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=meta), overwrite=overwrite)


def _check_safetensors_header(path: Path) -> None:
    """Reject truncated files and absurd header sizes before the header is parsed."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
    if len(prefix) < 8:
        raise ValueError(f"{path} is not a safetensors file: it is truncated ({size} bytes, expected at least 8)")
    header_len = int.from_bytes(prefix, "little")
    if header_len > MAX_HEADER_BYTES:
        raise ValueError(
            f"{path} is not a valid safetensors file: its header claims {header_len} bytes, more than the "
            f"{MAX_HEADER_BYTES} allowed (corrupted or hostile file)"
        )
    if 8 + header_len > size:
        raise ValueError(
            f"{path} is truncated: its header claims {header_len} bytes but the file has only {size}; "
            "download or save it again"
        )
    with open(path, "rb") as f:
        f.seek(8)
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError) as err:
            raise ValueError(f"{path} is not a valid safetensors file (its header is not JSON: {err})") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a valid safetensors file (its header is not a JSON object)")
    # The library says "incomplete metadata" for a cut file; name the usual cause instead.
    ends = [e["data_offsets"][1] for e in header.values() if isinstance(e, dict) and "data_offsets" in e]
    data_len = max((end for end in ends if _is_int(end)), default=0)
    if 8 + header_len + data_len > size:
        raise ValueError(
            f"{path} is truncated: it describes {8 + header_len + data_len} bytes but has only {size}; "
            "download or save it again"
        )


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with a clear error for anything that is not one.

    Raises:
        FileNotFoundError: no such file.
        ValueError: truncated, corrupted or oversized-header file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    _check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path} is not a valid safetensors file ({err})") from err
    return tensors, metadata


def check_state_dict(
    tensors: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    source: str | os.PathLike,
    *,
    parameters: set[str] | frozenset[str] = frozenset(),
) -> torch.dtype | None:
    """Check that ``tensors`` (read from ``source``) fit a model whose state dict is ``reference``.

    ``reference`` may live on the ``meta`` device (only names, shapes and dtypes are used). Floating
    entries may be stored in any of :data:`FLOAT_DTYPES` but all in the same one; other entries must
    match the reference dtype. Entries named in ``parameters`` must be finite.

    Returns:
        The floating dtype of the file (``None`` if it holds no floating tensor).

    Raises:
        ValueError: missing or unexpected keys, wrong shapes or dtypes, mixed floating dtypes, NaN/inf.
    """
    missing = sorted(set(reference) - set(tensors))
    unexpected = sorted(set(tensors) - set(reference))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model: {few(missing)} missing, {few(unexpected)} unexpected; "
            "was it saved from another architecture or number of classes?"
        )
    float_dtypes = set()
    for key, ref in reference.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{source}: {key!r} has shape {tuple(t.shape)}, the model expects {tuple(ref.shape)}")
        if ref.is_floating_point():
            if t.dtype not in FLOAT_DTYPES:
                raise ValueError(
                    f"{source}: {key!r} has dtype {t.dtype}, expected a floating dtype "
                    f"({', '.join(str(d) for d in FLOAT_DTYPES)})"
                )
            float_dtypes.add(t.dtype)
        elif t.dtype != ref.dtype:
            raise ValueError(f"{source}: {key!r} has dtype {t.dtype}, the model expects {ref.dtype}")
        if key in parameters and not torch.isfinite(t).all():
            raise ValueError(f"{source}: {key!r} contains NaN or infinite values (corrupted weights)")
    if len(float_dtypes) > 1:
        raise ValueError(
            f"{source} mixes floating dtypes {sorted(str(d) for d in float_dtypes)}: save the model in one dtype"
        )
    return next(iter(float_dtypes), None)


def few(keys: list[str], n: int = 5) -> str:
    if not keys:
        return "none"
    return ", ".join(repr(k) for k in keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
