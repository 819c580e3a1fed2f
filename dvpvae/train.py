"""Train DVP-VAE: ``python -m dvpvae.train`` / ``dvpvae-train`` / ``torchrun ... -m dvpvae.train``.

The paper's recipe: Adamax with weight decay, per-step linear warm-up then cosine
decay, gradient-norm clipping, EMA of the weights (validation and samples use the EMA;
its rate warms up by default, ``--ema-warmup false`` gives the paper's plain EMA), an
optional skip of updates whose gradient norm exceeds ``grad_skip_thr``, and steps whose
loss or gradient is NaN/inf are skipped and counted.

Reproducibility: the model's random draws at step s on rank r come from the global
torch RNG reseeded with (seed, r, s), and the data order of an epoch is a function of
(seed, epoch). A resumed run therefore replays exactly the draws and batches of an
uninterrupted one. The training step never reads a device value on the host; values
are accumulated on the device and read every ``--log-every`` steps.

Faults (README, "Faults"): a failed checkpoint write is reported and training goes on,
the next save trying again; ``max_consecutive_skips`` skipped steps in a row stop the run
without a checkpoint; bad input stops ``main`` with a one-line error before any work.

Run folder (``--out``): run.json, metrics.jsonl, curves.png, samples/step-*.png,
checkpoints/step-*/ (+ best.json), and final/: the final EMA weights as a hub-style folder
(``DVPVAE.from_pretrained``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from dvpvae import plotting
from dvpvae.cli import add_model_options, check_common_args
from dvpvae.checkpoint import (CheckpointError, CheckpointManager, TrainingCheckpoint, atomic_write,
                               build_model, clean_stale, load_into, load_training_checkpoint,
                               read_json)
from dvpvae.config import PRESETS, Config, get_config
from dvpvae.data import DATASETS, BatchIterator, DataError, first_images, load_dataset
from dvpvae.optim import EMA, CosineSchedule, GradNormGuard, MaskedAdamax

# ----------------------------------------------------------------------------- CLI


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _parse_int_tuple(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` flag per Config field; the type follows the field's default."""
    group = parser.add_argument_group("config overrides (default: the preset's value)")
    base = Config()
    for f in dataclasses.fields(Config):
        default = getattr(base, f.name)
        if isinstance(default, bool):
            typ, meta = _parse_bool, "{true,false}"
        elif isinstance(default, tuple):
            typ, meta = _parse_int_tuple, "N,N,..."
        else:
            typ, meta = type(default), None
        group.add_argument("--" + f.name.replace("_", "-"), dest=f"cfg_{f.name}", type=typ,
                           default=None, metavar=meta, help=f"Config.{f.name} (mnist preset: {default})")


def config_overrides(args: argparse.Namespace) -> dict:
    """The Config fields given explicitly on the command line."""
    return {f.name: getattr(args, f"cfg_{f.name}") for f in dataclasses.fields(Config)
            if getattr(args, f"cfg_{f.name}", None) is not None}


class _Parser(argparse.ArgumentParser):
    """Errors in one line: the usage of every config flag would bury the message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dvpvae-train", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="named config (default: mnist, or the resumed run's)")
    p.add_argument("--data", choices=DATASETS, default=None,
                   help="dataset (default: the preset's Config.dataset)")
    p.add_argument("--data-root", default=None,
                   help="directory with the dataset files, or the .npz file (default: data/, or the "
                        "resumed run's)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="npz: fraction of x used for validation (default 0.1, or the resumed run's)")
    p.add_argument("--no-download", action="store_true", help="never download missing dataset files")
    p.add_argument("--hflip", type=_parse_bool, default=None,
                   help="random horizontal flips of training images (default: on for cifar10, "
                        "as the research code)")
    add_model_options(p)
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (default: epochs x steps per epoch); "
                        "also the length of the LR schedule")
    p.add_argument("--out", default=None, help="run folder (default: runs/<preset>-<data>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="resume from PATH (checkpoint or run folder) or, without PATH, from the "
                        "latest checkpoint in --out (a fresh start if there is none)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=50, help="steps between metrics rows")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between validation + checkpoint + samples (default: one epoch)")
    p.add_argument("--save-every", type=int, default=None,
                   help="steps between extra checkpoints without validation (default: none)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept besides the best")
    p.add_argument("--num-samples", type=int, default=64, help="images in each sample grid")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")
    add_config_flags(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject bad command-line values before any work starts (a one-line SystemExit)."""
    fail = check_common_args(args, "dvpvae-train",
                             ("max_steps", "log_every", "eval_every", "save_every", "keep", "num_samples", "threads"))
    if args.resume not in (None, "auto") and not os.path.isdir(args.resume):
        fail(f"--resume {args.resume}: no such run or checkpoint folder")
    if args.resume is None:  # a resumed run's overrides apply to its checkpoint's config
        try:
            get_config(args.preset or "mnist", **config_overrides(args))
        except KeyError as e:
            fail(e.args[0])
        except ValueError as e:
            fail(e)


