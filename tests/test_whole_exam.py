"""Whole-exam diagnosis: padding, masks, tiling, edge lesions, missing views, memory, fusion variants, and the
model description of old checkpoints (tiny specs, CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from orthonet.errors import OrthoError
from orthonet.networks import MultiTaskModel, MultiViewDiagnosisModel, make_test_spec
from orthonet.networks.fusion import ViewGatingFusion
from orthonet.networks.mil import GatedAttentionMIL
from orthonet.networks.whole_exam import (coarsen_kernel, coarsen_level, diffusion_noise, feature_masks, pad_to_stride,
                                          total_stride)
from orthonet.training.model_factory import ModelConfig

torch.set_num_threads(1)

SPEC = make_test_spec(dim=3, n_stages=3, features=(4, 8, 16), anisotropic=True)     # total stride (2, 4, 4)
SPECS = {"sagittal": SPEC, "coronal": make_test_spec(n_stages=3, features=(4, 8, 8)), "axial": SPEC}
CHANNELS = {"sagittal": 1, "coronal": 1, "axial": 1}


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("whole_exam", True)
    kw.setdefault("pooling", ["mil"])
    return MultiViewDiagnosisModel(SPECS, CHANNELS, n_diagnoses=3, **kw).eval()


def _vol(shape, seed):
    return torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(seed))


def test_batch_padding_does_not_change_an_exams_logits():
    """Exams of different sizes in one batch: each is encoded on its own extent (instance norm never sees the
    padding) and pooled under its mask, so its logits equal those of the exam alone."""
    model = _model()
    small = {"sagittal": _vol((9, 30, 27), 1), "coronal": _vol((12, 20, 22), 2)}
    big = {"sagittal": _vol((16, 40, 40), 3), "coronal": _vol((14, 24, 24), 4)}
    with torch.no_grad():
        alone_small = model(small)["logits"]
        alone_big = model(big)["logits"]
        batch = {v: torch.cat([pad_to_stride(small[v], [1, 1, 1], big[v].shape[2:]), big[v]]) for v in small}
        shapes = {v: torch.tensor([list(small[v].shape[2:]), list(big[v].shape[2:])]) for v in small}
        both = model(batch, None, shapes)["logits"]
    assert torch.allclose(both[0], alone_small[0], atol=1e-5)
    assert torch.allclose(both[1], alone_big[0], atol=1e-5)
    # without the sizes the padding would count as image: the answer for the small exam changes
    with torch.no_grad():
        naive = model(batch)["logits"]
    assert not torch.allclose(naive[0], alone_small[0], atol=1e-4)


def test_feature_masks_cover_exactly_the_real_voxels():
    shapes = torch.tensor([[5, 8, 8], [8, 16, 16]])
    m = feature_masks(shapes, [[1, 1, 1], [2, 4, 4]], [[8, 16, 16], [4, 4, 4]])
    assert m[0].shape == (2, 8, 16, 16) and int(m[0][0].sum()) == 5 * 8 * 8 and bool(m[0][1].all())
    assert int(m[1][0].sum()) == 3 * 2 * 2 and bool(m[1][1].all())
    assert total_stride(SPEC) == [2, 4, 4]


def test_coarsening_max_pools_real_positions_only_onto_the_next_levels_grid():
    f = torch.zeros(1, 1, 2, 4, 4)
    f[0, 0, 0, 0, 1] = 3.0                                 # a fine response inside the real extent
    f[0, 0, 1, 3, 3] = 9.0                                 # a response on padding: must not win
    mask = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2:, 2:] = False
    pooled, valid = coarsen_level(f, mask, [2, 2, 2])
    assert pooled.shape == (1, 1, 1, 2, 2) and valid.shape == (1, 1, 2, 2) and bool(valid.all())
    assert float(pooled[0, 0, 0, 0, 0]) == 3.0 and float(pooled[0, 0, 0, 1, 1]) == 0.0
    none_valid = torch.zeros_like(mask)
    p0, v0 = coarsen_level(f, none_valid, [2, 2, 2])
    assert not bool(v0.any()) and float(p0.abs().sum()) == 0.0
    assert coarsen_kernel(SPEC, 0) == [1, 2, 2] and coarsen_kernel(SPEC, 1) == [2, 2, 2]
    with pytest.raises(ValueError, match="coarser"):
        coarsen_kernel(SPEC, 2)
    with pytest.raises(ValueError, match="multiple"):
        coarsen_level(torch.zeros(1, 1, 3, 4, 4), torch.ones(1, 3, 4, 4, dtype=torch.bool), [2, 2, 2])


def test_a_coarsened_level_sits_on_the_next_levels_grid_and_still_sees_an_edge_lesion():
    """``coarsen_levels=[-3]``: level -3's map comes out on level -2's grid (masks too), the head's channels are
    unchanged, a small focus at the volume edge still moves the logits, and a level that is not selected (or the
    deepest) is refused."""
    plain, coarse = _model(seed=3, levels=[-3, -2, -1]), _model(seed=3, levels=[-3, -2, -1], coarsen_levels=[-3])
    coarse.load_state_dict(plain.state_dict())             # same parameters: only the grid differs
    base = _vol((12, 96, 96), 11)
    lesion = base.clone()
    lesion[..., 1:3, 2:5, 90:93] += 4.0
    with torch.no_grad():
        fp, _ = plain.whole_features({"sagittal": base})
        fc, mc = coarse.whole_features({"sagittal": base})
        d = (coarse({"sagittal": lesion})["logits"] - coarse({"sagittal": base})["logits"]).abs().max()
    assert fc["sagittal"][0].shape[2:] == fp["sagittal"][1].shape[2:] == mc["sagittal"][0].shape[1:]
    assert fc["sagittal"][0].shape[1] == fp["sagittal"][0].shape[1]
    assert torch.equal(fc["sagittal"][1], fp["sagittal"][1])
    assert float(d) > 1e-3
    with pytest.raises(OrthoError, match="coarsen_levels"):
        _model(levels=[-2, -1], coarsen_levels=[-3])
    with pytest.raises(OrthoError, match="coarsen_levels"):
        _model(levels=[-2, -1], coarsen_levels=[-1])


def test_whole_volume_and_tiled_features_agree():
    """Tiles start on the total stride, so every level's grid lines up; tiles see less context and their own
    instance-norm statistics, so the maps agree closely but not bit for bit. Measured here: correlation >= 0.999
    on the first pooled level and >= 0.97 on the bottleneck, logits within 0.05."""
    model = _model()
    vol = {"sagittal": _vol((16, 128, 128), 7)}
    with torch.no_grad():
        whole, _ = model.whole_features(vol)
        tiled, _ = model.whole_features(vol, tile=[16, 64, 64])
        lw = model(vol)["logits"]
        lt = model.diagnosis(tiled, None, None)["logits"]
    corrs = []
    for a, b in zip(whole["sagittal"], tiled["sagittal"]):
        assert a.shape == b.shape
        corrs.append(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]))
    assert corrs[0] > 0.999 and min(corrs) > 0.97, corrs
    assert float((lw - lt).abs().max()) < 0.05


def test_a_lesion_at_the_volume_edge_changes_whole_exam_logits_but_not_a_centre_crop():
    whole = _model(seed=3)
    crop = _model(seed=3, whole_exam=False)
    crop.load_state_dict(whole.state_dict())
    base = _vol((12, 96, 96), 11)
    lesion = base.clone()
    lesion[..., 1:5, 2:10, 84:94] += 4.0                                   # a bright focus in the corner
    centre = (slice(None), slice(None), slice(0, 12), slice(24, 72), slice(24, 72))  # what a 12x48x48 crop sees
    with torch.no_grad():
        dw = (whole({"sagittal": lesion})["logits"] - whole({"sagittal": base})["logits"]).abs().max()
        dc = (crop({"sagittal": lesion[centre]})["logits"] - crop({"sagittal": base[centre]})["logits"]).abs().max()
    assert float(dc) == 0.0
    assert float(dw) > 1e-3


def test_missing_views_are_masked_like_leaving_them_out():
    model = _model(fusion="attention")
    x = {"sagittal": torch.randn(2, 1, 8, 32, 32), "coronal": torch.randn(2, 1, 8, 24, 24),
         "axial": torch.randn(2, 1, 10, 32, 32)}
    with torch.no_grad():
        full = model(x)["logits"]
        no_cor = model({"sagittal": x["sagittal"], "axial": x["axial"]})["logits"]
        masked = model(x, present={"coronal": torch.tensor([False, True])})["logits"]
        only = model({"axial": x["axial"]})["logits"]
    assert torch.allclose(masked[0], no_cor[0], atol=1e-5) and torch.allclose(masked[1], full[1], atol=1e-5)
    assert torch.isfinite(only).all() and not torch.allclose(only, full)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = {"sagittal": torch.randn(1, 1, 8, 32, 32), "coronal": torch.randn(1, 1, 8, 16, 16)}
    grads = []
    for ckpt in (False, True):
        model = _model(seed=5).train()
        model.diagnosis.view_dropout = 0.0
        for mod in model.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        model.checkpoint_encoders = ckpt
        model(x)["logits"].sum().backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters()
                                if n.startswith("encoders.sagittal") and p.grad is not None]))
    assert grads[0].numel() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_auto_checkpointing_only_for_large_training_batches(monkeypatch):
    """``checkpoint_encoders='auto'`` recomputes stages only when the batch holds more than
    ``checkpoint_min_voxels`` voxels (memory), never in eval or without gradients; True/False force it."""
    import orthonet.networks.diagnosis as diag_mod
    calls = []
    real = diag_mod.run_encoder
    monkeypatch.setattr(diag_mod, "run_encoder", lambda enc, x, ckpt=False: calls.append(ckpt) or real(enc, x, ckpt))
    x = {"sagittal": torch.randn(2, 1, 8, 32, 32)}              # 16384 voxels in the batch
    model = _model(seed=5).train()
    model.checkpoint_encoders = "auto"
    model(x)
    model.checkpoint_min_voxels = 16383
    model(x)
    model.checkpoint_encoders = False
    model(x)
    model.checkpoint_encoders = True
    model.eval()
    model(x)
    with torch.no_grad():
        model.train()(x)
    assert calls == [False, True, False, False, False]


def test_mil_attention_is_a_distribution_over_real_positions_one_head_per_diagnosis():
    pool = GatedAttentionMIL(channels=8, heads=3)
    x = torch.randn(2, 8, 4, 6, 6)
    mask = torch.ones(2, 4, 6, 6, dtype=torch.bool)
    mask[0, 2:] = False
    w = pool.attention(x, mask).detach()
    assert w.shape == (2, 3, 4, 6, 6)
    assert torch.allclose(w.flatten(2).sum(-1), torch.ones(2, 3), atol=1e-5)
    assert float(w[0, :, 2:].abs().max()) == 0.0
    # padded positions never change the pooled vector, whatever they hold
    y = x.clone()
    y[0, :, 2:] = 100.0
    assert torch.allclose(pool(x, mask)[0], pool(y, mask)[0], atol=1e-5)


def test_saliency_from_attention_has_one_map_per_diagnosis_on_the_input_grid():
    model = _model()
    x = {"sagittal": _vol((9, 30, 27), 1), "axial": _vol((8, 20, 20), 2)}
    sal = model.diagnosis_attention(x)
    assert sal["sagittal"].shape == (1, 3, 9, 30, 27) and sal["axial"].shape == (1, 3, 8, 20, 20)
    assert torch.allclose(sal["sagittal"].flatten(2).amax(-1), torch.ones(1, 3))


def test_view_gating_fusion_ignores_missing_views():
    fusion = ViewGatingFusion({"a": 6, "b": 6}, n_diagnoses=2).eval()
    pooled = {"a": torch.randn(3, 6), "b": torch.randn(3, 6)}
    present = {"b": torch.tensor([True, False, True])}
    out = fusion(pooled, present)
    gates = fusion.last_gates                                            # (B, V, D)
    assert out.shape == (3, 2) and torch.allclose(gates.sum(1), torch.ones(3, 2))
    assert float(gates[1, 1].abs().max()) == 0.0
    alone = fusion({"a": pooled["a"]})
    assert torch.allclose(out[1], alone[1], atol=1e-5)
    model = _model(fusion="gating")
    assert model({"sagittal": _vol((8, 16, 16), 0)})["logits"].shape == (1, 3)


def test_diffusion_feature_noise_is_deterministic_and_leaves_padding_zero():
    x = torch.zeros(1, 1, 4, 8, 8)
    x[..., :3, :6, :6] = 1.0
    shapes = torch.tensor([[3, 6, 6]])
    a = diffusion_noise(x, 100, shapes, torch.Generator().manual_seed(0))
    b = diffusion_noise(x, 100, shapes, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert float(a[..., 3:, :, :].abs().max()) == 0.0 and float(a[..., :, 6:, :].abs().max()) == 0.0
    model = _model(feature_t={"sagittal": 100})
    v = {"sagittal": _vol((8, 16, 16), 0)}
    with torch.no_grad():
        one = model(v, generator=torch.Generator().manual_seed(1))["logits"]
        two = model(v, generator=torch.Generator().manual_seed(1))["logits"]
        clean = _model()(v)["logits"]
    assert torch.equal(one, two) and not torch.allclose(one, clean)
    with pytest.raises(ValueError, match="unknown view"):
        _model(feature_t={"oblique": 50})


def test_multitask_segments_patches_and_diagnoses_whole_exams():
    torch.manual_seed(0)
    model = MultiTaskModel(SPECS, CHANNELS, "sagittal", num_classes=3, n_diagnoses=2, deep_supervision=False,
                           whole_exam=True, pooling=["mil"])
    patch = {"sagittal": torch.randn(2, 1, 8, 16, 16)}
    whole = {"sagittal": torch.randn(2, 1, 10, 40, 40), "axial": torch.randn(2, 1, 8, 24, 24)}
    out = model(patch, None, None, whole, None)
    assert out["seg"].shape == (2, 3, 8, 16, 16) and out["logits"].shape == (2, 2)
    (out["seg"].mean() + out["logits"].sum()).backward()
    with pytest.raises(ValueError, match="whole exams"):
        model(patch)


def test_old_model_descriptions_load_as_centre_crop_models_and_unknown_fields_fail_clearly():
    old = {"task": "diag", "configuration": "3d_fullres", "views": ["sagittal"], "segmentation_view": None,
           "channels_by_view": {"sagittal": 1}, "n_diagnoses": 2}
    cfg = ModelConfig.from_dict(old)
    assert cfg.diagnosis_input == "crop" and cfg.feature_t == {}
    with pytest.raises(OrthoError, match="does not know"):
        ModelConfig.from_dict({**old, "future_option": 1})
    with pytest.raises(OrthoError, match="diagnosis_input"):
        ModelConfig.from_dict({**old, "diagnosis_input": "patches"})


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch

    def hwm_mib():
        # VmHWM: this process's peak resident memory (ru_maxrss would carry the forking pytest's peak over exec)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    torch.set_num_threads(1)
    from orthonet.networks import MultiViewDiagnosisModel, make_test_spec
    # five stages as planned networks have: the pooled (last three) levels are coarse, the encoder's full-resolution
    # activations are what a whole-volume pass must hold
    spec = make_test_spec(dim=3, n_stages=5, features=(4, 8, 16, 16, 16), anisotropic=True)
    torch.manual_seed(0)
    model = MultiViewDiagnosisModel({"sagittal": spec}, {"sagittal": 1}, 2, whole_exam=True, pooling=["mil"]).eval()
    model.tile_voxels = int(sys.argv[1])
    x = torch.randn(1, 1, 40, 512, 512)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                     # reset the peak to the current use
    before = hwm_mib()
    with torch.no_grad():
        logits = model({"sagittal": x})["logits"]
    after = hwm_mib()
    print(json.dumps({"peak_mib": after, "growth_mib": after - before,
                      "finite": bool(torch.isfinite(logits).all())}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_memory_is_bounded_on_a_40x512x512_volume():
    """Tiled whole-exam inference on a clinical-size volume: the peak memory growth is a fraction of the untiled
    pass, and the answer stays finite (measured figures are printed; see docs/benchmarks.md)."""
    def run(tile_voxels: int):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tile_voxels)], capture_output=True,
                             text=True, timeout=600, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    untiled = run(10 ** 9)
    tiled = run(40 * 128 * 128)
    assert untiled["finite"] and tiled["finite"]
    print(f"40x512x512: untiled growth {untiled['growth_mib']:.0f} MiB, tiled {tiled['growth_mib']:.0f} MiB")
    # the untiled peak varies with the allocator (665-972 MiB measured across clean CI runs, the tiled one 263-270):
    # the bound is "well under the untiled pass" and an absolute cap, not an exact ratio
    assert tiled["growth_mib"] < 0.5 * untiled["growth_mib"], (tiled, untiled)
    assert tiled["growth_mib"] < 400


def test_streaming_mil_pooling_equals_the_direct_pass():
    pool = GatedAttentionMIL(channels=8, heads=3).eval()
    x = torch.randn(2, 8, 6, 10, 10)
    mask = torch.ones(2, 6, 10, 10, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.enable_grad():
        direct = pool(x, mask).detach()
        w_direct = pool.attention(x, mask).detach()
    pool.chunk = 37                                                     # not a divisor of the 600 positions
    with torch.no_grad():
        streamed = pool(x, mask)
        w_streamed = pool.attention(x, mask)
    assert torch.allclose(direct, streamed, atol=1e-5) and torch.allclose(w_direct, w_streamed, atol=1e-6)


def test_feature_t_and_diagnosis_input_options_refuse_bad_values_clearly():
    from orthonet.training.cli import parse_feature_t
    from orthonet.training.options import TrainOptions
    assert parse_feature_t("100") == {"*": 100}
    assert parse_feature_t("sagittal=100,coronal=50") == {"sagittal": 100, "coronal": 50}
    assert parse_feature_t(None) is None
    with pytest.raises(OrthoError, match="not a timestep"):
        parse_feature_t("sagittal=soon")
    with pytest.raises(OrthoError, match="outside 0..999"):
        parse_feature_t("1000")
    with pytest.raises(OrthoError, match="diagnosis-input"):
        TrainOptions(dataset_name="Dataset001_X", configuration="3d_fullres", fold=0, diagnosis_input="patch")
