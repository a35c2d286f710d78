"""Sliding-window inference and mirroring TTA against hand-computed answers."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from orthonet.inference.sliding_window import compute_steps, gaussian_importance_map, sliding_window_predict
from orthonet.inference.tta import RunningMeanStd, make_tta_predictor, mean_and_std, mirror_combinations, mirror_tta

torch.set_num_threads(1)


# ---- steps and weights --------------------------------------------------------------------------------------
@pytest.mark.parametrize("image,patch,step,expected", [
    ((110,), (64,), 0.5, [[0, 23, 46]]),        # the example in nnU-Net's own comment
    ((100,), (64,), 0.5, [[0, 18, 36]]),
    ((64,), (64,), 0.5, [[0]]),
    ((130,), (64,), 0.5, [[0, 22, 44, 66]]),
    ((100,), (64,), 1.0, [[0, 36]]),
    ((40, 200, 190), (32, 128, 128), 0.5, [[0, 8], [0, 36, 72], [0, 62]]),
    ((57, 33), (20, 33), 0.25, [[0, 5, 9, 14, 18, 23, 28, 32, 37], [0]]),
])
def test_compute_steps_matches_nnunet(image, patch, step, expected):
    # expected values follow nnU-Net v2's compute_steps_for_sliding_window:
    # n = ceil((i - p) / (p * step)) + 1 steps spread evenly between 0 and i - p (rounded)
    assert compute_steps(image, patch, step) == expected


def test_compute_steps_rejects_bad_input():
    with pytest.raises(ValueError):
        compute_steps((10, 10), (12, 10))
    with pytest.raises(ValueError):
        compute_steps((10,), (4,), 0.0)


def test_gaussian_importance_map():
    g = gaussian_importance_map((9, 16, 13))
    assert g.shape == (9, 16, 13) and g.dtype == torch.float32
    assert float(g.max()) == pytest.approx(1.0) and float(g[4, 8, 6]) == pytest.approx(1.0)
    assert float(g.min()) > 0
    assert float(g[0, 8, 6]) < 0.01  # sigma = patch/8: the border weighs little
    assert torch.allclose(g, g.flip(2), atol=1e-6)  # odd axis: symmetric about the centre voxel


# ---- stitching --------------------------------------------------------------------------------------------
def _identity(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@pytest.mark.parametrize("use_gaussian", [True, False])
def test_identity_predictor_returns_the_input_3d(use_gaussian):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 23, 31, 19, generator=g)
    out = sliding_window_predict(_identity, image, (8, 12, 10), num_classes=2, use_gaussian=use_gaussian)
    assert out.shape == image.shape and out.dtype == torch.float32
    assert torch.allclose(out, image, atol=1e-5)


def test_tiles_are_put_back_in_the_right_place():
    # channel 0 encodes each voxel's global linear index: any misplaced tile would show
    shape = (13, 22, 17)
    index = torch.arange(np.prod(shape), dtype=torch.float32).reshape(1, *shape)
    out = sliding_window_predict(lambda x: 2 * x + 1, index, (6, 8, 8), num_classes=1, step_size=0.5)
    assert torch.allclose(out, 2 * index + 1, atol=1e-2, rtol=1e-6)


def _reference_sliding_window(fn, image, patch, step, weights):
    """Naive reference: materialise every tile, accumulate with numpy."""
    shape = image.shape[1:]
    acc, wsum = None, np.zeros(shape)
    for starts in itertools.product(*compute_steps(shape, patch, step)):
        sl = tuple(slice(s, s + p) for s, p in zip(starts, patch))
        y = fn(image[(slice(None),) + sl][None])[0].numpy().astype(np.float64)
        if acc is None:
            acc = np.zeros((y.shape[0],) + tuple(shape))
        acc[(slice(None),) + sl] += y * weights
        wsum[sl] += weights
    return acc / wsum


def test_position_dependent_predictor_is_the_weighted_tile_average():
    patch = (5, 7, 6)
    local = torch.linspace(0, 3, int(np.prod(patch))).reshape(1, 1, *patch)  # depends on position in the patch

    def fn(x):
        return torch.cat([x + local, x * local], 1)

    image = torch.rand(1, 12, 15, 11, generator=torch.Generator().manual_seed(1))
    out = sliding_window_predict(fn, image, patch, num_classes=2, batch_size=3)
    ref = _reference_sliding_window(fn, image, patch, 0.5, gaussian_importance_map(patch).double().numpy())
    assert np.allclose(out.numpy(), ref, atol=1e-5)
    # and it is genuinely position dependent: not the plain input + mean offset
    assert not torch.allclose(out[0], image[0] + local.mean(), atol=1e-3)


def test_batch_size_does_not_change_the_result():
    image = torch.rand(1, 14, 20, 20, generator=torch.Generator().manual_seed(2))
    fn = lambda x: torch.cat([x.cumsum(-1), x.flip(-2)], 1)  # noqa: E731  (non-trivial, position dependent)
    a = sliding_window_predict(fn, image, (6, 8, 8), 2, batch_size=1)
    b = sliding_window_predict(fn, image, (6, 8, 8), 2, batch_size=4)
    assert torch.allclose(a, b, atol=1e-6)


def test_2d_image_and_image_smaller_than_patch():
    image = torch.rand(3, 9, 14, generator=torch.Generator().manual_seed(3))
    out = sliding_window_predict(_identity, image, (16, 16), num_classes=3)
    assert out.shape == (3, 9, 14) and torch.allclose(out, image, atol=1e-6)
    vol = torch.rand(1, 4, 5, 30)
    out = sliding_window_predict(lambda x: x[:, :1].repeat(1, 4, 1, 1, 1), vol, (8, 8, 8), num_classes=4)
    assert out.shape == (4, 4, 5, 30) and torch.allclose(out[2], vol[0], atol=1e-6)


def test_2d_patch_on_3d_volume_predicts_slice_by_slice():
    seen = []

    def fn(x):
        seen.append(tuple(x.shape))
        return x * 3

    vol = torch.rand(1, 5, 12, 12)
    out = sliding_window_predict(fn, vol, (8, 8), num_classes=1, batch_size=2)
    assert out.shape == vol.shape and torch.allclose(out, vol * 3, atol=1e-6)
    assert all(len(s) == 4 and s[1:] == (1, 8, 8) for s in seen)  # the network saw 2D batches


def test_wrong_output_shape_is_reported():
    with pytest.raises(ValueError, match="expected"):
        sliding_window_predict(lambda x: x[:, :, :-1], torch.rand(1, 8, 8, 8), (8, 8, 8), num_classes=1)


# ---- test-time augmentation -------------------------------------------------------------------------------
def test_mirror_combinations():
    assert mirror_combinations((0, 1, 2)) == [(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    assert mirror_combinations(()) == []


def test_tta_with_flip_equivariant_function_equals_plain():
    conv = torch.nn.Conv3d(1, 2, 3, padding=1, bias=True)
    with torch.no_grad():  # symmetric kernels commute with flips
        k = torch.rand(2, 1, 3, 3, 3)
        k = (k + k.flip(2) + k.flip(3) + k.flip(4) + k.flip(2, 3) + k.flip(2, 4) + k.flip(3, 4)
             + k.flip(2, 3, 4)) / 8
        conv.weight.copy_(k)
    x = torch.rand(2, 1, 6, 7, 5)
    with torch.no_grad():
        plain = conv(x)
        tta = mirror_tta(conv, x, (0, 1, 2))
    assert torch.allclose(tta, plain, atol=1e-5)


def test_tta_with_non_equivariant_function_equals_hand_computed_average():
    ramp = torch.arange(6, dtype=torch.float32).reshape(1, 1, 6, 1)  # grows along spatial axis 0 (dim 2)
    calls = []

    def fn(x):
        calls.append(1)
        return x + ramp

    x = torch.rand(1, 1, 6, 4)
    out = mirror_tta(fn, x, (0,))
    # (f(x) + flip(f(flip(x)))) / 2 = x + (ramp + flip(ramp)) / 2 = x + 2.5 everywhere
    assert torch.allclose(out, x + 2.5, atol=1e-6) and len(calls) == 2
    calls.clear()
    out2 = mirror_tta(lambda t: (calls.append(1), t * ramp)[1], x, (0, 1))
    expected = x * (ramp + ramp.flip(2) + ramp + ramp.flip(2)) / 4
    assert torch.allclose(out2, expected, atol=1e-6) and len(calls) == 4


def test_tta_inside_sliding_window_keeps_shapes():
    vol = torch.rand(1, 10, 12, 9)
    out = sliding_window_predict(make_tta_predictor(lambda x: x.repeat(1, 3, 1, 1, 1), (0, 1, 2)), vol,
                                 (8, 8, 8), num_classes=3)
    assert out.shape == (3, 10, 12, 9) and torch.allclose(out[1], vol[0], atol=1e-6)
    assert make_tta_predictor(_identity, ()) is _identity


def test_ensemble_mean_and_std():
    preds = [torch.full((2, 3), v) for v in (0.2, 0.4, 0.9)]
    mean, std = mean_and_std(preds)
    assert torch.allclose(mean, torch.full((2, 3), 0.5))
    assert torch.allclose(std, torch.full((2, 3), float(np.std([0.2, 0.4, 0.9]))))
    running = RunningMeanStd()
    for p in preds:
        running.add(p)
    assert torch.allclose(running.mean, mean) and torch.allclose(running.std, std, atol=1e-6)


def test_accumulator_falls_back_to_cpu_when_the_device_is_full(monkeypatch):
    from orthonet.inference import sliding_window as sw
    real_zeros = torch.zeros

    def zeros(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type != "cpu":
            raise torch.OutOfMemoryError("simulated")
        return real_zeros(*args, device=device, **kwargs)

    monkeypatch.setattr(sw.torch, "zeros", zeros)
    logits, weights, where = sw._allocate(3, (4, 5, 6), torch.device("cuda"))
    assert where.type == "cpu" and logits.shape == (3, 4, 5, 6) and weights.shape == (4, 5, 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    image = torch.rand(2, 20, 24, 18, generator=torch.Generator().manual_seed(5))
    fn = lambda x: torch.cat([x, x.cumsum(-1)], 1)  # noqa: E731
    cpu = sliding_window_predict(fn, image, (8, 12, 10), 4, device="cpu")
    gpu = sliding_window_predict(fn, image, (8, 12, 10), 4, device="cuda", batch_size=3)
    assert gpu.device.type == "cpu" and torch.allclose(cpu, gpu, atol=1e-4)
