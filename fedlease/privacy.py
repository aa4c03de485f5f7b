"""Client-level differential privacy on uploads (DP-FedAvg style), with Opacus' RDP accountant.

Each client clips its update (upload - what it started the round from) to L2 norm C over
all uploaded tensors and adds N(0, (sigma C)^2) noise before upload. One round is one
Gaussian-mechanism step on each client's data with sampling rate q = sampled / N; epsilon
after R rounds comes from the RDP accountant at the configured delta. With target_epsilon,
sigma is solved for the method's number of rounds (extra equal-compute rounds included).
"""

from __future__ import annotations

import math

import torch

from fedlease.config import Config

Tensors = dict[str, torch.Tensor]


def clip_and_noise(update: Tensors, clip_norm: float, noise_multiplier: float, seed: int) -> tuple[Tensors, float]:
    """Pure: the clipped, noised update and the update's norm before clipping."""
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))
    scale = min(1.0, clip_norm / max(norm, 1e-12))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(update):
        v = update[key]
        noise = torch.randn(v.shape, generator=gen, dtype=torch.float64) * noise_multiplier * clip_norm
        out[key] = (v.double() * scale + noise).to(v.dtype)
    return out, norm


def sample_rate(cfg: Config) -> float:
    return min(1.0, cfg.sampled_per_round() / cfg.num_clients)


def noise_multiplier(cfg: Config, rounds: int) -> float:
    """sigma: the configured one, or solved so that `rounds` rounds spend exactly target_epsilon."""
    p = cfg.privacy
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier

    assert p.target_epsilon is not None
    return float(get_noise_multiplier(target_epsilon=p.target_epsilon, target_delta=p.delta,
                                      sample_rate=sample_rate(cfg), steps=rounds, accountant="rdp"))


def epsilon_after(cfg: Config, done: int, rounds: int) -> float:
    """Epsilon spent after `done` of the method's `rounds` rounds."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    sigma, q = noise_multiplier(cfg, rounds), sample_rate(cfg)
    for _ in range(done):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(cfg.privacy.delta))
