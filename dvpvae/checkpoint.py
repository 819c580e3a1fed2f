"""Checkpoints: safetensors for tensors, JSON for everything else; nothing is unpickled.

A checkpoint is a directory ``step-00001234/``::

    config.json         {"format", "version", "config": Config fields, "model_class"}
    model.safetensors   model weights and buffers (incl. ``dct_scale``)
    ema.safetensors     EMA weights (used for evaluation and sampling)
    state.safetensors   optimizer moments, torch RNG states      (training checkpoints)
    state.json          step, epoch, batch position, optimizer hyperparameters,
                        schedule, numpy/python RNG states, counters   (training checkpoints)

A weights-only export (``config.json`` + ``model.safetensors``) has the same layout,
so ``load_model`` reads both. Directories are written under a temporary name, every
file fsynced, then renamed into place, so a crash never leaves a half-written
checkpoint under a real name. ``CheckpointManager`` keeps the last N plus the best by
validation loss (``best.json`` names it).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dvpvae.config import Config

FORMAT = "dvpvae-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the model."""


# ----------------------------------------------------------------------------- atomic I/O

def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and ``os.replace``."""
    if isinstance(data, str):
        data = data.encode()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(d)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n").encode()


def read_json(path: str) -> Any:
    """Read a JSON file; a missing or malformed file raises CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt JSON in {path}: {e}") from e


# ----------------------------------------------------------------------------- tensors

def _tensor_bytes(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> bytes:
    """Serialise a name -> tensor dict with safetensors; identical views become aliases.

    safetensors refuses tensors that share memory. A model may register one module
    twice (the research code's diffusion prior is), so repeated views are stored once
    and the other names are recorded in the ``aliases`` metadata.
    """
    from safetensors.torch import save

    out, aliases, seen = {}, {}, {}
    for name, t in tensors.items():
        t = t.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype)
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.to("cpu").contiguous()
    # Different views of one storage (rare) cannot be aliased: store them as copies.
    owners = set()
    for name, t in out.items():
        p = t.untyped_storage().data_ptr()
        if t.numel() > 0 and p in owners:
            out[name] = t.clone()
        owners.add(p)
    meta = dict(meta or {}, aliases=json.dumps(aliases))
    return save(out, metadata=meta)


