"""Unit tests for metrics.py: every metric against closed forms or an independent reference computation.

CPU only, no network: the FID Inception network is checked against pytorch-fid's (a test-only dependency) with a
random state dict, since the real weights cannot be downloaded here.
"""

import math
import subprocess
import sys
import urllib.error
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

import metrics
from common import UserError
from conftest import REPO


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread for this module: on a busy 2-core machine every OpenMP barrier of a small op can cost
    milliseconds (the KID test took 17 s with 2 threads instead of 0.15 s). Results do not depend on it.
    Matrix sizes below stay small for the same reason: scipy's threaded OpenBLAS is as sensitive (sqrtm at d=128
    took 8 s instead of 0.03 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def scipy_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance (fid_score.py), the reference formula, with scipy's sqrtm."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def gaussian_stats(rng, d, n, scale=1.0, shift=0.0):
    """Sample mean/covariance of n correlated Gaussian samples in d dims (rank min(n-1, d))."""
    mix = rng.standard_normal((d, d)) / math.sqrt(d)
    x = (rng.standard_normal((n, d)) * scale + shift) @ mix
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.fixture(scope="module")
def random_inception_state():
    """A random but well-scaled FIDInceptionV3 state dict: He-normal convolutions keep activations O(1) through
    the ~90 layers (PyTorch's default init shrinks them to ~0, which would make any comparison trivially pass);
    BatchNorm statistics and affine parameters are random too, and the fc bias is nonzero."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, value in metrics.FIDInceptionV3().state_dict().items():
        if name.endswith("conv.weight"):
            value = torch.randn(value.shape, generator=gen) * math.sqrt(2 / value[0].numel())
        elif name.endswith("bn.running_var") or name.endswith("bn.weight"):
            value = torch.rand(value.shape, generator=gen) + 0.5
        elif name.endswith("bn.running_mean") or name.endswith("bn.bias"):
            value = torch.randn(value.shape, generator=gen) * 0.1
        elif name.startswith("fc."):
            value = torch.randn(value.shape, generator=gen) / math.sqrt(value.shape[-1])
        state[name] = value
    return state


@pytest.fixture(scope="module")
def random_weights_file(random_inception_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(random_inception_state, path)
    return path


class PixelNet(torch.nn.Module):
    """A cheap stand-in for the Inception network: features = the pixels, logits = a fixed linear map of them.
    Asserts what the real network must receive: float32 RGB in [0, 1], autocast off, inference mode."""

    def __init__(self, n_pixels):
        super().__init__()
        self.head = torch.nn.Linear(n_pixels, 5)

    def forward(self, x):
        assert x.dtype == torch.float32 and x.shape[1] == 3 and 0 <= x.min() and x.max() <= 1
        assert torch.is_inference_mode_enabled() and not torch.is_autocast_enabled("cpu")
        flat = x.flatten(1)
        return flat, self.head(flat)


# ----------------------------------------------------------------------------------------------------------------
# Statistics and Fréchet distance
# ----------------------------------------------------------------------------------------------------------------
def test_feature_statistics_matches_numpy_and_keeps_type():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 7)) * 0.1 + 1e4  # large mean: the streaming algorithm must not cancel
    mu, sigma = metrics.feature_statistics(x)
    assert isinstance(mu, np.ndarray) and mu.dtype == np.float64 and sigma.shape == (7, 7)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-14)
    mu_t, sigma_t = metrics.feature_statistics(torch.from_numpy(x).float())
    assert torch.is_tensor(mu_t) and mu_t.dtype == torch.float64
    np.testing.assert_allclose(sigma_t.numpy(), np.cov(x.astype(np.float32), rowvar=False), rtol=1e-6, atol=1e-12)


def test_fid_unit_gaussians_shifted_by_one_is_d():
    d = 16
    assert metrics.frechet_distance(np.zeros(d), np.eye(d), np.ones(d), np.eye(d)) == pytest.approx(d, abs=1e-9)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((50000, 4)), rng.standard_normal((50000, 4)) + 1
    fid = metrics.frechet_distance(*metrics.feature_statistics(a), *metrics.feature_statistics(b))
    assert fid == pytest.approx(4, abs=0.05)


def test_fid_diagonal_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    v1, v2 = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("d, n1, n2", [(64, 300, 400),    # full rank
                                       (64, 30, 400),     # one covariance rank-deficient (29 < 64)
                                       (64, 30, 40)])     # both rank-deficient
def test_fid_matches_scipy_sqrtm_formula(d, n1, n2):
    rng = np.random.default_rng(d + n1 + n2)
    mu1, s1 = gaussian_stats(rng, d, n1)
    mu2, s2 = gaussian_stats(rng, d, n2, scale=1.1, shift=0.05)
    ours = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-6)
    assert metrics.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-10)  # symmetric


def test_fid_equals_pytorch_fid_function():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(3)
    mu1, s1 = gaussian_stats(rng, 64, 40)
    mu2, s2 = gaussian_stats(rng, 64, 300, shift=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)


def test_fid_rank_deficient_is_exact_and_never_nan():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((20, 50)), rng.standard_normal((30, 50)) + 0.3
    (mu1, s1), (mu2, s2) = metrics.feature_statistics(x), metrics.feature_statistics(y)
    # exact value through the data matrix: s1 = Xcᵀ Xc, so tr sqrtm(s1 s2) = Σ √eig(Xc s2 Xcᵀ). The rows of Xc sum
    # to 0, so Xc s2 Xcᵀ (20 x 20) has an exact zero eigenvalue along the ones vector, which LAPACK returns as
    # ±1e-16 and √ turns into ~1e-8: write Xc in an orthonormal basis of the complement of ones first (19 x 50),
    # leaving only genuinely positive eigenvalues. (This matches a 40-digit mpmath evaluation to 1e-16.)
    xc = (x - mu1) / math.sqrt(len(x) - 1)
    q = np.linalg.qr(np.column_stack([np.ones(len(x)), np.eye(len(x))[:, :-1]]))[0][:, 1:]  # (20, 19), ⊥ ones
    xr = q.T @ xc
    eig = np.linalg.eigvalsh(xr @ s2 @ xr.T)
    assert eig.min() > 1e-3 * eig.max()  # nothing at round-off level is left for √ to magnify
    exact = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum()
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-12)
    for sigma_a, sigma_b in [(s1, s1), (np.zeros((50, 50)), s2), (np.zeros((50, 50)), np.zeros((50, 50)))]:
        value = metrics.frechet_distance(mu1, sigma_a, mu1, sigma_b)
        assert math.isfinite(value) and value > -1e-9
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_fid_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(5)
    mu1, s1 = gaussian_stats(rng, 32, 100)
    mu2, s2 = gaussian_stats(rng, 32, 80, shift=0.2)
    ref = metrics.frechet_distance(mu1, s1, mu2, s2)
    as_t = [torch.from_numpy(v) for v in (mu1, s1, mu2, s2)]
    assert metrics.frechet_distance(*as_t) == pytest.approx(ref, rel=1e-12)
    assert metrics.frechet_distance(as_t[0], as_t[1], mu2, s2) == pytest.approx(ref, rel=1e-12)  # mixed
    with pytest.raises(ValueError):
        metrics.frechet_distance(mu1, s1, mu2[:5], s2)


# ----------------------------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------------------------
def test_inception_score_extremes():
    same = np.tile([0.2, 0.3, 0.5], (40, 1))
    assert metrics.inception_score(same, splits=4) == pytest.approx((1.0, 0.0), abs=1e-12)
    one_hot = np.eye(10)[np.tile(np.arange(10), 10)]  # every contiguous split of 10 holds each class once
    assert metrics.inception_score(one_hot, splits=10) == pytest.approx((10.0, 0.0), abs=1e-9)
    # the same predictions given as logits (auto-detected or explicit) give the same score
    logits = np.log(same) + 3.0
    assert metrics.inception_score(logits, splits=4) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert metrics.inception_score(torch.tensor(one_hot * 50.0), splits=10, from_logits=True)[0] == \
        pytest.approx(10.0, rel=1e-9)


def test_inception_score_hand_computed_two_splits():
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.9, 0.1], [0.9, 0.1]])
    # split 1: p(y) = (0.75, 0.25); KLs log(4/3) and 0.5·log(4/3) → exp(0.75·log(4/3)); split 2 is constant → 1
    s1, s2 = (4 / 3) ** 0.75, 1.0
    mean, std = metrics.inception_score(probs, splits=2)
    assert mean == pytest.approx((s1 + s2) / 2, rel=1e-12) and std == pytest.approx(abs(s1 - s2) / 2, rel=1e-12)
    with pytest.raises(ValueError):
        metrics.inception_score(probs, splits=5)


# ----------------------------------------------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------------------------------------------
def brute_force_unbiased_mmd2(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_mmd_estimator():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((8, 3)) + 0.5
    # one subset of the full smaller set (subset_size clipped to 6): a permutation of x, so exactly the estimator
    mean, std = metrics.kid(x, y[:6], subsets=1, subset_size=100)
    assert mean == pytest.approx(brute_force_unbiased_mmd2(x, y[:6]), rel=1e-10) and std == 0


def test_kid_near_zero_for_same_distribution_positive_for_shift():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((600, 16)), rng.standard_normal((600, 16))
    same, _ = metrics.kid(a, b, subsets=20, subset_size=200)
    shifted, _ = metrics.kid(a, b + 0.5, subsets=20, subset_size=200)
    assert shifted > 0.05 and abs(same) < 0.02 * shifted
    assert metrics.kid(a, b, subsets=5, subset_size=100, seed=3) == metrics.kid(a, b, subsets=5, subset_size=100, seed=3)


# ----------------------------------------------------------------------------------------------------------------
# Precision / recall / density / coverage
# ----------------------------------------------------------------------------------------------------------------
def brute_force_prdc(real, fake, k):
    """clovaai/generative-evaluation-prdc's compute_prdc with full distance matrices."""
    def dists(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_real = np.sort(dists(real, real), axis=1)[:, k]
    r_fake = np.sort(dists(fake, fake), axis=1)[:, k]
    d = dists(real, fake)
    return {"precision": (d < r_real[:, None]).any(0).mean(), "recall": (d < r_fake[None, :]).any(1).mean(),
            "density": (d < r_real[:, None]).sum(0).mean() / k, "coverage": (d.min(1) < r_real).mean()}


def test_prdc_matches_brute_force_with_small_blocks(monkeypatch):
    monkeypatch.setattr(metrics, "_BLOCK_ELEMS", 50)  # several blocks per pass
    rng = np.random.default_rng(8)
    real, fake = rng.standard_normal((60, 5)), rng.standard_normal((45, 5)) * 1.3 + 0.3
    ours = {**metrics.precision_recall(real, fake, k=3), **metrics.density_coverage(real, fake, k=3)}
    expected = brute_force_prdc(real, fake, k=3)
    assert 0 < ours["precision"] < 1 and 0 < ours["coverage"] < 1
    assert ours == pytest.approx(expected, abs=1e-12)


def test_prdc_identical_and_disjoint_sets():
    rng = np.random.default_rng(9)
    x = torch.from_numpy(rng.standard_normal((200, 8))).float()
    assert metrics.precision_recall(x, x, k=3) == {"precision": 1.0, "recall": 1.0}
    dc = metrics.density_coverage(x, x, k=5)
    assert dc["coverage"] == 1.0 and dc["density"] == pytest.approx(1.0, abs=0.01)
    far = x + 1000
    assert metrics.precision_recall(x, far, k=3) == {"precision": 0.0, "recall": 0.0}
    assert metrics.density_coverage(x, far, k=5) == {"density": 0.0, "coverage": 0.0}
    with pytest.raises(ValueError):
        metrics.precision_recall(x[:3], x, k=3)


# ----------------------------------------------------------------------------------------------------------------
# 2-D mixtures
# ----------------------------------------------------------------------------------------------------------------
def test_grid_centers():
    c = metrics.grid_centers(25, 2.0)
    assert c.shape == (25, 2) and np.allclose(c.mean(0), 0)
    assert np.allclose(np.unique(c[:, 0]), [-4, -2, 0, 2, 4]) and np.allclose(np.unique(c[:, 1]), [-4, -2, 0, 2, 4])
    gaps = np.sqrt(((c[:, None] - c[None]) ** 2).sum(-1)) + np.eye(25) * 1e9
    assert np.allclose(gaps.min(1), 2.0)
    assert metrics.grid_centers(1, 1.0).tolist() == [[0.0, 0.0]]
    for bad in (24, 0, -4):
        with pytest.raises(ValueError):
            metrics.grid_centers(bad, 1.0)


def test_mode_metrics_constructed_cases():
    centers = metrics.grid_centers(16, 2.0)
    std = 0.05
    perfect = metrics.mode_metrics(np.repeat(centers, 3, axis=0), centers, std)
    assert perfect["high_quality"] == 1 and perfect["modes_recovered"] == 1
    assert perfect["reverse_kl"] == pytest.approx(0, abs=1e-12) and perfect["counts"] == [3] * 16
    half = metrics.mode_metrics(torch.tensor(np.repeat(centers[:8], 5, axis=0)), torch.tensor(centers), std)
    assert half["modes_recovered"] == 0.5 and half["reverse_kl"] == pytest.approx(math.log(2), rel=1e-12)
    far = metrics.mode_metrics(centers + 0.5, centers, std)  # 10 std from every centre
    assert far["high_quality"] == 0 and far["modes_recovered"] == 0 and far["reverse_kl"] == pytest.approx(math.log(16))
    # the threshold is on distance to the nearest centre, in units of std
    edge = metrics.mode_metrics(centers[:2] + [[3.9 * std, 0], [4.1 * std, 0]], centers, std, threshold=4.0)
    assert edge["high_quality"] == 0.5 and edge["counts"][0] == 1 and sum(edge["counts"]) == 1
    # one collapsed mode plus some low-quality samples: KL(q||p) of the HQ histogram = log(16)
    collapsed = metrics.mode_metrics(np.vstack([np.repeat(centers[:1], 9, 0), centers + 0.5]), centers, std)
    assert collapsed["high_quality"] == pytest.approx(9 / 25) and collapsed["reverse_kl"] == pytest.approx(math.log(16))


# ----------------------------------------------------------------------------------------------------------------
# FID Inception network
# ----------------------------------------------------------------------------------------------------------------
def test_inception_equals_pytorch_fid_network(random_inception_state, monkeypatch):
    pf_inception = pytest.importorskip("pytorch_fid.inception")
    # pytorch-fid downloads its weights inside fid_inception_v3(); hand it the random state dict instead
    monkeypatch.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: random_inception_state)
    theirs = pf_inception.InceptionV3([3], use_fid_inception=True).eval()
    ours = metrics.FIDInceptionV3()
    ours.load_state_dict(random_inception_state)
    ours.eval()
    torch.manual_seed(1)
    with torch.inference_mode():
        for size in (64, 32):
            x = torch.rand(1, 3, size, size)
            pool3, logits = ours(x)
            expected = theirs(x)[0].flatten(1)
            assert pool3.shape == (1, 2048) and logits.shape == (1, 1008)
            assert expected.std() > 0.05  # the random network does not collapse: the comparison is meaningful
            assert (pool3 - expected).abs().max() <= 1e-5
            w, b = random_inception_state["fc.weight"], random_inception_state["fc.bias"]
            torch.testing.assert_close(logits, expected @ w.T, rtol=1e-5, atol=1e-5)  # bias-free logits
            assert (logits - (expected @ w.T + b)).abs().max() > 0.1


