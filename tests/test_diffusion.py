"""Diffusion maths: schedule, targets, loss, DDIM, EMA and diffusion features (tiny, CPU)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from orthonet.diffusion import EMA, NoiseSchedule, ddim_sample, ddim_timesteps, diffusion_loss, extract_features
from orthonet.networks import DiffusionUNet, build_encoder, make_test_spec

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ schedule
def test_cosine_schedule_properties():
    s = NoiseSchedule(1000, "cosine")
    ab = s.alphas_cumprod
    assert ab.shape == (1000,)
    assert bool((ab[1:] < ab[:-1]).all()), "alpha_bar must decrease strictly"
    assert ab[0] > 0.9999 and ab[-1] < 1e-4
    assert float(s.betas.max()) <= 0.999 + 1e-12 and float(s.betas.min()) > 0
    # cosine: ab(T/2) ~ cos^2(pi/4 * (0.5 + s)/(1 + s) * 2) ~ 0.49
    assert abs(float(ab[499]) - 0.5) < 0.02
    lin = NoiseSchedule(1000, "linear").alphas_cumprod
    assert bool((lin[1:] < lin[:-1]).all()) and lin[-1] < 1e-4
    # the cosine schedule keeps more signal in the middle of the chain than the linear one
    assert ab[300] > lin[300] + 0.2


def test_q_sample_statistics():
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((4, 1, 32, 32, 32), 2.0)
    noise = torch.randn(x0.shape, generator=g)
    for t in (10, 500, 990):
        xt = s.q_sample(x0, torch.full((4,), t), noise)
        ab = float(s.alphas_cumprod[t])
        assert abs(float(xt.mean()) - 2 * math.sqrt(ab)) < 0.01
        assert abs(float(xt.std()) - math.sqrt(1 - ab)) < 0.01 * max(1.0, math.sqrt(1 - ab))
    # per-sample timesteps broadcast per sample
    xt = s.q_sample(x0, torch.tensor([0, 999, 0, 999]), noise)
    assert float(xt[0].mean()) > 1.9 and abs(float(xt[1].mean())) < 0.05


@pytest.mark.parametrize("ptype", ["epsilon", "v"])
def test_prediction_conversions_invert(ptype):
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 2, 5, 7, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    xt = s.q_sample(x0, t, eps)
    target = s.target(x0, eps, t, ptype)
    rec_x0 = s.predict_x0_from(xt, t, target, ptype)
    rec_eps = s.predict_eps_from(xt, t, target, ptype)
    # x0 from eps divides by sqrt(ab_t) (~0.0016 at t=999): compare where it is well conditioned
    assert torch.allclose(rec_eps, eps, atol=1e-4)
    assert torch.allclose(rec_x0[:5], x0[:5], atol=1e-3)
    if ptype == "v":
        assert torch.allclose(rec_x0, x0, atol=1e-5)   # v-prediction recovers x0 well at every t
    assert torch.allclose(s.eps_from_x0(xt, t, x0), eps, atol=1e-3)
    with pytest.raises(ValueError):
        s.target(x0, eps, t, "x0")


def test_diffusion_loss_oracle_and_determinism():
    s = NoiseSchedule()
    x0 = torch.randn(3, 1, 6, 6, 6, generator=torch.Generator().manual_seed(2))
    captured = {}

    def oracle(xt, t):     # knows x0, so it can return the true noise
        return s.eps_from_x0(xt, t, x0)

    def zero(xt, t):
        captured["t"] = t
        return torch.zeros_like(xt)

    assert float(diffusion_loss(oracle, s, x0, generator=torch.Generator().manual_seed(0))) < 1e-6
    l1 = diffusion_loss(zero, s, x0, generator=torch.Generator().manual_seed(0))
    t1 = captured["t"].clone()
    l2 = diffusion_loss(zero, s, x0, generator=torch.Generator().manual_seed(0))
    assert float(l1) == float(l2) and torch.equal(t1, captured["t"])
    assert 0.8 < float(l1) < 1.2          # predicting 0 for N(0,1) noise costs ~1


# ------------------------------------------------------------------------------------------------ DDIM
def test_ddim_timesteps():
    ts = ddim_timesteps(1000, 50)
    assert len(ts) == 50 and int(ts[0]) == 999 and int(ts[-1]) == 0
    assert bool((ts[1:] < ts[:-1]).all())


@pytest.mark.parametrize("ptype", ["epsilon", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_recovers_a_point_mass(ptype, eta):
    """If all data equal x*, the Bayes-optimal denoiser is known in closed form and DDIM must return x*."""
    s = NoiseSchedule()
    x_star = torch.linspace(-1, 1, 4 * 4 * 4).reshape(1, 1, 4, 4, 4)

    def oracle(xt, t):
        eps = s.eps_from_x0(xt, t, x_star.expand_as(xt))
        return eps if ptype == "epsilon" else s.velocity(x_star.expand_as(xt), eps, t)

    out = ddim_sample(oracle, (2, 1, 4, 4, 4), steps=20, eta=eta, generator=0, prediction_type=ptype, schedule=s,
                      progress=False)
    assert out.shape == (2, 1, 4, 4, 4)
    assert float((out - x_star).abs().max()) < 1e-3


def test_ddim_deterministic_with_seed():
    spec = make_test_spec(n_stages=2, features=(4, 8))
    model = DiffusionUNet(spec, 1)
    a = ddim_sample(model, (1, 1, 8, 8, 8), steps=4, generator=7, progress=False)
    b = ddim_sample(model, (1, 1, 8, 8, 8), steps=4, generator=7, progress=False)
    c = ddim_sample(model, (1, 1, 8, 8, 8), steps=4, generator=8, progress=False)
    assert a.shape == (1, 1, 8, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert model.training  # mode restored


# ------------------------------------------------------------------------------------------------ EMA
def test_ema_math_and_state_dict(tmp_path):
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9, warmup=False)
    for value in (1.0, 2.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
    expected = 0.9 * (0.9 * 0.0 + 0.1 * 1.0) + 0.1 * 2.0
    assert abs(float(ema.shadow["weight"]) - expected) < 1e-7
    # warm-up: first decay is min(0.9, 1/10) = 0.1
    warm = EMA(model, decay=0.9)
    assert abs(warm.current_decay() - 0.1) < 1e-12
    path = tmp_path / "ema.pt"
    torch.save(ema.state_dict(), path)
    restored = EMA(model, decay=0.5, warmup=True)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.decay == 0.9 and restored.num_updates == 2
    target = torch.nn.Linear(1, 1, bias=False)
    restored.copy_to(target)
    assert abs(float(target.weight.detach()) - expected) < 1e-7
    with ema.swapped_into(model):
        assert abs(float(model.weight.detach()) - expected) < 1e-7
    assert float(model.weight.detach()) == 2.0


def test_ema_on_denoiser_dedups_aliases():
    model = DiffusionUNet(make_test_spec(n_stages=2, features=(4, 8)), 1)
    ema = EMA(model, decay=0.5, warmup=False)
    n_unique = len({v.data_ptr() for v in model.state_dict().values()})
    assert len(ema.shadow) == n_unique < len(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    other = copy.deepcopy(model)
    ema.copy_to(other)
    sd_m, sd_o = model.state_dict(), other.state_dict()
    key = "encoder.stages.0.0.convs.0.conv.weight"
    assert torch.allclose(sd_o[key], sd_m[key] - 0.5, atol=1e-6)
    # the alias keys of the same tensor hold the same value
    assert torch.equal(sd_o[key], sd_o["decoder." + key])


# ------------------------------------------------------------------------------------------------ features
def _denoiser():
    torch.manual_seed(0)
    model = DiffusionUNet(make_test_spec(n_stages=3, features=(4, 8, 16)), 1)
    with torch.no_grad():
        for p in model.time_proj.parameters():
            p.normal_(0, 0.1)
    return model


def test_extract_features_shapes_determinism_and_multi_t():
    model = _denoiser()
    x = torch.randn(2, 1, 8, 16, 16, generator=torch.Generator().manual_seed(3))
    f1 = extract_features(model, x, t=100, seed=0)
    f2 = extract_features(model, x, t=100, seed=0)
    f3 = extract_features(model, x, t=100, seed=1)
    assert [tuple(f.shape) for f in f1] == [(2, 4, 8, 16, 16), (2, 8, 4, 8, 8), (2, 16, 2, 4, 4)]
    assert all(torch.equal(a, b) for a, b in zip(f1, f2))
    assert not torch.allclose(f1[-1], f3[-1])
    multi = extract_features(model, x, t=[100, 250], levels=[-1], seed=0)
    assert len(multi) == 1 and multi[0].shape == (2, 32, 2, 4, 4)
    assert torch.equal(multi[0][:, :16], f1[-1])
    assert not torch.allclose(multi[0][:, 16:], f1[-1])
    with_dec = extract_features(model, x, t=100, levels=[-1], include_decoder=True)
    assert [tuple(f.shape) for f in with_dec] == [(2, 16, 2, 4, 4), (2, 8, 4, 8, 8), (2, 4, 8, 16, 16)]
    single = extract_features(model, x[0], t=100, levels=[0])          # unbatched input
    assert single[0].shape == (4, 8, 16, 16)
    assert model.training


def test_extract_features_encoder_only_clean_and_noised():
    spec = make_test_spec(n_stages=3, features=(4, 8, 16))
    encoder = build_encoder(spec, 1)
    encoder.eval()
    x = torch.randn(1, 1, 8, 16, 16)
    clean = extract_features(encoder, x, t=None, levels=[0, 1, 2])
    with torch.no_grad():
        ref = encoder(x)
    assert all(torch.equal(a, b) for a, b in zip(clean, ref))
    noised = extract_features(encoder, x, t=900, levels=[0])
    assert not torch.allclose(noised[0], clean[0])


def test_extract_decoder_features_of_any_volume_size():
    """Whole volumes are rarely divisible by the encoder's total stride: decoder features still come out, each
    level covering the original volume (ceil(size / stride))."""
    from orthonet.diffusion import extract_features
    from orthonet.networks import DiffusionUNet, make_test_spec
    torch.manual_seed(0)
    model = DiffusionUNet(make_test_spec(dim=3, n_stages=3, features=(8, 16, 32)), 1)
    x = torch.randn(1, 21, 43, 41)
    feats = extract_features(model, x, t=50, levels=[-1], include_decoder=True)
    assert [tuple(f.shape[1:]) for f in feats] == [(6, 11, 11), (11, 22, 21), (21, 43, 41)]
    enc_only = extract_features(model, x, t=50, levels=[-1])
    assert torch.allclose(enc_only[0], extract_features(model, x, t=50, levels=[-1])[0])
