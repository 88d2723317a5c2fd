"""Checkpoints that survive crashes and never execute code when read.

Written to a temporary file in the same folder and moved into place with os.replace, so a crash or
a full disk mid-write leaves the previous checkpoint intact. Read with `weights_only=True`: only
tensors and plain containers, so RNG states are stored as tensors and lists, not pickled objects.
"""

import os
import random
from pathlib import Path

import numpy as np
import torch

# bump when the layout changes: older files are refused with a message instead of misread
CHECKPOINT_VERSION = 2


class CheckpointError(Exception):
    """A checkpoint that cannot be used for this run (other config, other version, unreadable)."""


def save_checkpoint(state: dict, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save({"version": CHECKPOINT_VERSION, **state}, tmp)
        os.replace(tmp, path)
    except OSError as error:  # disk full, quota, permissions: say so in one line
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} yet"
        raise CheckpointError(f"cannot write {path}: {error.strerror or error}; {kept}") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} has version {found}, this cxr reads version "
                              f"{CHECKPOINT_VERSION}; start a new run or use a matching cxr")
    return state


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        # the whole MT19937 state, including the cached second Gaussian of a Box-Muller pair
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((3, tuple(py[:-1]), py[-1] or None))
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