def test_load_inception_from_file_and_hub_cache(random_weights_file, tmp_path, monkeypatch):
    net = metrics.load_inception(weights_path=random_weights_file)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    # an existing torch.hub cache entry is used without network
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth").write_bytes(random_weights_file.read_bytes())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    cached = metrics.load_inception()
    torch.testing.assert_close(cached.fc.weight, net.fc.weight)


def test_load_inception_errors_are_clear(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as err:
        metrics.load_inception()
    message = str(err.value)
    assert "--fid-weights" in message and str(tmp_path / "empty_hub") in message and "\n" not in message
    with pytest.raises(UserError, match="no such file"):
        metrics.load_inception(weights_path=tmp_path / "missing.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        metrics.load_inception(weights_path=tmp_path / "corrupt.pth")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a state dict"):
        metrics.load_inception(weights_path=tmp_path / "other.pth")


# ----------------------------------------------------------------------------------------------------------------
# Image-level evaluation
# ----------------------------------------------------------------------------------------------------------------
def test_reference_statistics_caches_npz(tmp_path):
    rng = np.random.default_rng(10)
    images = torch.from_numpy(rng.integers(0, 256, (10, 3, 4, 4), dtype=np.uint8))
    cache = tmp_path / "stats" / "cifar_train.npz"
    mu, sigma = metrics.reference_statistics(images, PixelNet(48), cache_path=cache, batch_size=3)
    expected_mu, expected_sigma = metrics.feature_statistics((images.flatten(1).float() / 255).numpy())
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-9, atol=1e-14)
    with np.load(cache, allow_pickle=False) as f:  # pytorch-fid's format
        assert set(f.files) == {"mu", "sigma"} and f["sigma"].shape == (48, 48)
    assert not list(cache.parent.glob("*.tmp"))

    class MustNotRun(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the cache should have been used")

    mu2, sigma2 = metrics.reference_statistics(images, MustNotRun(), cache_path=cache)
    np.testing.assert_array_equal(mu2, mu) and np.testing.assert_array_equal(sigma2, sigma)
    cache.write_bytes(b"garbage")
    with pytest.raises(UserError, match="delete it"):
        metrics.reference_statistics(images, MustNotRun(), cache_path=cache)


def test_evaluate_generator_quantizes_like_saved_pngs():
    rng = np.random.default_rng(11)
    real = torch.from_numpy(rng.integers(0, 256, (12, 1, 4, 4), dtype=np.uint8))  # grayscale → repeated to RGB
    net = PixelNet(48)
    mu, sigma = metrics.reference_statistics(real, net, batch_size=5)
    as_tanh = real.float() / 255 * 2 - 1  # what a generator would output for exactly these PNGs

    def sampler(offset):
        state = {"next": 0}

        def sample_fn(n):
            out = as_tanh[state["next"]:state["next"] + n] + offset
            state["next"] += n
            return out
        return sample_fn

    with torch.autocast("cpu", dtype=torch.bfloat16):  # a training loop's AMP context must not leak into FID
        same = metrics.evaluate_generator(sampler(0.0), 12, mu, sigma, net, batch_size=5, is_splits=3)
    assert abs(same["fid"]) < 1e-9 and same["is_mean"] >= 1
    shifted = metrics.evaluate_generator(sampler(8 / 255), 12, mu, sigma, net, batch_size=5, is_splits=3)
    assert shifted["fid"] > 1e-3
    assert torch.equal(metrics._quantize(torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])),
                       torch.tensor([0, 0, 128, 255, 255], dtype=torch.uint8))


def test_evaluate_generator_with_random_inception(random_weights_file):
    net = metrics.load_inception(weights_path=random_weights_file)
    torch.manual_seed(2)
    real = (torch.rand(2, 3, 16, 16) * 255).to(torch.uint8)  # each image costs a full 299x299 forward: keep N tiny
    mu, sigma = metrics.reference_statistics(real, net, batch_size=2)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    out = metrics.evaluate_generator(lambda n: torch.rand(n, 1, 16, 16) * 2 - 1, 2, mu, sigma, net,
                                     batch_size=2, is_splits=2)
    assert set(out) == {"fid", "is_mean", "is_std"}
    assert all(math.isfinite(v) for v in out.values()) and out["fid"] > 0 and out["is_mean"] >= 1


def test_importing_the_scripts_and_metrics_does_not_import_torchvision():
    # torchvision costs seconds at every interpreter start; only image grids and the Inception network need it
    code = ("import sys, metrics, mog_topk, dcgan_cifar_topk, improved_gan_mnist, improved_gan_cifar; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
