"""Command-line options and checks shared by ``dvpvae.train`` and ``dvpvae.evaluate``."""
from __future__ import annotations

import argparse
import os

from dvpvae.config import PRECISIONS


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model and --precision, as train and evaluate take them."""
    p.add_argument("--model", choices=("reference", "fast"), default="reference")
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="compute precision of --model fast (bf16: bfloat16 convolutions and matmuls, "
                        "float32 weights and densities; fast only where the CPU/GPU has bfloat16 units)")


def check_common_args(args: argparse.Namespace, prog: str, positive: tuple[str, ...]):
    """The checks train and evaluate share (the ``positive`` integer options, --precision,
    --val-fraction, --data-root); returns their ``fail(msg)``, a one-line SystemExit."""
    def fail(msg):
        raise SystemExit(f"{prog}: error: {msg}")

    for name in positive:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            fail(f"--{name.replace('_', '-')} must be positive, got {v}")
    if args.precision != "float32" and args.model != "fast":
        fail(f"--precision {args.precision} needs --model fast (the reference computes in float32)")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        fail(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.data_root is not None and not os.path.exists(args.data_root):
        fail(f"--data-root {args.data_root} does not exist")
    return fail
