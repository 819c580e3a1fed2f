"""Distributed data parallel on 2 CPU processes (gloo): gradient equivalence and replica sync."""
import json
import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import datafiles
import dvpvae

WORLD = 2
PER_RANK = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model() -> dvpvae.DVPVAE:
    torch.manual_seed(0)
    m = dvpvae.DVPVAE.from_preset("tiny")
    dvpvae.set_dct_scale(m, torch.linspace(-1, 1, 8 * 784).reshape(8, 1, 28, 28))
    return m


def _worker(rank, port, tmp, npz):
    from safetensors.torch import load_file, save_file

    from dvpvae import train as T

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        # 1. gradients of this rank's half of the batch with the recorded draws, all-reduced
        inputs = load_file(os.path.join(tmp, "inputs.safetensors"))
        sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        noise = {k[len("noise."):]: v[sl] for k, v in inputs.items() if k.startswith("noise.")}
        model = _tiny_model()
        ddp = T.wrap_ddp(model, torch.device("cpu"))
        ddp(inputs["x"][sl], noise=noise).loss.backward()
        save_file({n: p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None},
                  os.path.join(tmp, f"grads{rank}.safetensors"))

        # 2. a few steps of the real training loop
        args = T.build_parser().parse_args([
            "--preset", "tiny", "--data", "npz", "--data-root", npz, "--out", os.path.join(tmp, "run"),
            "--max-steps", "3", "--log-every", "1", "--eval-every", "2", "--num-samples", "4",
            "--device", "cpu"])
        trainer = T.Trainer(args)
        assert trainer.world == WORLD and trainer.rank == rank
        trainer.run()
        save_file({**{"model." + k: v.contiguous() for k, v in trainer.model.state_dict().items()},
                   **{"ema." + k: v.contiguous() for k, v in trainer.ema.module.state_dict().items()}},
                  os.path.join(tmp, f"final{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_cpu_processes(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    # single process on the concatenated batch, recording every random draw
    x = (torch.from_numpy(datafiles.images(WORLD * PER_RANK, seed=5)).float() / 127.5 - 1)
    model = _tiny_model()
    noise = dvpvae.Noise(record=True)
    model(x, noise=noise).loss.backward()
    assert {"u", "diffusion_t", "binarize", "z0"} <= set(noise.recorded)
    assert all(v.shape[0] == WORLD * PER_RANK for v in noise.recorded.values())
    save_file({"x": x, **{"noise." + k: v.contiguous() for k, v in noise.recorded.items()}},
              str(tmp_path / "inputs.safetensors"))
    npz = str(tmp_path / "d.npz")
    np.savez(npz, x=((datafiles.images(80, seed=7) > 160) * 255).astype(np.uint8)[:, 0])

    mp.spawn(_worker, args=(_free_port(), str(tmp_path), npz), nprocs=WORLD, join=True)

    # averaged DDP gradients == single-process gradients of the concatenated batch
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for r in range(WORLD):
        g = load_file(str(tmp_path / f"grads{r}.safetensors"))
        assert set(g) == set(single)
        for n in single:
            torch.testing.assert_close(g[n], single[n], rtol=1e-4, atol=1e-7, msg=n)

    # replicas hold identical weights and EMA after training, and training moved them
    f0, f1 = (load_file(str(tmp_path / f"final{r}.safetensors")) for r in range(WORLD))
    assert set(f0) == set(f1)
    for k in f0:
        assert torch.equal(f0[k], f1[k]), k
    init = _tiny_model().state_dict()
    assert any(not torch.equal(f0["model." + k], v) for k, v in init.items())

    # only rank 0 wrote: one metrics row per step, one set of checkpoints
    run = tmp_path / "run"
    with open(run / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in rows if r["kind"] == "val"] == [2, 3]
    assert json.load(open(run / "run.json"))["world_size"] == WORLD
    ckpts = sorted(os.listdir(run / "checkpoints"))
    assert ckpts == ["best.json", "step-00000002", "step-00000003"]
    from dvpvae.checkpoint import load_tensors
    ema_saved, _ = load_tensors(str(run / "checkpoints" / "step-00000003" / "ema.safetensors"))
    assert all(torch.equal(ema_saved[k], f0["ema." + k]) for k in ema_saved)