def load_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file (aliases expanded) and its metadata; errors name the file."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError and OSError for truncated/garbled files
        raise CheckpointError(f"corrupt or truncated safetensors file {path}: {e}") from e
    try:
        aliases = json.loads(meta.pop("aliases", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupt alias metadata in {path}: {e}") from e
    for name, target in aliases.items():
        if target not in tensors:
            raise CheckpointError(f"{path}: alias {name!r} points to missing tensor {target!r}")
        tensors[name] = tensors[target]
    return tensors, meta


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict`` with an error that lists missing/unexpected keys and shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        def show(xs):
            return ", ".join(xs[:8]) + (f" ... ({len(xs)} total)" if len(xs) > 8 else "")
        parts = [f"missing keys: {show(missing)}" if missing else "",
                 f"unexpected keys: {show(unexpected)}" if unexpected else "",
                 f"shape mismatches: {show(bad)}" if bad else ""]
        raise CheckpointError(f"{where} does not match the model built from its config ("
                              + "; ".join(p for p in parts if p) + ")")
    module.load_state_dict(state)


# ----------------------------------------------------------------------------- optimizer / RNG

def optimizer_to_files(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer ``state_dict`` into tensors and a JSON-able description."""
    tensors, state_json = {}, {}
    for pid, st in sd["state"].items():
        entry = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{k}"] = v
                entry[k] = None
            else:
                entry[k] = v
        state_json[str(pid)] = entry
    return tensors, {"state": state_json, "param_groups": sd["param_groups"]}


def optimizer_from_files(tensors: dict[str, torch.Tensor], desc: dict) -> dict:
    """Inverse of ``optimizer_to_files``."""
    state = {}
    for pid, entry in desc["state"].items():
        st = {}
        for k, v in entry.items():
            if v is None:
                key = f"optim/{pid}/{k}"
                if key not in tensors:
                    raise CheckpointError(f"optimizer tensor {key} missing from state.safetensors")
                st[k] = tensors[key]
            else:
                st[k] = v
        state[int(pid)] = st
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in desc["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_to_files() -> tuple[dict[str, torch.Tensor], dict]:
    """Capture the torch (CPU and CUDA), numpy and python RNG states."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, pstate, pgauss = random.getstate()
    desc = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(pstate), pgauss]}
    return tensors, desc


def rng_from_files(tensors: dict[str, torch.Tensor], desc: dict) -> None:
    """Restore the RNG states captured by ``rng_to_files``."""
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    kind, pos, has_gauss, gauss = desc["numpy"]
    np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, pstate, pgauss = desc["python"]
    random.setstate((version, tuple(pstate), pgauss))


# ----------------------------------------------------------------------------- models

def build_model(config: Config, kind: str = "reference") -> torch.nn.Module:
    """Construct ``DVPVAE`` (``kind="reference"``) or ``FastDVPVAE`` (``"fast"``).

    ``fast`` falls back to the reference with a warning when ``FastDVPVAE`` is not
    importable: both have the same constructor and state_dict.
    """
    import dvpvae

    if kind == "fast":
        try:
            from dvpvae import FastDVPVAE
            return FastDVPVAE(config)
        except ImportError as e:
            warnings.warn(f"FastDVPVAE is not available ({e}); using the reference DVPVAE")
    elif kind != "reference":
        raise ValueError(f"unknown model kind {kind!r}; use 'reference' or 'fast'")
    return dvpvae.DVPVAE(config)


def read_config(ckpt_dir: str) -> Config:
    """The Config stored in ``ckpt_dir/config.json``."""
    path = os.path.join(ckpt_dir, "config.json")
    d = read_json(path)
    if not isinstance(d, dict) or d.get("format") != FORMAT or "config" not in d:
        raise CheckpointError(f"{path} is not a dvpvae checkpoint config (format {FORMAT!r})")
    if d.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has format version {d['version']}; this dvpvae reads "
                              f"up to {VERSION}")
    try:
        return Config.from_dict(d["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"invalid config in {path}: {e}") from e


def save_weights(out_dir: str, model: torch.nn.Module, config: Config, name: str = "model") -> None:
    """Write ``config.json`` and ``<name>.safetensors`` (each atomically) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, f"{name}.safetensors"), _tensor_bytes(model.state_dict()))
    atomic_write(os.path.join(out_dir, "config.json"), _json_bytes(_config_doc(model, config)))


def _config_doc(model: torch.nn.Module, config: Config) -> dict:
    return {"format": FORMAT, "version": VERSION, "config": config.to_dict(),
            "model_class": type(model).__name__}


def resolve(path: str) -> str:
    """Map a run directory or checkpoint directory to the checkpoint to load.

    A run directory resolves to its best checkpoint, else its latest, else the
    weights exported at its top level.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint or run directory {path} does not exist")
    if os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))  # a file inside a checkpoint dir
    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(
            os.path.join(path, "checkpoints")):
        return path
    mgr = CheckpointManager(os.path.join(path, "checkpoints"))
    found = mgr.best() or mgr.latest()
    if found:
        return found
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    raise CheckpointError(f"no checkpoint found in {path} (expected config.json or "
                          "checkpoints/step-*/)")


