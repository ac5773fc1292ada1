"""Torch tools shared by the deep features and the end-to-end networks: checkpoint files (read, strict backbone
load naming the keys that do not fit), the device, determinism and thread settings. Torch only: no DICOM, radiomics
or nnU-Net import, so that every stage's environment can use them; torch itself is imported when a function runs,
so that importing this module (as radstudy.segment.nnunet does) stays light."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

HEAD_PREFIXES = ("fc.", "conv_seg.")  # torchvision's classifier, MedicalNet's segmentation head


class ModelError(ValueError):
    """A checkpoint, device or network setting cannot be used (the stage stops: no patient could use it)."""


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch.set_num_threads(threads) for the duration of a block (None: leave torch's setting alone).
    On a machine shared with other jobs, threads=1 is the robust choice: measured here, 2 threads on 2 busy
    cores ran 5-20x slower than 1 thread, while on 2 idle cores they were only ~25% faster."""
    if not threads:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: top level, or under `state_dict` / `model`; `module.` prefixes removed."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a clear error
        raise ModelError(f"checkpoint {path} cannot be read as a torch state dict ({exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(f"checkpoint {path} holds no state dict (a mapping of parameter names to tensors)")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = str(key)
        while key.startswith("module."):
            key = key[len("module."):]
        state[key] = value
    if not state:
        raise ModelError(f"checkpoint {path} holds no tensors")
    return state


def load_backbone(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, what: str) -> None:
    """Strict load of every backbone key (heads ignored); a clear error naming the file and the keys otherwise."""
    import torch

    expected = model.state_dict()
    given = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    optional = {k for k in expected if k.endswith("num_batches_tracked")}  # absent from old checkpoints
    missing = [k for k in expected if k not in given and k not in optional]
    unexpected = [k for k in given if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    shapes = [f"{k} {tuple(given[k].shape)} (expected {tuple(expected[k].shape)})"
              for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    if shapes:
        problems.append(f"wrong shapes: {_short(shapes, 4)}")
    if problems:
        raise ModelError(f"checkpoint {path} does not fit the {what}: " + "; ".join(problems))
    full = {k: given.get(k, expected[k]) for k in expected}
    model.load_state_dict(full, strict=True)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_device(device: str = "auto", setting: str = "features.deep.device") -> torch.device:
    """The torch device of a `device` setting (auto: cuda when torch sees one); `setting` names it in errors."""
    import torch

    device = str(device).lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"{setting} is 'cuda' but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise ModelError(f"{setting} must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


@contextlib.contextmanager
def deterministic(seed: int, *, warn_only: bool = False):
    """Seeds, torch's deterministic algorithms and cuDNN settings for the duration of a block (then restored).
    warn_only: an operation without a deterministic kernel (some CUDA backward passes) warns instead of failing."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS determinism (read at its first use)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.manual_seed(int(seed))
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def _short(keys: Sequence[str], n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")
