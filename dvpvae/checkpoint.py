"""Checkpoints: safetensors for tensors, JSON for everything else; nothing is unpickled.

A checkpoint is a directory ``step-00001234/``::

    config.json         the Config's fields, flat (``config_bytes``)
    model.safetensors   model weights and buffers (incl. ``dct_scale``)
    ema.safetensors     EMA weights (used for evaluation and sampling)
    state.safetensors   optimizer moments, torch RNG states      (training checkpoints)
    state.json          step, epoch, batch position, optimizer hyperparameters,
                        schedule, numpy/python RNG states, counters   (training checkpoints)

A weights folder (``DVPVAE.save_pretrained``: ``config.json`` + ``model.safetensors``)
has the same layout, so ``load_model`` reads both and ``from_pretrained`` reads a
checkpoint's trained weights. Directories are written under a temporary name, every
file fsynced, then renamed into place, so a crash never leaves a half-written
checkpoint under a real name; ``clean_stale`` removes what a killed writer left behind.
Every safetensors file records the sha256 of its tensors, and ``state.safetensors``
that of ``config.json`` and ``state.json``, so a truncated or bit-flipped file is an
error that names it. ``CheckpointManager`` keeps the last N plus the best by
validation loss (``best.json`` names it).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dvpvae.config import Config

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Names a writer uses only until its rename: anything matching is left over from a killed process.
_TMP_DIR = re.compile(r"^\.tmp-")
_TMP_FILE = re.compile(r"\.tmp-\d+$")
_REPLACED = re.compile(r"^\.tmp-replaced-(.+)-\d+$")


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


def clean_stale(directory: str) -> list[str]:
    """Remove the temporaries a killed writer left in ``directory``; one message per entry.

    A folder replaced as a whole (a checkpoint re-saved under its step, ``staged_dir``)
    is moved aside first: if the writer died before the new copy took its place, the
    old copy is put back.
    """
    if not os.path.isdir(directory):
        return []
    done = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        m = _REPLACED.match(name)
        if m and not os.path.exists(os.path.join(directory, m.group(1))):
            os.rename(path, os.path.join(directory, m.group(1)))
            done.append(f"restored {m.group(1)} from {path}")
        elif _TMP_DIR.match(name) or _TMP_FILE.search(name):
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            done.append(f"removed stale temporary {path}")
    if done:
        _fsync_dir(directory)
    return done


_PAUSE_ENV = "DVPVAE_TEST_PAUSE"


def _test_pause(point: str, step: int) -> None:
    """Test-only hook: with ``DVPVAE_TEST_PAUSE=<point>:<step>:<marker file>`` the writer
    creates the marker and sleeps at that point until it is killed, which makes a crash
    inside a write reproducible (tests/test_faults.py). It reads and changes no data."""
    spec = os.environ.get(_PAUSE_ENV)
    if not spec:
        return
    want, at, marker = spec.split(":", 2)
    if want == point and int(at) == step:
        open(marker, "w").close()
        while True:
            time.sleep(0.05)


# ----------------------------------------------------------------------------- tensors

def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of contiguous CPU tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


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
    meta = dict(meta or {}, aliases=json.dumps(aliases), sha256=_digest(out))
    return save(out, metadata=meta)


def load_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file (aliases expanded) and its metadata; errors name the file."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            # Copies: a tensor backed by the file's mapping dies with SIGBUS if the file is
            # later truncated or rewritten in place.
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except Exception as e:  # SafetensorError and OSError for truncated/garbled files
        raise CheckpointError(f"corrupt or truncated safetensors file {path}: {e}") from e
    recorded = meta.pop("sha256", None)  # absent in files other writers made
    if recorded is not None and _digest(tensors) != recorded:
        raise CheckpointError(f"corrupt safetensors file {path}: its tensors do not match the "
                              "sha256 recorded in it")
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

def build_model(config: Config, kind: str = "reference", precision: str = "float32") -> torch.nn.Module:
    """Construct ``DVPVAE`` (``kind="reference"``) or ``FastDVPVAE`` (``"fast"``) computing in
    ``precision`` (``FastDVPVAE``'s; the reference is float32 only).

    ``fast`` falls back to the reference with a warning when ``FastDVPVAE`` is not
    importable: both have the same constructor and state_dict.
    """
    import dvpvae

    if kind not in ("reference", "fast"):
        raise ValueError(f"unknown model kind {kind!r}; use 'reference' or 'fast'")
    if kind == "reference" and precision != "float32":
        raise ValueError(f"precision {precision!r} needs the fast model; the reference computes in float32")
    if kind == "fast":
        try:
            from dvpvae import FastDVPVAE
            return FastDVPVAE(config, precision=precision)
        except ImportError as e:
            warnings.warn(f"FastDVPVAE is not available ({e}); using the reference DVPVAE")
    return dvpvae.DVPVAE(config)


def config_bytes(config: Config) -> bytes:
    """``config.json`` of a checkpoint or weights folder: the Config's fields, flat (the layout
    ``PyTorchModelHubMixin`` gives a model's config)."""
    return _json_bytes(config.to_dict())


def config_from_dict(d: Any, where: str) -> Config:
    """The Config of a parsed ``config.json``; anything else raises CheckpointError naming ``where``."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where} is not a dvpvae config (expected a JSON object of Config fields)")
    if d.get("format") == "dvpvae" and isinstance(d.get("config"), dict):
        d = d["config"]  # the layout earlier versions wrote: the fields under "config"
    try:
        return Config.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where} is not a valid dvpvae config: {e}") from e


def read_config(folder: str) -> Config:
    """The Config in ``folder/config.json`` (a checkpoint or a weights folder)."""
    path = os.path.join(folder, "config.json")
    return config_from_dict(read_json(path), path)


def write_weights(folder: str, model: torch.nn.Module) -> None:
    """Write ``model.safetensors`` (the state_dict, ``dct_scale`` included) and ``config.json``
    (``model.config``) into ``folder``, each fsynced."""
    _write_synced(os.path.join(folder, "model.safetensors"),
                  _tensor_bytes(model.state_dict(), {"format": "pt"}))
    _write_synced(os.path.join(folder, "config.json"), config_bytes(model.config))


@contextlib.contextmanager
def staged_dir(path: str, replaceable: Collection[str] = ()):
    """Yield a new temporary folder beside ``path``; when the block succeeds, fsync its files
    and rename it to ``path``, so ``path`` is never seen half-written.

    An existing ``path`` is replaced as a whole, and only if it holds nothing but names in
    ``replaceable`` (anything else is not ours to delete: ValueError). It is moved aside
    before the new folder takes its place, so a crash between the two renames leaves
    ``.tmp-replaced-<name>-<pid>`` and no ``path``, never a mix of old and new files.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{path} exists and is not a folder")
        extra = sorted(set(os.listdir(path)) - set(replaceable))
        if extra:
            raise ValueError(f"{path} holds {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}, "
                             "which a saved model does not: refusing to replace it")
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{name}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
        for fname in os.listdir(tmp):
            with open(os.path.join(tmp, fname), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(path):
            aside = os.path.join(parent, f".tmp-replaced-{name}-{os.getpid()}")
            os.rename(path, aside)
            os.rename(tmp, path)
            shutil.rmtree(aside)
        else:
            os.rename(tmp, path)
        _fsync_dir(parent)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


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


def weights_file(folder: str, use_ema: bool) -> str:
    """``folder``'s EMA weights when asked for and present, else its trained weights."""
    ema = os.path.join(folder, "ema.safetensors")
    return ema if use_ema and os.path.isfile(ema) else os.path.join(folder, "model.safetensors")


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load the safetensors file ``path`` into ``model``; missing, unexpected or
    shape-mismatched keys raise CheckpointError naming them."""
    state, _ = load_tensors(path)
    load_into(model, state, path)


def load_model(path: str, kind: str = "reference", use_ema: bool = True,
               device: str | torch.device = "cpu", precision: str = "float32") -> torch.nn.Module:
    """Build the model of a run folder (best checkpoint, else latest), a checkpoint or a
    weights folder (``save_pretrained``) and load its EMA (``use_ema``, when present) or
    trained weights."""
    folder = resolve(path)
    model = build_model(read_config(folder), kind, precision)
    load_weights(model, weights_file(folder, use_ema))
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


_JSON_FILES = ("config.json", "state.json")  # their sha256 lives in state.safetensors


def load_training_checkpoint(path: str) -> TrainingCheckpoint:
    """Read a training checkpoint directory; any missing/corrupt part raises CheckpointError."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    tensors, meta = load_tensors(os.path.join(path, "state.safetensors"))
    try:
        recorded = json.loads(meta.get("json_sha256", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupt metadata in {path}/state.safetensors: {e}") from e
    for fname, digest in recorded.items():
        fp = os.path.join(path, fname)
        if not os.path.isfile(fp):
            raise CheckpointError(f"missing checkpoint file {fp}")
        if file_sha256(fp) != digest:
            raise CheckpointError(f"corrupt checkpoint file {fp}: its sha256 differs from the one "
                                  "recorded in state.safetensors (damaged or edited)")
    config = read_config(path)
    model, _ = load_tensors(os.path.join(path, "model.safetensors"))
    ema_path = os.path.join(path, "ema.safetensors")
    ema = load_tensors(ema_path)[0] if os.path.exists(ema_path) else None
    state = read_json(os.path.join(path, "state.json"))
    where = os.path.join(path, "state.json")
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} is not a JSON object")
    for key in ("step", "epoch", "batch_in_epoch", "optimizer", "rng"):
        if key not in state:
            raise CheckpointError(f"{where} lacks {key!r}")
    for key in ("rng/torch", "rng/numpy"):
        if key not in tensors:
            raise CheckpointError(f"{path}/state.safetensors lacks the tensor {key!r}")
    rng = state["rng"]
    if not (isinstance(rng, dict) and len(rng.get("numpy", ())) == 4 and len(rng.get("python", ())) == 3):
        raise CheckpointError(f"{where}: malformed 'rng' entry")
    try:
        optim = optimizer_from_files(tensors, state["optimizer"])
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed optimizer state ({e!r})") from e
    rng = {k: v for k, v in tensors.items() if k.startswith("rng/")}
    return TrainingCheckpoint(path, config, model, ema, optim, state, rng)


class CheckpointManager:
    """Writes ``step-XXXXXXXX`` checkpoint directories, keeps the last N and the best.

    One process writes a run's checkpoints. A write that fails (full disk, unwritable
    folder, an exception from a second signal) removes its temporary directory and
    raises; the checkpoints already on disk are untouched.
    """

    def __init__(self, directory: str, keep_last: int = 3):
        self.dir = directory
        self.keep_last = max(1, keep_last)

    def steps(self) -> list[tuple[int, str]]:
        """Checkpoint directories as (step, path), oldest first (complete or damaged alike)."""
        if not os.path.isdir(self.dir):
            return []
        out = []
        for name in os.listdir(self.dir):
            m = _STEP_DIR.match(name)
            if m and os.path.isdir(os.path.join(self.dir, name)):
                out.append((int(m.group(1)), os.path.join(self.dir, name)))
        return sorted(out)

    def latest(self) -> str | None:
        s = self.steps()
        return s[-1][1] if s else None

    def latest_intact(self) -> tuple[TrainingCheckpoint | None, list[str]]:
        """The newest checkpoint that loads completely, and why each newer one did not."""
        problems = []
        for _, path in reversed(self.steps()):
            try:
                return load_training_checkpoint(path), problems
            except CheckpointError as e:
                problems.append(str(e))
        return None, problems

    def best_info(self) -> dict | None:
        """Contents of ``best.json`` (None without one); a malformed file raises CheckpointError."""
        p = os.path.join(self.dir, "best.json")
        if not os.path.isfile(p):
            return None
        info = read_json(p)
        # Only a bare step-directory name is followed: never ``..`` or an absolute path.
        if not (isinstance(info, dict) and isinstance(info.get("checkpoint"), str)
                and _STEP_DIR.match(info["checkpoint"])
                and isinstance(info.get("val_loss"), (int, float))):
            raise CheckpointError(f"{p} is malformed: expected {{\"checkpoint\": \"step-NNNNNNNN\", "
                                  f"\"val_loss\": number, ...}}, got {info!r:.200}")
        return info

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
        name = f"step-{step:08d}"
        final = os.path.join(self.dir, name)
        files = {"model.safetensors": _tensor_bytes(model.state_dict()),
                 "config.json": config_bytes(config)}
        if ema is not None:
            files["ema.safetensors"] = _tensor_bytes(ema.state_dict())
        if optimizer is not None:
            opt_tensors, opt_desc = optimizer_to_files(optimizer.state_dict())
            rng_tensors, rng_desc = rng_to_files()
            full = dict(state or {}, step=step, optimizer=opt_desc, rng=rng_desc, val_loss=val_loss)
            files["state.json"] = _json_bytes(full)
            digests = {f: hashlib.sha256(files[f]).hexdigest() for f in _JSON_FILES}
            files["state.safetensors"] = _tensor_bytes({**opt_tensors, **rng_tensors},
                                                       {"json_sha256": json.dumps(digests)})
        os.makedirs(self.dir, exist_ok=True)
        tmp = os.path.join(self.dir, f".tmp-{name}-{os.getpid()}")
        try:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
            for i, (fname, data) in enumerate(files.items()):
                _write_synced(os.path.join(tmp, fname), data)
                if i == 0:
                    _test_pause("checkpoint-write", step)
            _fsync_dir(tmp)
            if os.path.exists(final):  # re-saving a step (e.g. interrupt right after a save)
                aside = os.path.join(self.dir, f".tmp-replaced-{name}-{os.getpid()}")
                os.rename(final, aside)  # clean_stale puts it back if we die before the next line
                os.rename(tmp, final)
                shutil.rmtree(aside)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.dir)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        try:
            info = self.best_info()
        except CheckpointError as e:
            warnings.warn(f"{e}; removing it")
            os.remove(os.path.join(self.dir, "best.json"))
            info = None
        if val_loss is not None and val_loss == val_loss:  # NaN never becomes the best
            if info is None or val_loss < info["val_loss"] or self.best() is None:
                atomic_write(os.path.join(self.dir, "best.json"),
                             _json_bytes({"checkpoint": name, "step": step, "val_loss": val_loss}))
        self.prune()
        return final

    def prune(self) -> None:
        """Delete all but the last ``keep_last`` checkpoints and the best one.

        Each goes to a temporary name first, so a kill mid-delete leaves no half-deleted
        directory under a checkpoint name.
        """
        best = self.best()
        for _, path in self.steps()[:-self.keep_last]:
            if best is None or os.path.abspath(path) != os.path.abspath(best):
                trash = os.path.join(self.dir, f".tmp-pruned-{os.path.basename(path)}-{os.getpid()}")
                os.rename(path, trash)
                shutil.rmtree(trash, ignore_errors=True)
