"""Published VPR checkpoints, brought into edgevpr's own modules (``edgevpr import FORMAT CHECKPOINT``).

``import_checkpoint`` reads a release file exactly as published (``.pth``/``.ckpt`` state dicts through
``torch.load(weights_only=True)``, safetensors, a zip holding a ``.pth``), converts it with its family's
converter under strict key accounting (``base.Ledger``), loads the result into an edgevpr model with every
parameter filled, and saves it (safetensors + JSON) with its provenance: upstream repository, release URL,
sha256 of the source file, licence, and the upstream keys left out on purpose with the reason.

Importing this package does not import torch: its names come from ``importer`` on first use, so ``releases`` (the
named releases, which ``edgevpr models`` lists) loads in the torch-free runtime.
"""

from __future__ import annotations

__all__ = ["FAMILIES", "CheckpointError", "Converted", "Family", "convert", "import_checkpoint", "read_checkpoint"]


def __getattr__(name: str):
    if name in __all__:
        from . import importer

        return getattr(importer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