# ----------------------------------------------------------------------------- distributed


def init_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the process group started by torchrun, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1 or dist.is_initialized():
        if not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        return rank, world, torch.device(device)
    return 0, 1, torch.device(device)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel`` configured for DVP-VAE."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    # Buffers (dct_scale, DCT bases) never change in training: no per-step broadcast
    # (the newer spelling of that option is used when this torch has it).
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
        inspect.signature(DDP.__init__).parameters else {"broadcast_buffers": False}
    # The last ladder block's z-projection is never used (as in the research model), so
    # DDP must look for unused parameters. static_graph=True would avoid that search but
    # gave wrong averaged gradients for this model (tests/test_ddp.py checks them).
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=True, **no_sync)


VAL_STREAM = 2**40  # a "step" no run reaches: the validation draws' own stream
STOP_SKIPS = "too many skipped steps"  # run() results besides signal names, "requested", None
STOP_WRITE = "checkpoint write failed"


def step_seed(seed: int, rank: int, step: int) -> int:
    """A well-mixed 63-bit seed for the random draws of ``step`` on ``rank``."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Holds the run state and implements the training loop (see module docstring).

    ``build(config, kind, precision)`` makes the model (``build_model``; benchmarks pass
    another to train a different implementation with the same recipe)."""

    def __init__(self, args: argparse.Namespace, build=build_model):
        self.args = args
        if args.threads:
            torch.set_num_threads(args.threads)
        self.rank, self.world, self.device = init_distributed(args.device)
        self.is_main = self.rank == 0
        self._stop_reason: str | None = None
        self._skip_streak = 0
        self._last_save_ok = True
        self.second_signal: int | None = None
        self.step_hook = None  # callable(trainer) after every step (tests, tooling)

        self.ckpt = self._find_resume()
        resume_path = self.ckpt.path if self.ckpt is not None else None
        if resume_path is None and args.out and CheckpointManager(
                os.path.join(args.out, "checkpoints")).latest():
            raise ValueError(f"{args.out} already holds checkpoints; pass --resume to continue "
                             "that run or choose another --out")
        run_meta = self._read_run_meta(resume_path)
        data_name = args.data or run_meta.get("data")
        saved_preset = self.ckpt.state.get("preset", run_meta.get("preset")) if self.ckpt else None
        if args.preset and saved_preset and args.preset != saved_preset:
            raise ValueError(f"--preset {args.preset}, but {resume_path} was trained with preset "
                             f"{saved_preset}; drop --preset to resume it")
        self.preset = args.preset or run_meta.get("preset") or "mnist"
        overrides = config_overrides(args)
        if self.ckpt is not None:
            config = self.ckpt.config
            changed = {k: v for k, v in overrides.items() if getattr(config, k) != v}
            if changed:
                warnings.warn(f"resuming with changed config fields {changed}: the run will not "
                              "follow the uninterrupted trajectory")
                config = config.replace(**changed)
        else:
            config = get_config(self.preset, **overrides)
        data_name = data_name or config.dataset
        self.data_name = data_name
        self.data_root = args.data_root or run_meta.get("data_root") or "data"
        self.val_fraction = args.val_fraction or run_meta.get("val_fraction") or 0.1
        data = load_dataset(data_name, self.data_root, val_size=config.val_size,
                            val_fraction=self.val_fraction, download_ok=not args.no_download)
        c, h, _ = data.image_shape
        if (c, h) != (config.image_channels, config.image_size):
            explicit = {"image_channels", "image_size"} & set(overrides)
            if explicit or resume_path:
                raise ValueError(f"{data_name} images are {data.image_shape}, the config expects "
                                 f"{config.image_shape}")
            config = config.replace(image_channels=c, image_size=h)
        self.config = config
        self.data = data

        # Same initial weights on every rank (DDP also broadcasts rank 0's at wrap time).
        torch.manual_seed(config.seed)
        model = build(config, args.model, args.precision)
        model.validate_inputs = False  # its checks read device values; data is valid by construction
        if self.ckpt is not None:
            load_into(model, self.ckpt.model, os.path.join(resume_path, "model.safetensors"))
        else:
            import dvpvae
            dvpvae.set_dct_scale(model, first_images(data.train, config.dct_scale_images))
        self.model = model.to(self.device)
        self.ema = EMA(self.model, config.ema_rate, warmup=config.ema_warmup)
        if self.ckpt is not None and self.ckpt.ema is not None:
            load_into(self.ema.module, self.ckpt.ema, os.path.join(resume_path, "ema.safetensors"))
        self.ddp = self.model
        if self.world > 1:
            self.ddp = wrap_ddp(self.model, self.device)

        hflip = args.hflip if args.hflip is not None else run_meta.get("hflip", data_name == "cifar10")
        self.hflip = hflip
        self.train_iter = BatchIterator(data.train, config.batch_size, shuffle=True, drop_last=True,
                                        seed=config.seed, rank=self.rank, world_size=self.world,
                                        hflip=hflip, device=self.device)
        self.val_iter = BatchIterator(data.val, config.test_batch_size, shuffle=False, drop_last=False,
                                      rank=self.rank, world_size=self.world, device=self.device)
        self.steps_per_epoch = len(self.train_iter)
        self.total_steps = args.max_steps or run_meta.get("max_steps") or config.epochs * self.steps_per_epoch
        self.eval_every = args.eval_every or self.steps_per_epoch

        self.optimizer = MaskedAdamax([p for p in self.model.parameters() if p.requires_grad],
                                      lr=config.lr, eps=config.adam_eps,
                                      weight_decay=config.weight_decay)
        self.schedule = CosineSchedule(self.optimizer, config.lr, self.total_steps,
                                       config.warmup_epochs * self.steps_per_epoch, config.eta_min)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.counters = {"skipped_nonfinite": 0, "skipped_grad_norm": 0}
        self.best_val = math.inf
        if self.ckpt is not None:
            st = self.ckpt.state
            self.optimizer.load_state_dict(self.ckpt.optimizer)
            self.step, self.epoch, self.batch_in_epoch = st["step"], st["epoch"], st["batch_in_epoch"]
            self.counters.update(st.get("counters", {}))
            self.best_val = st.get("best_val", math.inf)
            self.ckpt.restore_rng()
            self._check_resumed_state(st)
        self.guard = GradNormGuard(self.device, config.grad_skip_thr, config.grad_skip_factor)
        if self.ckpt is not None and "skip_guard" in self.ckpt.state:
            self.guard.load_state_dict(self.ckpt.state["skip_guard"])

        self.out = args.out or os.path.join("runs", f"{self.preset}-{data_name}")
        self.ckpts = CheckpointManager(os.path.join(self.out, "checkpoints"), keep_last=args.keep)
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        self.tb = None
        if self.is_main:
            self._init_run_folder()

    # -- setup helpers -------------------------------------------------------------------

    def _find_resume(self) -> TrainingCheckpoint | None:
        """The checkpoint to resume from (None: a new run); sets ``args.out`` from it.

        In a run folder this is the newest checkpoint that loads completely: damaged newer
        ones are reported and passed over. What a killed writer left is removed first.
        """
        a = self.args
        if a.resume is None:
            return None
        if a.resume == "auto":
            if a.out is None:
                raise ValueError("--resume without a PATH needs --out RUN_DIR")
            run = a.out
        elif os.path.isdir(os.path.join(a.resume, "checkpoints")):
            run = a.resume
            if a.out is None:
                a.out = run
        elif os.path.isfile(os.path.join(a.resume, "config.json")):
            if a.out is None:  # .../RUN/checkpoints/step-N -> RUN
                a.out = os.path.dirname(os.path.dirname(os.path.abspath(a.resume)))
            return load_training_checkpoint(a.resume)
        else:
            raise CheckpointError(f"--resume {a.resume} is neither a run folder (no checkpoints/) "
                                  "nor a checkpoint folder (no config.json)")
        ckpt_dir = os.path.join(run, "checkpoints")
        if self.is_main:
            for msg in clean_stale(ckpt_dir):
                print(msg, file=sys.stderr)
        self._barrier()
        ckpt, problems = CheckpointManager(ckpt_dir).latest_intact()
        if self.is_main:
            for msg in problems:
                print(f"passing over a damaged checkpoint: {msg}", file=sys.stderr)
        if ckpt is None and problems:
            raise CheckpointError(f"no intact checkpoint in {ckpt_dir} to resume from "
                                  f"({len(problems)} damaged)")
        if ckpt is None and a.resume != "auto":
            raise CheckpointError(f"no checkpoint in {ckpt_dir} to resume from")
        if self.is_main and ckpt is None:
            print(f"no checkpoint in {ckpt_dir}; starting a new run", file=sys.stderr)
        elif self.is_main and problems:
            print(f"resuming from {ckpt.path}, the newest intact checkpoint", file=sys.stderr)
        return ckpt

    def _check_resumed_state(self, st: dict) -> None:
        """A resumed run must see the data as the checkpointed one did; a changed LR schedule
        is allowed (e.g. a longer --max-steps) with a warning."""
        where = os.path.join(self.ckpt.path, "state.json")
        world = st.get("world_size", self.world)
        if world != self.world:
            raise ValueError(f"{where}: written by a run on {world} processes, this one has "
                             f"{self.world}; the data shards and the position in the epoch would not "
                             "carry over (resume with the same number of processes)")
        spe = st.get("data", {}).get("steps_per_epoch", self.steps_per_epoch)
        if spe != self.steps_per_epoch:
            raise ValueError(f"{where}: the checkpointed run had {spe} steps per epoch, this data "
                             f"and batch size give {self.steps_per_epoch}; the position in the epoch "
                             "would not carry over")
        saved = st.get("scheduler")
        now = self.schedule.state_dict()
        if saved is not None and saved != now:
            changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
            warnings.warn(f"resuming with a changed learning-rate schedule {changed} (checkpoint, now): "
                          "the run will not follow the uninterrupted trajectory")

    def _read_run_meta(self, resume_path: str | None) -> dict:
        if not resume_path or self.args.out is None:
            return {}
        path = os.path.join(self.args.out, "run.json")
        if not os.path.isfile(path):
            return {}
        meta = read_json(path)
        if not isinstance(meta, dict) or not isinstance(meta.get("args", {}), dict):
            raise CheckpointError(f"{path} is malformed: expected a JSON object with an 'args' object")
        return meta.get("args", {})

    def _init_run_folder(self) -> None:
        for d in (self.out, self.ckpts.dir):
            for msg in clean_stale(d):
                print(msg, file=sys.stderr)
        os.makedirs(os.path.join(self.out, "samples"), exist_ok=True)
        meta = {"config": self.config.to_dict(), "world_size": self.world,
                "args": {"data": self.data_name, "data_root": self.data_root, "model": self.args.model,
                         "max_steps": self.total_steps, "out": self.out, "preset": self.preset,
                         "val_fraction": self.val_fraction, "hflip": self.hflip},
                "steps_per_epoch": self.steps_per_epoch, "num_parameters": self.model.num_parameters(),
                "images": {k: len(getattr(self.data, k)) if getattr(self.data, k) is not None else 0
                           for k in ("train", "val", "test")}}
        atomic_write(os.path.join(self.out, "run.json"), json.dumps(meta, indent=1) + "\n")
        # Rows past the resumed step belong to a trajectory that is being replayed.
        rows = [r for r in plotting.read_metrics(self.metrics_path) if r.get("step", 0) <= self.step]
        atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        print(f"{type(self.model).__name__} ({self.model.num_parameters():,} parameters) on "
              f"{self.data_name}: {len(self.data.train)} train / {len(self.data.val)} val images, "
              f"{self.world} x {self.config.batch_size} per step, {self.steps_per_epoch} steps/epoch, "
              f"{self.total_steps} steps from step {self.step}; run folder {self.out}", file=sys.stderr)
        if self.args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(f"--tensorboard needs the tensorboard package ({e}); "
                                  "pip install tensorboard") from e
            self.tb = SummaryWriter(os.path.join(self.out, "tensorboard"))

    # -- stopping ------------------------------------------------------------------------

    def request_stop(self, reason: str = "requested") -> None:
        """Finish the current step, save a checkpoint and return from ``run``."""
        self._stop_reason = reason

    def _install_signal_handlers(self):
        previous = {}

        def handler(signum, frame):
            if self._stop_reason is not None:  # second signal: stop right away
                signal.signal(signum, previous.get(signum, signal.SIG_DFL))
                self.second_signal = signum
                raise KeyboardInterrupt
            self.request_stop(signal.Signals(signum).name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return previous

    def _should_stop(self) -> bool:
        flag = self._stop_reason is not None
        if self.world > 1:
            # Ranks may receive a signal at different steps; agreeing every step keeps their
            # collectives in lockstep. A CPU tensor on the gloo backend costs no device sync.
            t = torch.tensor([1.0 if flag else 0.0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._cpu_group())
            if t.item() > 0 and self._stop_reason is None:
                self._stop_reason = "peer"
            flag = t.item() > 0
        return flag

    def _cpu_group(self):
        if not hasattr(self, "_gloo"):
            self._gloo = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return self._gloo

    # -- one step ------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward, backward, clip, (masked) Adamax and EMA updates; returns device tensors."""
        cfg = self.config
        torch.manual_seed(step_seed(cfg.seed, self.rank, self.step))
        self.schedule.set_step(self.step)
        self.ddp.train()
        out = self.ddp(x)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        else:
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        finite = torch.isfinite(out.loss.detach()).float()
        if self.world > 1:  # the loss is local; the decision must be global
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        ok = (finite > 0) & torch.isfinite(gnorm)
        applied = self.guard(gnorm, finite)
        self.optimizer.step(applied)
        self.model.constrain_()
        self.ema.update(self.model, self.step, applied)
        bpd = -out.elbo.detach().mean() * self.model.bits_per_nat
        zero = torch.zeros((), device=x.device)
        return {"loss": torch.where(ok, out.loss.detach(), zero), "bpd": torch.where(ok, bpd, zero),
                "grad_norm": torch.where(ok, gnorm, zero), "ok": ok.float(),
                "nonfinite": (~ok).float(), "skipped_grad": (ok & ~applied).float()}

    # -- evaluation ----------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation split: loss (bits/dim, with beta), nelbo (nats) and bpd of the EMA model,
        which picks the best checkpoint, and ``val_nelbo_raw`` of the trained weights."""
        from tqdm import tqdm

        # Two passes over the split, each compiling its model's evaluation pass on first use.
        with tqdm(total=2 * len(self.val_iter), desc="validating", unit="batch", leave=False,
                  disable=not self.is_main, dynamic_ncols=True) as bar:
            bar.set_postfix_str("EMA weights")
            loss_nats, nelbo, n = self._val_sums(self.ema.module, bar.update)
            bar.set_postfix_str("trained weights")
            _, nelbo_raw, _ = self._val_sums(self.model, bar.update)
        bpn = self.model.bits_per_nat
        return {"val_loss": loss_nats / n * bpn, "val_nelbo": nelbo / n, "val_bpd": nelbo / n * bpn,
                "val_nelbo_raw": nelbo_raw / n}

    def _val_sums(self, model: torch.nn.Module, progress=None) -> list[float]:
        """[sum of beta-weighted losses, sum of -ELBO, image count] over the validation split;
        ``progress(1)`` after each batch."""
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        # The same fixed draws for every pass and model, so all values are comparable.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(step_seed(self.config.seed, self.rank, VAL_STREAM))
            for x in self.val_iter.iterate():
                out = model(x)
                per_ex = out.rec + self.config.beta * out.kl.sum(-1)
                sums += torch.stack([per_ex.sum().double(), -out.elbo.sum().double(),
                                     torch.tensor(float(x.shape[0]), dtype=torch.float64, device=self.device)])
                if progress is not None:
                    progress(1)
        model.train(was_training)
        if self.world > 1:
            dist.all_reduce(sums)
        return sums.tolist()

    def save_samples(self) -> str:
        path = os.path.join(self.out, "samples", f"step-{self.step:08d}.png")
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config.seed)
            x = self.ema.module.sample(self.args.num_samples)
        return plotting.save_image_grid(x, path)

    # -- bookkeeping ---------------------------------------------------------------------

    def log(self, row: dict) -> None:
        if not self.is_main:
            return
        row = {"kind": row.pop("kind"), "step": self.step, "epoch": self.epoch, **row,
               "time": time.time()}
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            self._write_failed(f"appending to {self.metrics_path}", e)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{row['kind']}/{k}", v, self.step)

    def _write_failed(self, what: str, e: OSError) -> None:
        print(f"error: {what} failed ({e}); training continues", file=sys.stderr)

    def save_checkpoint(self, val_loss: float | None = None) -> bool:
        """Write a checkpoint (rank 0); False when the write failed.

        A failed write (full disk, unwritable folder) leaves the checkpoints on disk as
        they were and is reported; training goes on and the next save tries again.
        """
        if not self.is_main:
            return True
        counters = dict(self.counters)
        if getattr(self, "_acc", None) is not None:  # skips not yet flushed to the metrics log
            counters["skipped_nonfinite"] += int(round(self._acc["nonfinite"].item()))
            counters["skipped_grad_norm"] += int(round(self._acc["skipped_grad"].item()))
        state = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "counters": counters, "best_val": self.best_val,
                 "scheduler": self.schedule.state_dict(), "world_size": self.world,
                 "data": {"name": self.data_name, "seed": self.config.seed,
                          "steps_per_epoch": self.steps_per_epoch},
                 "preset": self.preset, "skip_guard": self.guard.state_dict()}
        try:
            self.ckpts.save(self.step, self.model, self.config, ema=self.ema.module,
                            optimizer=self.optimizer, state=state, val_loss=val_loss)
            self._last_save_ok = True
        except OSError as e:
            self._write_failed(f"writing checkpoint step {self.step} (the newest on disk: "
                               f"{self.ckpts.latest()})", e)
            self._last_save_ok = False
        return self._last_save_ok

    def _barrier(self):
        if self.world > 1:
            dist.barrier()

    def evaluate_and_save(self) -> bool:
        val = self.validate()
        self.best_val = min(self.best_val, val["val_loss"])
        self.log({"kind": "val", **val})
        if self.is_main:
            try:
                self.save_samples()
                plotting.save_curves(self.metrics_path, os.path.join(self.out, "curves.png"))
            except OSError as e:
                self._write_failed("writing samples and curves", e)
        saved = self.save_checkpoint(val["val_loss"])
        self._barrier()
        return saved

    # -- loop ----------------------------------------------------------------------------

    def run(self) -> str | None:
        """Train until ``total_steps`` or a stop request; returns the stop reason (None = done)."""
        from tqdm import tqdm

        previous = self._install_signal_handlers()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.is_main,
                   desc=f"{self.preset}/{self.data_name}", dynamic_ncols=True)
        self._acc, acc_steps, t0, last_eval = None, 0, time.time(), -1
        compiling = bool(getattr(self.model, "use_compile", False))
        if compiling:  # the first step's silent minutes deserve a word
            bar.set_postfix_str("compiling the training step (minutes with a cold cache, then cached on disk)")
        try:
            while self.step < self.total_steps and not self._should_stop():
                for x in self.train_iter.iterate(self.epoch, self.batch_in_epoch):
                    m = self.train_step(x)
                    self.step += 1
                    self.batch_in_epoch += 1
                    acc = self._acc = m if self._acc is None else {k: self._acc[k] + m[k] for k in m}
                    acc_steps += 1
                    bar.update(1)
                    if compiling:
                        bar.set_postfix_str("")
                        compiling = False
                    if self.step % self.args.log_every == 0 or self.step == self.total_steps:
                        self._flush_metrics(acc, acc_steps, time.time() - t0, bar)
                        self._acc, acc_steps, t0 = None, 0, time.time()
                    if self.step % self.eval_every == 0:
                        self.evaluate_and_save()
                        last_eval = self.step
                    elif self.args.save_every and self.step % self.args.save_every == 0:
                        self.save_checkpoint()
                    if self.step_hook is not None:
                        self.step_hook(self)
                    if self.step >= self.total_steps or self._should_stop():
                        break
                else:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    continue
                break
            if self._acc is not None:
                self._flush_metrics(self._acc, acc_steps, time.time() - t0, bar)
                self._acc = None
            if self._stop_reason == STOP_SKIPS:
                if self.is_main:
                    print(f"\nstopping at step {self.step} without a checkpoint: {self._skip_streak} "
                          "consecutive steps were skipped (non-finite loss or gradient, or a gradient "
                          f"norm above the skip limits; --max-consecutive-skips "
                          f"{self.config.max_consecutive_skips}). Skipped steps change no weights; "
                          f"--resume continues from the newest checkpoint ({self.ckpts.latest()}), "
                          "--resume RUN/checkpoints/step-N from an older one. Lower --lr, change "
                          "--grad-clip, --grad-skip-thr or --grad-skip-factor, or check the data.",
                          file=sys.stderr)
                return STOP_SKIPS
            if self._stop_reason is not None:
                if self.is_main:
                    print(f"\nstopping ({self._stop_reason}) at step {self.step}: saving a checkpoint",
                          file=sys.stderr)
                saved = self.save_checkpoint()
                self._barrier()
                return self._stop_reason if saved else STOP_WRITE
            saved = self.evaluate_and_save() if last_eval != self.step else self._last_save_ok
            if self.is_main:
                try:
                    self.ema.module.save_pretrained(os.path.join(self.out, "final"))
                except OSError as e:
                    self._write_failed("exporting the final weights", e)
                    saved = False
            return None if saved else STOP_WRITE
        finally:
            bar.close()
            if self.tb is not None:
                self.tb.close()
            for sig, h in previous.items():
                signal.signal(sig, h)

    def _flush_metrics(self, acc: dict, n: int, seconds: float, bar) -> None:
        vals = {k: v.item() for k, v in acc.items()}  # the one host sync per logging interval
        self.counters["skipped_nonfinite"] += int(round(vals["nonfinite"]))
        self.counters["skipped_grad_norm"] += int(round(vals["skipped_grad"]))
        streak, limit = self.guard.take_max_streak(), self.config.max_consecutive_skips
        if limit and streak >= limit and self._stop_reason is None:
            self._stop_reason = STOP_SKIPS
            self._skip_streak = streak
        good = max(vals["ok"], 1.0)
        row = {"kind": "train", "loss": vals["loss"] / good, "bpd": vals["bpd"] / good,
               "grad_norm": vals["grad_norm"] / good, "lr": self.optimizer.param_groups[0]["lr"],
               "it_s": n / max(seconds, 1e-9), **self.counters}
        self.log(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", bpd=f"{row['bpd']:.4f}",
                        skipped=self.counters["skipped_nonfinite"] + self.counters["skipped_grad_norm"])


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dvpvae.train`` and ``dvpvae-train``.

    Exit status: 0 done (or ``request_stop``), 128 + signal number after SIGINT/SIGTERM,
    1 when the run stopped on skipped steps or its last checkpoint could not be written,
    1 with a one-line message for bad input (arguments, data, checkpoints).
    """
    args = build_parser().parse_args(argv)
    check_args(args)
    try:
        trainer = Trainer(args)
    except (CheckpointError, DataError, ValueError) as e:
        raise SystemExit(f"dvpvae-train: error: {e}") from None
    except KeyError as e:  # unknown config keys
        raise SystemExit(f"dvpvae-train: error: {e.args[0]}") from None
    try:
        reason = trainer.run()
    except KeyboardInterrupt:
        print("dvpvae-train: stopped by a second signal without saving; --resume continues from "
              "the newest checkpoint on disk", file=sys.stderr)
        return 128 + (trainer.second_signal or signal.SIGINT)
    if reason in ("SIGINT", "SIGTERM"):
        return 128 + int(getattr(signal, reason))
    return 1 if reason in (STOP_SKIPS, STOP_WRITE) else 0


if __name__ == "__main__":
    sys.exit(main())
