"""PNG output for runs: image grids and training curves (matplotlib, Agg backend)."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into a uint8 (rows*H, cols*W, 3) array."""
    x = images.detach().float().cpu().clamp(-1, 1)
    n, c, h, w = x.shape
    if c == 1:
        x = x.expand(n, 3, h, w)
    elif c != 3:
        raise ValueError(f"image_grid supports 1 or 3 channels, got {c}")
    cols = nrow or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = torch.ones(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, top:top + h, left:left + w] = x[i]
    return ((grid.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)


def save_image_grid(images: torch.Tensor, path: str, nrow: int | None = None) -> str:
    """Save images in [-1, 1] as one PNG grid; returns ``path``."""
    plt = _pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    plt.imsave(path, image_grid(images, nrow))
    return path


def save_labelled_grid(columns: list[tuple[str, torch.Tensor]], path: str, pad: int = 2) -> str:
    """Save a grid with one row per image and one labelled column per (label, (N, C, H, W)
    images in [-1, 1]) entry of ``columns``; returns ``path``."""
    labels = [label for label, _ in columns]
    grid = image_grid(torch.stack([images for _, images in columns], 1).flatten(0, 1), len(columns), pad)
    w = columns[0][1].shape[-1]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 30, grid.shape[0] / 30 + 0.3))
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([pad + c * (w + pad) + (w - 1) / 2 for c in range(len(labels))], labels, fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics JSONL file (a truncated last line is ignored)."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def save_curves(metrics_path: str, path: str) -> str | None:
    """Plot train and validation loss (bits/dim) and the learning rate against the step."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "val"]
    lr = [(r["step"], r["lr"]) for r in rows if r.get("kind") == "train" and "lr" in r]
    if not train and not val:
        return None
    plt = _pyplot()
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    for pts, label in ((train, "train"), (val, "val (EMA)")):
        if pts:
            ax.plot(*zip(*pts), label=label, marker="o" if len(pts) < 20 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss [bits/dim]")
    ax.legend()
    ax.grid(alpha=0.3)
    if lr:
        ax_lr.plot(*zip(*lr))
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