def load_model(path: str, kind: str = "reference", use_ema: bool = True,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the model from a checkpoint/run directory and load its (EMA) weights."""
    ckpt = resolve(path)
    config = read_config(ckpt)
    model = build_model(config, kind)
    name = "ema" if use_ema and os.path.isfile(os.path.join(ckpt, "ema.safetensors")) else "model"
    fp = os.path.join(ckpt, f"{name}.safetensors")
    state, _ = load_tensors(fp)
    load_into(model, state, fp)
    return model.to(device).eval()


# ----------------------------------------------------------------------------- training state

@dataclass
class TrainingCheckpoint:
    """Everything read back from a training checkpoint directory."""

    path: str
    config: Config
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict | None
    state: dict = field(default_factory=dict)
    rng_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def restore_rng(self) -> None:
        rng_from_files(self.rng_tensors, self.state["rng"])


def load_training_checkpoint(path: str) -> TrainingCheckpoint:
    """Read a training checkpoint directory; any missing/corrupt part raises CheckpointError."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config = read_config(path)
    model, _ = load_tensors(os.path.join(path, "model.safetensors"))
    ema_path = os.path.join(path, "ema.safetensors")
    ema = load_tensors(ema_path)[0] if os.path.exists(ema_path) else None
    state = read_json(os.path.join(path, "state.json"))
    tensors, _ = load_tensors(os.path.join(path, "state.safetensors"))
    for key in ("step", "epoch", "batch_in_epoch", "optimizer", "rng"):
        if key not in state:
            raise CheckpointError(f"{path}/state.json lacks {key!r}")
    optim = optimizer_from_files(tensors, state["optimizer"])
    rng = {k: v for k, v in tensors.items() if k.startswith("rng/")}
    return TrainingCheckpoint(path, config, model, ema, optim, state, rng)


class CheckpointManager:
    """Writes ``step-XXXXXXXX`` checkpoint directories, keeps the last N and the best."""

    def __init__(self, directory: str, keep_last: int = 3):
        self.dir = directory
        self.keep_last = max(1, keep_last)

    def steps(self) -> list[tuple[int, str]]:
        """Complete checkpoints as (step, path), oldest first."""
        if not os.path.isdir(self.dir):
            return []
        out = []
        for name in os.listdir(self.dir):
            m = _STEP_DIR.match(name)
            if m and os.path.isfile(os.path.join(self.dir, name, "config.json")):
                out.append((int(m.group(1)), os.path.join(self.dir, name)))
        return sorted(out)

    def latest(self) -> str | None:
        s = self.steps()
        return s[-1][1] if s else None

    def best_info(self) -> dict | None:
        p = os.path.join(self.dir, "best.json")
        return read_json(p) if os.path.isfile(p) else None

    def best(self) -> str | None:
        info = self.best_info()
        if info is None:
            return None
        p = os.path.join(self.dir, info["checkpoint"])
        return p if os.path.isdir(p) else None

    def save(self, step: int, model: torch.nn.Module, config: Config, *,
             ema: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
             state: dict | None = None, val_loss: float | None = None) -> str:
        """Write checkpoint ``step`` atomically; update ``best.json``; prune old ones."""
        os.makedirs(self.dir, exist_ok=True)
        name = f"step-{step:08d}"
        final = os.path.join(self.dir, name)
        tmp = os.path.join(self.dir, f".tmp-{name}-{os.getpid()}")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        files = {"model.safetensors": _tensor_bytes(model.state_dict()),
                 "config.json": _json_bytes(_config_doc(model, config))}
        if ema is not None:
            files["ema.safetensors"] = _tensor_bytes(ema.state_dict())
        if optimizer is not None:
            opt_tensors, opt_desc = optimizer_to_files(optimizer.state_dict())
            rng_tensors, rng_desc = rng_to_files()
            full = dict(state or {}, step=step, optimizer=opt_desc, rng=rng_desc, val_loss=val_loss)
            files["state.safetensors"] = _tensor_bytes({**opt_tensors, **rng_tensors})
            files["state.json"] = _json_bytes(full)
        for fname, data in files.items():
            _write_synced(os.path.join(tmp, fname), data)
        _fsync_dir(tmp)
        if os.path.exists(final):  # re-saving a step (e.g. interrupt right after a save)
            trash = f"{final}.old-{os.getpid()}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.dir)
        if val_loss is not None and val_loss == val_loss:  # NaN never becomes the best
            info = self.best_info()
            if info is None or val_loss < info["val_loss"] or self.best() is None:
                atomic_write(os.path.join(self.dir, "best.json"),
                             _json_bytes({"checkpoint": name, "step": step, "val_loss": val_loss}))
        self.prune()
        return final

    def prune(self) -> None:
        """Delete all but the last ``keep_last`` checkpoints and the best one."""
        best = self.best()
        for _, path in self.steps()[:-self.keep_last]:
            if best is None or os.path.abspath(path) != os.path.abspath(best):
                shutil.rmtree(path, ignore_errors=True)
