"""Networks: building from plans entries, the diffusion U-Net, weight transfer, heads, fusion, multitask and
cross-view sampling (tiny specs, CPU, one thread)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import zoom

from orthonet.errors import OrthoError
from orthonet.imageio import Geometry
from orthonet.networks.heads import MaxPool
from orthonet.networks import (AttentionPool, CrossViewBottleneckFusion, DiffusionUNet, MeanPool, MultiLevelPooling,
                               MultiTaskModel, MultiViewDiagnosisModel, SegmentationModel, build_encoder,
                               build_network, encoder_output_channels, load_pretrained_decoder,
                               load_pretrained_encoder, make_test_spec, network_spec, preprocessed_index_to_physical,
                               sample_into_grid)
from orthonet.synthetic.views import view_direction

torch.set_num_threads(1)

SPECS = {
    "plain3d": make_test_spec(dim=3, n_stages=3, features=(4, 8, 16), anisotropic=True),
    "resenc3d": make_test_spec(dim=3, n_stages=4, features=(4, 8, 16, 16), resenc=True),
    "plain2d": make_test_spec(dim=2, n_stages=3, features=(4, 8, 16)),
    "resenc2d": make_test_spec(dim=2, n_stages=3, features=(4, 8, 16), resenc=True),
}
SHAPES = {"plain3d": (8, 16, 16), "resenc3d": (16, 16, 16), "plain2d": (16, 24), "resenc2d": (16, 16)}


def _x(name, batch=2, channels=1, seed=0):
    return torch.randn(batch, channels, *SHAPES[name], generator=torch.Generator().manual_seed(seed))


def _randomise_time(model: DiffusionUNet, std: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.time_proj.parameters():
            p.normal_(0, std)


def _multiview_specs():
    return ({"sagittal": SPECS["plain3d"], "coronal": SPECS["resenc3d"],
             "axial": make_test_spec(n_stages=3, features=(4, 8, 8))},
            {"sagittal": 1, "coronal": 1, "axial": 2})


def _multiview_inputs(batch=2):
    g = torch.Generator().manual_seed(5)
    return {"sagittal": torch.randn(batch, 1, 8, 16, 16, generator=g),
            "coronal": torch.randn(batch, 1, 16, 16, 16, generator=g),
            "axial": torch.randn(batch, 2, 12, 12, 8, generator=g)}


# ------------------------------------------------------------------------------------------------ build
@pytest.mark.parametrize("name", list(SPECS))
def test_build_network_and_encoder_agree(name):
    spec = SPECS[name]
    torch.manual_seed(0)
    net = build_network(spec, 2, 3)
    enc = build_encoder(spec, 2)
    assert type(enc) is type(net.encoder)
    assert list(enc.state_dict()) == list(net.encoder.state_dict())
    skips = enc(_x(name, channels=2))
    assert [s.shape[1] for s in skips] == encoder_output_channels(spec)
    assert net(_x(name, channels=2)).shape[1] == 3


def test_bad_specs_raise_ortho_error():
    spec = copy.deepcopy(SPECS["plain3d"])
    spec["class_name"] = "dynamic_network_architectures.architectures.unet.NoSuchUNet"
    with pytest.raises(OrthoError, match="cannot import"):
        build_network(spec, 1, 2)
    spec = copy.deepcopy(SPECS["plain3d"])
    spec["kwargs"]["num_classes"] = 3
    with pytest.raises(OrthoError, match="num_classes"):
        build_encoder(spec, 1)
    spec = copy.deepcopy(SPECS["plain3d"])
    spec["kwargs"]["n_stages"] = 5
    with pytest.raises(OrthoError, match="cannot build"):
        build_network(spec, 1, 2)
    plans = {"views": {"sagittal": {"configurations": {"3d_fullres": {"network": SPECS["plain3d"]}}}}}
    assert network_spec(plans, "sagittal", "3d_fullres") is SPECS["plain3d"]
    with pytest.raises(OrthoError, match="2d"):
        network_spec(plans, "sagittal", "2d")


# ------------------------------------------------------------------------------------------------ diffusion U-Net
@pytest.mark.parametrize("name", list(SPECS))
def test_diffusion_unet_forward_backward(name):
    model = DiffusionUNet(SPECS[name], 2)
    x = _x(name, channels=2)
    y = model(x, torch.tensor([3, 700]))
    assert y.shape == x.shape
    y.square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # every trainable parameter takes part (DDP without find_unused_parameters), all gradients finite
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)
    # zero-initialised projections still learn: their weight gradient is nonzero
    assert sum(float(p.grad.abs().sum()) for n, p in trainable if n.startswith("time_proj") and "weight" in n) > 0
    n_stages = len(encoder_output_channels(SPECS[name]))
    film_enc = {k.split("__")[2] for k in model.time_proj if k.startswith("encoder__stages")}
    film_dec = {k.split("__")[2] for k in model.time_proj if k.startswith("decoder__stages")}
    assert film_enc == {str(i) for i in range(n_stages)} and film_dec == {str(i) for i in range(n_stages - 1)}


@pytest.mark.parametrize("name", ["plain3d", "resenc3d", "plain2d"])
def test_untrained_denoiser_is_the_plain_unet_and_time_matters_after(name):
    spec = SPECS[name]
    model = DiffusionUNet(spec, 1)
    plain = build_network(spec, 1, 1)
    missing, unexpected = plain.load_state_dict({k: v for k, v in model.state_dict().items()
                                                 if k.startswith(("encoder.", "decoder."))})
    assert not missing and not unexpected
    x = _x(name)
    with torch.no_grad():
        ref = plain(x)
        assert torch.equal(model(x, 5), ref) and torch.equal(model(x, 900), ref)
        _randomise_time(model)
        a, b = model(x, 5), model(x, 900)
        assert float((a - b).abs().mean()) > 1e-2
        assert float((a - ref).abs().mean()) > 1e-2
        # folding the FiLM at t into the norms gives a plain DNA network that computes the denoiser at t
        plain.load_state_dict(model.folded_state_dict(900))
        assert torch.allclose(plain(x), b, atol=1e-4)


def test_deepcopy_of_denoiser_hooks_follow_the_copy():
    model = DiffusionUNet(SPECS["plain3d"], 1)
    clone = copy.deepcopy(model)
    x = _x("plain3d")
    with torch.no_grad():
        before = model(x, 10)
        _randomise_time(clone)
        assert torch.equal(model(x, 10), before)
        assert not torch.allclose(clone(x, 10), before)


# ------------------------------------------------------------------------------------------------ weight transfer
def _trained_like_denoiser(spec, channels=1):
    torch.manual_seed(1)
    den = DiffusionUNet(spec, channels)
    with torch.no_grad():
        for p in den.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return den


def test_denoiser_encoder_loads_everywhere_with_zero_missing_keys():
    specs, channels = _multiview_specs()
    den = _trained_like_denoiser(specs["sagittal"])
    enc_sd = {k: v for k, v in den.state_dict().items() if k.startswith("encoder.")}

    seg = build_network(specs["sagittal"], 1, 4)
    seg_enc_keys = [k for k in seg.state_dict() if k.startswith("encoder.")]
    result = seg.load_state_dict(enc_sd, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if k.startswith("encoder.")]
    assert set(enc_sd) == set(seg_enc_keys)

    diag = MultiViewDiagnosisModel(specs, channels, n_diagnoses=3)
    multi = MultiTaskModel(specs, channels, "sagittal", num_classes=4, n_diagnoses=3, deep_supervision=True)
    segm = SegmentationModel(specs, channels, "sagittal", num_classes=4)
    for model in (diag, multi, segm):
        report = load_pretrained_encoder(model, enc_sd, view="sagittal")
        assert report.complete, report.summary()
        assert report.missing == [] and report.unexpected == [] and report.shape_mismatch == []
        target = model.encoders["sagittal"].state_dict()
        assert all(torch.equal(target[k[len("encoder."):]], v) for k, v in enc_sd.items())
    # the same helper on a bare encoder and on a DNA network
    report = load_pretrained_encoder(build_encoder(specs["sagittal"], 1), den.encoder_state_dict())
    assert report.complete and len(report.loaded) == len(enc_sd)
    # a different input channel count is reported as a shape mismatch, never loaded silently
    report = load_pretrained_encoder(build_encoder(specs["sagittal"], 2), enc_sd)
    assert report.shape_mismatch and all("stages.0.0.convs.0" in k for k in report.shape_mismatch)


def test_denoiser_decoder_loads_where_shapes_match():
    spec = SPECS["plain3d"]
    den = _trained_like_denoiser(spec)
    seg = SegmentationModel({"sagittal": spec}, {"sagittal": 1}, "sagittal", num_classes=4)
    report = load_pretrained_decoder(seg, den.decoder_state_dict(t=100))
    assert not report.missing and not report.unexpected
    assert report.shape_mismatch and all(k.startswith("seg_layers.") for k in report.shape_mismatch)
    folded = den.decoder_state_dict(t=100)
    target = seg.decoder.state_dict()
    assert all(torch.equal(target[k[len("decoder."):]], v) for k, v in folded.items() if "seg_layers" not in k)
    # the folded encoder + decoder reproduce the denoiser's hidden features at t exactly
    load_pretrained_encoder(seg, den.encoder_state_dict(t=100))
    x = _x("plain3d")
    with torch.no_grad():
        feats = den.forward_features(x, 100, include_decoder=True)["decoder"]
        captured = []
        h = seg.decoder.stages[-1].register_forward_hook(lambda m, i, o: captured.append(o))
        seg(x)
        h.remove()
    assert torch.allclose(captured[0], feats[-1], atol=1e-4)


# ------------------------------------------------------------------------------------------------ heads / fusion
def test_pooling():
    x = torch.randn(2, 6, 4, 5, 3)
    att = AttentionPool(6)
    with torch.no_grad():
        att.score.weight.zero_()
    assert torch.allclose(att(x), MeanPool()(x), atol=1e-6)            # flat scores = mean
    att2 = AttentionPool(6)
    with torch.no_grad():                                                # score = channel 0 (large) -> peaks there
        att2.key.weight.zero_()
        att2.key.bias.zero_()
        att2.key.weight[0, 0] = 1.0
        att2.score.weight.zero_()
        att2.score.weight[0, 0] = 50.0
    x2 = torch.zeros(1, 6, 4, 4, 4)
    x2[0, :, 1, 2, 3] = 3.0
    w = att2.attention(x2).detach()
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-5) and float(w.max()) > 0.99
    mlp = MultiLevelPooling([6, 4])                                      # mean, max, attention per level
    out = mlp([torch.randn(2, 6, 8, 8, 8), torch.randn(2, 4, 2, 3, 1)])
    assert out.shape == (2, mlp.out_dim) == (2, 30)
    assert mlp([torch.randn(2, 6, 3, 3), torch.randn(2, 4, 5, 7)]).shape == (2, 30)   # shape-agnostic, 2D too
    x3 = torch.zeros(1, 2, 5, 5, 5)
    x3[0, 1, 2, 2, 2] = 7.0                                              # one bright voxel survives max pooling
    assert torch.equal(MaxPool()(x3), torch.tensor([[0.0, 7.0]]))


@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_diagnosis_with_missing_views(fusion):
    specs, channels = _multiview_specs()
    model = MultiViewDiagnosisModel(specs, channels, n_diagnoses=4, fusion=fusion)
    x = _multiview_inputs()
    out = model(x)
    assert out["logits"].shape == (2, 4) and set(out["view_logits"]) == set(specs)
    (out["logits"].sum() + sum(v.sum() for v in out["view_logits"].values())).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        full = model(x)["logits"]
        only_axial = model({"axial": x["axial"]})
        no_cor = model({"sagittal": x["sagittal"], "axial": x["axial"]})["logits"]
        # masking a view per sample equals leaving it out
        masked = model(x, present={"coronal": torch.tensor([False, True])})["logits"]
    assert only_axial["logits"].shape == (2, 4) and torch.isfinite(only_axial["logits"]).all()
    assert set(only_axial["view_logits"]) == {"axial"}
    assert torch.isfinite(no_cor).all() and not torch.allclose(no_cor, full)
    assert torch.allclose(masked[0], no_cor[0], atol=1e-5) and torch.allclose(masked[1], full[1], atol=1e-5)
    with pytest.raises(ValueError, match="unknown view"):
        model({"oblique": x["axial"]})


def test_missing_view_average_policy_and_view_dropout():
    specs, channels = _multiview_specs()
    model = MultiViewDiagnosisModel(specs, channels, n_diagnoses=3, missing_views="average", view_dropout=0.5)
    x = _multiview_inputs(batch=3)
    model.eval()
    with torch.no_grad():
        full = model(x)
        part = model({"sagittal": x["sagittal"], "axial": x["axial"]})
    expected = (part["view_logits"]["sagittal"] + part["view_logits"]["axial"]) / 2
    assert torch.allclose(part["logits"], expected, atol=1e-6)
    assert not torch.allclose(full["logits"], (full["view_logits"]["sagittal"] + full["view_logits"]["axial"]
                                               + full["view_logits"]["coronal"]) / 3)
    masks = {v: torch.ones(256, dtype=torch.bool) for v in specs}
    kept = torch.stack(list(model.diagnosis._drop_views(masks).values()), 1)
    assert kept.any(1).all(), "view dropout must never hide every view of a sample"
    assert 0.3 < 1 - float(kept.float().mean()) < 0.6


def test_diagnosis_with_2d_views():
    specs = {"sagittal": SPECS["plain2d"], "axial": SPECS["resenc2d"]}
    model = MultiViewDiagnosisModel(specs, {"sagittal": 1, "axial": 1}, n_diagnoses=2, levels=[-2, -1])
    out = model({"sagittal": torch.randn(2, 1, 16, 24), "axial": torch.randn(2, 1, 32, 32)})
    assert out["logits"].shape == (2, 2)


# ------------------------------------------------------------------------------------------------ multitask
def test_multitask_forward_backward():
    specs, channels = _multiview_specs()
    model = MultiTaskModel(specs, channels, "sagittal", num_classes=3, n_diagnoses=4, deep_supervision=True,
                           fusion="attention")
    x = _multiview_inputs()
    out = model(x)
    assert [tuple(s.shape) for s in out["seg"]] == [(2, 3, 8, 16, 16), (2, 3, 8, 8, 8)]
    assert out["logits"].shape == (2, 4)
    loss = sum(s.mean() for s in out["seg"]) + out["logits"].sum() + sum(v.sum() for v in out["view_logits"].values())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        no_seg = model({"coronal": x["coronal"]})
    assert no_seg["seg"] is None and torch.isfinite(no_seg["logits"]).all()
    names = {k.split(".")[0] for k in model.state_dict()}
    assert names == {"encoders", "decoder", "diagnosis"}
    # a segmentation checkpoint loads into the multitask model (same naming)
    seg = SegmentationModel(specs, channels, "sagittal", num_classes=3, deep_supervision=True)
    result = model.load_state_dict(seg.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if k.startswith(("encoders.sagittal", "decoder"))]


def test_segmentation_model_without_deep_supervision_has_no_unused_parameters():
    model = SegmentationModel({"sagittal": SPECS["resenc3d"]}, {"sagittal": 1}, "sagittal", num_classes=2)
    y = model(_x("resenc3d"))
    assert y.shape == (2, 2, 16, 16, 16)
    y.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bf16_autocast_and_channels_last_3d():
    spec = SPECS["plain3d"]
    den = DiffusionUNet(spec, 1)
    _randomise_time(den)
    x = _x("plain3d")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = den(x, 50)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    y.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in den.parameters() if p.grad is not None)
    with torch.no_grad():
        ref = den(x, 50)
        den_cl = copy.deepcopy(den).to(memory_format=torch.channels_last_3d)
        y_cl = den_cl(x.to(memory_format=torch.channels_last_3d), 50)
    assert torch.allclose(y_cl, ref, atol=1e-4)

    specs, channels = _multiview_specs()
    model = MultiTaskModel(specs, channels, "sagittal", num_classes=3, n_diagnoses=2, fusion="attention",
                           fuse_views=True)
    inputs = _multiview_inputs()
    affines = {v: torch.eye(4, dtype=torch.float64) for v in specs}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(inputs, affines=affines)
    assert torch.isfinite(out["seg"].float()).all() and torch.isfinite(out["logits"].float()).all()
    (out["seg"].float().mean() + out["logits"].float().sum()).backward()
    model_cl = model.to(memory_format=torch.channels_last_3d)
    out_cl = model_cl({v: t.to(memory_format=torch.channels_last_3d) for v, t in inputs.items()}, affines=affines)
    assert out_cl["seg"].shape == (2, 3, 8, 16, 16)


# ------------------------------------------------------------------------------------------------ cross-view
def _blob(points: np.ndarray, center: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-((points - center) ** 2).sum(-1) / (2 * sigma ** 2)).astype(np.float32)


def _physical_grid(affine: np.ndarray, shape) -> np.ndarray:
    idx = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"), -1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _centroid_mm(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    pts = _physical_grid(affine, volume.shape)
    w = volume.astype(np.float64)
    return (pts * w[..., None]).reshape(-1, 3).sum(0) / w.sum()


def _oblique_geometry(view, angles, size_itk, spacing_itk, center):
    d = view_direction(view, angles)
    origin = np.asarray(center) - d @ (np.asarray(spacing_itk) * (np.asarray(size_itk) - 1) / 2)
    return Geometry(tuple(size_itk), tuple(spacing_itk), tuple(origin.tolist()), tuple(d.reshape(-1).tolist()))


def _preprocess(array: np.ndarray, geom: Geometry, tf, bbox, new_shape):
    """Transpose, crop and resample (half-pixel convention) like preprocessing does; return array + properties."""
    arr = array.transpose(tf)
    crop = arr[tuple(slice(a, b) for a, b in bbox)]
    out = zoom(crop, np.asarray(new_shape) / np.asarray(crop.shape), order=1, grid_mode=True, mode="nearest")
    assert out.shape == tuple(new_shape)
    props = {"original_geometry": geom.to_dict(), "transpose_forward": list(tf), "bbox_used_for_cropping": bbox,
             "shape_after_crop": list(crop.shape), "shape_after_resampling": list(new_shape)}
    return out, props


def test_preprocessed_index_to_physical_matches_simpleitk():
    geom = _oblique_geometry("sagittal", (10, -5, 20), (20, 18, 12), (0.7, 0.9, 3.0), (10.0, -5.0, 30.0))
    img = geom.apply_to(sitk.Image(list(geom.size), sitk.sitkFloat32))
    tf = [2, 0, 1]
    bbox = [[2, 18], [1, 11], [3, 17]]
    props = {"original_geometry": geom.to_dict(), "transpose_forward": tf, "bbox_used_for_cropping": bbox,
             "shape_after_crop": [16, 10, 14], "shape_after_resampling": [24, 30, 20]}
    affine = preprocessed_index_to_physical(props)
    k = np.array([16 / 24, 10 / 30, 14 / 20])
    for r in ([0, 0, 0], [23, 29, 19], [5.5, 12, 3]):
        q = (np.asarray(r) + 0.5) * k - 0.5 + np.array([b[0] for b in bbox])
        p = np.zeros(3)
        p[tf] = q                                   # p[tf[j]] = q[j]
        expected = img.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in p[::-1]))
        assert np.allclose((affine @ np.append(r, 1.0))[:3], expected, atol=1e-9)
    # 'corner' convention: first voxel centre kept, spacing exactly the target
    props_c = dict(props, spacing_after_crop=[0.7, 3.0, 0.9], target_spacing=[2.0, 0.3, 0.5])  # transposed (z,y,x)
    a_c = preprocessed_index_to_physical(props_c, convention="corner")
    assert np.allclose(np.linalg.norm(a_c[:3, :3], axis=0), [2.0, 0.3, 0.5])


def test_cross_view_sampling_puts_a_blob_at_the_same_physical_place():
    center = np.array([12.0, -8.0, 25.0])
    sigma = 4.0
    # view A: oblique sagittal, thick slices, transposed + cropped + resampled by "preprocessing"
    geom_a = _oblique_geometry("sagittal", (12, -8, 15), (48, 40, 16), (0.8, 0.9, 3.0), center + [1.5, -2.0, 2.5])
    vol_a = _blob(_physical_grid(geom_a.index_to_physical(), geom_a.array_shape), center, sigma)
    pre_a, props_a = _preprocess(vol_a, geom_a, [1, 2, 0], [[2, 38], [3, 45], [1, 15]], (30, 33, 20))
    aff_a = preprocessed_index_to_physical(props_a)
    # view B: oblique coronal, no transpose, cropped and resampled differently
    geom_b = _oblique_geometry("coronal", (-10, 14, 5), (36, 30, 32), (1.1, 1.3, 1.2), center + [-2.0, 1.0, -1.0])
    vol_b = _blob(_physical_grid(geom_b.index_to_physical(), geom_b.array_shape), center, sigma)
    pre_b, props_b = _preprocess(vol_b, geom_b, [0, 1, 2], [[1, 31], [0, 30], [2, 34]], (36, 34, 40))
    aff_b = preprocessed_index_to_physical(props_b)
    # each preprocessed view alone already locates the blob
    assert np.linalg.norm(_centroid_mm(pre_a, aff_a) - center) < 0.3
    assert np.linalg.norm(_centroid_mm(pre_b, aff_b) - center) < 0.3
    # A's array sampled into B's grid lands where the blob is, and overlaps B's own view of it
    feats = torch.from_numpy(np.ascontiguousarray(pre_a))[None, None]
    sampled, cover = sample_into_grid(feats, aff_a, aff_b, pre_b.shape, return_coverage=True)
    s = sampled[0, 0].numpy()
    err = np.linalg.norm(_centroid_mm(s, aff_b) - center)
    assert err < 0.1, f"centroid error {err:.3f} mm"   # measured: 0.006 mm
    corr = np.corrcoef(s.ravel(), pre_b.ravel())[0, 1]
    assert corr > 0.97
    # coverage = inside the source volume: sampling ones gives < 0.5 outside it (zeros padding) and 1 deep inside
    ones = sample_into_grid(torch.ones_like(feats), aff_a, aff_b, pre_b.shape)[0, 0]
    cov = cover[0, 0].bool()
    assert 0.2 < float(cov.float().mean()) < 1
    assert float(ones[~cov].max()) < 0.5 and float((ones[cov] > 0.99).float().mean()) > 0.8
    # a wrong transpose puts it elsewhere (the test can fail)
    wrong = preprocessed_index_to_physical(dict(props_a, transpose_forward=[0, 1, 2]))
    s_wrong = sample_into_grid(feats, wrong, aff_b, pre_b.shape)[0, 0].numpy()
    assert s_wrong.sum() < 0.5 * s.sum() or np.linalg.norm(_centroid_mm(s_wrong, aff_b) - center) > 5
    # per-sample affines (batch of 2, second shifted by 5 mm along physical x)
    shifted = aff_a.copy()
    shifted[0, 3] += 5.0
    both = sample_into_grid(feats.expand(2, 1, *pre_a.shape), np.stack([aff_a, shifted]), aff_b, pre_b.shape)
    move = _centroid_mm(both[1, 0].numpy(), aff_b) - _centroid_mm(both[0, 0].numpy(), aff_b)
    assert np.allclose(move, [5.0, 0.0, 0.0], atol=0.3)


def test_cross_view_bottleneck_fusion_starts_as_identity():
    specs, channels = _multiview_specs()
    torch.manual_seed(0)
    model = SegmentationModel(specs, channels, "sagittal", num_classes=3, fuse_views=True)
    assert isinstance(model.cross_view, CrossViewBottleneckFusion)
    x = _multiview_inputs()
    affines = {v: torch.eye(4, dtype=torch.float64) for v in specs}
    model.eval()
    with torch.no_grad():
        fused = model(x, affines=affines)
        plain = model.decoder(model.encoders["sagittal"](x["sagittal"]))
        assert torch.allclose(fused, plain, atol=1e-6)
        model.cross_view.mix.weight.normal_(0, 0.1)
        changed = model(x, affines=affines)
        no_others = model({"sagittal": x["sagittal"]}, affines=affines)
    assert not torch.allclose(changed, plain, atol=1e-3)
    assert not torch.allclose(changed, no_others, atol=1e-3)
    with pytest.raises(ValueError, match="affines"):
        model(x)


@pytest.mark.parametrize("head", ["fusion", "view"])
def test_diagnosis_mlps_cannot_die(head):
    """A loss spike under SGD momentum 0.99 once pushed every hidden unit of the fusion MLP negative, so the head
    gave identical probabilities for every exam. With the hidden LayerNorm no bias can silence the layer."""
    from orthonet.networks import ConcatMLPFusion, ViewDiagnosisHead

    torch.manual_seed(0)
    if head == "fusion":
        module = ConcatMLPFusion({"sagittal": 12, "coronal": 12}, n_diagnoses=3, d_model=8, hidden=16, dropout=0.0)
        first = module.mlp[0]
        run = lambda x: module({"sagittal": x, "coronal": x.flip(1)})  # noqa: E731
    else:
        module = ViewDiagnosisHead(12, n_diagnoses=3, hidden=16, dropout=0.0)
        first = module.net[1]
        run = module
    with torch.no_grad():
        first.bias.fill_(-100.0)                       # what the collapsed run looked like: all pre-activations < 0
    x = torch.randn(4, 12)
    logits = run(x)
    assert logits.std(dim=0).min() > 1e-3              # still a function of the input, exam by exam


# ------------------------------------------------------------------------------------------------ pyramid head
@pytest.mark.parametrize("name", list(SPECS))
def test_pyramid_head_segments_at_input_resolution_and_trains_everything(name):
    from orthonet.networks import PyramidSegmentationHead
    model = SegmentationModel({"sagittal": SPECS[name]}, {"sagittal": 1}, "sagittal", num_classes=3,
                              seg_head="pyramid")
    assert model.decoder is None and isinstance(model.pyramid, PyramidSegmentationHead)
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoders", "pyramid"}
    y = model(_x(name))
    assert tuple(y.shape) == (2, 3) + SHAPES[name]
    y.square().mean().backward()
    # every parameter is in the graph (DNA's residual blocks start with a zero-initialised last norm, so some
    # encoder gradients are exactly zero at initialisation); the head's are all non-zero
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.pyramid.parameters())


def test_pyramid_head_is_a_function_of_every_level():
    """Changing any one encoder level changes the output: no level is dropped on the way up."""
    from orthonet.networks import PyramidSegmentationHead
    torch.manual_seed(0)
    head = PyramidSegmentationHead([4, 8, 16], num_classes=2, dims=3).eval()
    skips = [torch.randn(1, 4, 8, 16, 16), torch.randn(1, 8, 4, 8, 8), torch.randn(1, 16, 2, 4, 4)]
    base = head(skips)
    for i in range(3):
        changed = [s.clone() for s in skips]
        changed[i] += 1.0 * torch.randn_like(changed[i])
        assert not torch.allclose(head(changed), base), i
    assert tuple(head(skips, size=(16, 32, 32)).shape) == (1, 2, 16, 32, 32)
    with pytest.raises(ValueError, match="levels"):
        head(skips[:2])


def test_pyramid_head_options_are_checked_and_multitask_uses_it():
    specs, channels = _multiview_specs()
    with pytest.raises(ValueError, match="deep_supervision"):
        SegmentationModel(specs, channels, "sagittal", num_classes=3, deep_supervision=True, seg_head="pyramid")
    with pytest.raises(ValueError, match="seg_head"):
        SegmentationModel(specs, channels, "sagittal", num_classes=3, seg_head="fpn")
    model = MultiTaskModel(specs, channels, "sagittal", num_classes=3, n_diagnoses=4, seg_head="pyramid")
    out = model(_multiview_inputs())
    assert tuple(out["seg"].shape) == (2, 3, 8, 16, 16) and out["logits"].shape == (2, 4)
    assert tuple(model.segment(_multiview_inputs()["sagittal"]).shape) == (2, 3, 8, 16, 16)
