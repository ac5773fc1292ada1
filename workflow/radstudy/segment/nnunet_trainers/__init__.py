"""nnU-Net trainer classes of radstudy.

This folder is both a sub-package of radstudy (`radstudy.segment.nnunet_trainers.RadstudyTrainer`, which is how
`radstudy.segment.nnunet` uses it) and a folder that nnU-Net's own command line can search through
`nnUNet_extTrainer`:

    export nnUNet_extTrainer=/path/to/workflow/radstudy/nnunet_trainers
    nnUNetv2_train 501 2d all -tr RadstudyTrainer -device cpu

(nnU-Net then imports `radstudy_trainer.py` as a top-level module, which is why that module uses
absolute imports only). See `radstudy.segment.nnunet` for why radstudy itself never goes through that name
lookup, and `radstudy_trainer` for the environment variables the command line reads.

The attribute is resolved lazily so that importing this package does not import torch or nnU-Net.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent  # the value for nnUNet_extTrainer

__all__ = ["FOLDER", "RadstudyTrainer"]


def __getattr__(name: str):
    if name == "RadstudyTrainer":
        from radstudy.radstudy_trainer import RadstudyTrainer

        return RadstudyTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
