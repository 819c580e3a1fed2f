"""Helpers that turn the golden fixtures' recorded draws into our named noise."""
import os

import torch

import dvpvae

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def load_golden(name):
    return torch.load(os.path.join(GOLDEN_DIR, f"{name}.pt"), weights_only=True)


def golden_model(g):
    model = dvpvae.from_official(g["state_dict"], g["config"])
    return model


def forward_noise(g, prefix, model):
    """Map the research code's forward draw list (train_/test_) to our draw names."""
    draws = [d["tensor"] for d in g[f"{prefix}_draws"]]
    T = model.config.diffusion_steps
    n_lat = model.config.num_ladder_latents
    names = {"u": draws[0], "diffusion_eps0": draws[1], "diffusion_t": draws[2].reshape(-1)}
    rest = draws[4:]
    if prefix == "train":
        names["diffusion_eps"] = draws[3]
    else:
        names["diffusion_eps"] = torch.stack(rest[:T])
        rest = rest[T:]
    for l in range(n_lat):
        names[f"z{l}"] = rest[l]
    rest = rest[n_lat:]
    if model.config.likelihood == "bernoulli":
        # recorded Bernoulli outcome b -> a uniform that reproduces it under u < p
        names["binarize"] = 1.0 - rest[0]
    return names


def sample_noise(g, model, n=4):
    """Map the recorded generate_x draws to our sampling draw names."""
    draws = [d["tensor"] for d in g["sample_draws"]]
    T = model.config.diffusion_steps
    names = {"prior_zT": draws[0], "prior_eps": torch.stack(draws[1:T + 1])}
    rest = draws[T + 1:]
    for l in range(model.config.num_ladder_latents):
        names[f"z{l}"] = rest[l]
    rest = rest[model.config.num_ladder_latents:]
    if model.config.likelihood == "logistic_mixture":
        names["mix_component"], names["mix_logistic"] = rest[0], rest[1]
    return names
