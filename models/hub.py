"""``save_pretrained`` / ``from_pretrained`` directories: ``config.json`` + ``model.safetensors``.

No pickle anywhere: weights are safetensors, the config is JSON validated against the model's
config schema. Loading is strict: a missing or unexpected tensor is an error that lists the names.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from safetensors.torch import load_file, save_file

from data.files import AtomicFile, atomic_write
from models.config import ConfigBase

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def config_hash(config: ConfigBase | Mapping[str, Any]) -> str:
    """Stable sha256 of a config's canonical JSON (key-sorted)."""
    values = config.to_dict() if isinstance(config, ConfigBase) else dict(config)
    blob = json.dumps(values, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _canonicalize_safetensors_header(path: str | Path) -> None:
    """Rewrite a safetensors file's JSON header in place with sorted keys.

    safetensors serializes ``__metadata__`` from a Rust ``HashMap``, whose order is random per process, so the same
    tensors and metadata give different file bytes (and file hashes) in different processes. Sorting the keys keeps
    the header's length (same content, same compact separators), so only the header bytes are rewritten; a header
    that would not fit (never seen; escapes could differ) is left as written, still a valid file.
    """
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) <= length:
            handle.seek(8)
            handle.write(canonical.ljust(length, b" "))


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | Path,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically (data.files: never through a link planted at ``path``).

    The bytes are a function of the tensors and the metadata only (the header's keys are sorted), so re-saving the
    same weights in another process gives the same file hash. Tied / shared tensors are cloned so that
    safetensors accepts them.
    """
    path = Path(path)
    seen: dict[int, str] = {}
    tensors = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        tensors[name] = tensor.clone().contiguous() if key in seen else tensor.contiguous()
        if key != -1:
            seen.setdefault(key, name)
    output = AtomicFile(path)
    try:  # safetensors writes by name: into the temporary file, which it truncates (same inode, no new file)
        save_file(tensors, str(output.temp_path), metadata=dict(metadata or {}))
        _canonicalize_safetensors_header(output.temp_path)
    except BaseException:
        output.abort()
        raise
    output.commit()


def load_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file: ``.safetensors``, or a ``.pt``/``.pth``/``.bin`` state dict read with
    ``torch.load(weights_only=True)`` (never unpickles objects); a ``{"state_dict": ...}`` wrapper is unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class PretrainedMixin:
    """Adds ``save_pretrained(dir)`` and ``from_pretrained(dir)`` to an ``nn.Module``.

    The class sets ``config_class`` (a ConfigBase dataclass) and keeps its config in ``self.config``.
    """

    config_class: ClassVar[type[ConfigBase]]
    config: ConfigBase

    def save_pretrained(self, directory: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (``state_dict`` defaults to the module's)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()  # type: ignore[attr-defined]
        save_state_dict(state, directory / WEIGHTS_NAME, metadata={"format": "pt", "class": type(self).__name__})
        config_json = json.dumps({"class": type(self).__name__, **self.config.to_dict()}, indent=2, sort_keys=True)
        atomic_write(directory / CONFIG_NAME, config_json + "\n")
        return directory

    @classmethod
    def load_config(cls, directory: str | Path) -> ConfigBase:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} is not a save_pretrained directory "
                                    f"(expected {CONFIG_NAME} and {WEIGHTS_NAME})")
        values = json.loads(path.read_text())
        saved_class = values.pop("class", cls.__name__)
        if saved_class != cls.__name__:
            raise ValueError(f"{directory} holds a {saved_class}, not a {cls.__name__}")
        return cls.config_class.from_dict(values)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu", **overrides: Any):
        """Build the model from ``directory/config.json`` and load ``model.safetensors`` strictly."""
        directory = Path(directory)
        config = cls.load_config(directory)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found")
        model = cls(config, **overrides)  # type: ignore[call-arg]
        state = load_file(str(weights), device=str(map_location))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights} does not match {cls.__name__}({directory / CONFIG_NAME}): "
                             f"missing {sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]}")
        return model
