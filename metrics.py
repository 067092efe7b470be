"""Evaluation metrics for the GAN experiments: pure functions plus the FID Inception network.

API (numpy arrays or torch tensors are accepted wherever features/statistics are expected)

    Gaussian statistics and FID
        feature_statistics(features) -> (mu, sigma)          float64 mean and covariance (rowvar=False)
        frechet_distance(mu1, sigma1, mu2, sigma2) -> float  Fréchet distance of two Gaussians
    Inception Score, KID, manifold metrics (on any features)
        inception_score(probs_or_logits, splits=10, from_logits=None) -> (mean, std)
        kid(feats_a, feats_b, subsets=100, subset_size=1000, seed=0) -> (mean, std)
        precision_recall(real, fake, k=3) -> {"precision", "recall"}
        density_coverage(real, fake, k=5) -> {"density", "coverage"}
    2-D Gaussian mixtures
        grid_centers(n_modes, spacing) -> (n_modes, 2) array
        mode_metrics(samples, centers, std, threshold=4.0)
            -> {"high_quality", "modes_recovered", "reverse_kl", "counts"}
    FID Inception network and image-level evaluation
        FIDInceptionV3, load_inception(weights_path=None, device="cpu")  (torchvision is imported at the first)
        reference_statistics(images_uint8, inception, cache_path=None, batch_size=100, device=None) -> (mu, sigma)
        evaluate_generator(sample_fn, n_samples, ref_mu, ref_sigma, inception, ...) -> {"fid", "is_mean", "is_std"}

Where each definition comes from
    FID         Heusel et al. 2017 (TTUR); values equal pytorch-fid's `calculate_frechet_distance`
                (mseitzer/pytorch-fid, `fid_score.py`) but tr(sqrtm(Σ1Σ2)) is computed with symmetric
                eigendecompositions instead of `scipy.linalg.sqrtm` (faster, exact for rank-deficient covariances,
                runs on the GPU).
    Inception   pytorch-fid's port of the TF graph used by TTUR (`inception.py`: FIDInceptionA/C/E blocks,
                1008-class fc, weights `pt_inception-2015-12-05-6726825d.pth`), bilinear resize to 299
                (align_corners=False) and input scaling 2x-1 from [0, 1]; features are bit-for-bit the same
                computation as pytorch-fid's.
    IS          Salimans et al. 2016, openai/improved-gan `inception_score/model.py`: softmax of `pool3 @ W`
                WITHOUT the fc bias (torch-fidelity calls these 'logits_unbiased'), 10 contiguous splits,
                exp(mean KL(p(y|x)||p(y))).
    KID         Bińkowski et al. 2018; unbiased MMD² with the cubic kernel (x·y/d + 1)³ averaged over random subsets,
                as torch-fidelity's `metric_kid.py` (same subset draws for the same seed).
    P/R, D/C    Kynkäänniemi et al. 2019 (precision/recall) and Naeem et al. 2020 (density/coverage), computed as in
                clovaai/generative-evaluation-prdc (strict `<` against k-NN radii that exclude the point itself).
    Modes       2-D grid mixtures as in VEEGAN (Srivastava et al. 2017) / PacGAN (Lin et al. 2018): high-quality
                samples, recovered modes and the reverse KL of the mode histogram to the uniform one.

Precision: Inception features are always computed in float32 with autocast disabled (the scripts' `--amp` never
applies to FID); statistics, Fréchet distance and IS use float64. On Ampere+ GPUs PyTorch runs float32
convolutions in TF32 unless `torch.backends.cudnn.allow_tf32` is False; the Inception pass runs with PyTorch's
default flags, as pytorch-fid does (TF32 off for matrix products, cuDNN's default for convolutions), whatever the
training code set, and restores them after.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, write_atomically

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_DIMS = 2048          # pool3 feature size
INCEPTION_CLASSES = 1008  # the TF graph's softmax has 1008 outputs (1000 ImageNet classes + unused ones)

# Largest number of entries of one pairwise-distance block (64 MiB in float32): bounds the memory of the k-NN
# metrics, so 10k x 10k pairs of 2048-d features never materialise a full distance matrix.
_BLOCK_ELEMS = 1 << 24


# ----------------------------------------------------------------------------------------------------------------
# Conversions
# ----------------------------------------------------------------------------------------------------------------
def _as_tensor(x, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """A torch tensor from a numpy array / tensor / sequence; `dtype`/`device` None keep the input's (CPU for numpy)."""
    if not torch.is_tensor(x):
        x = torch.as_tensor(np.asarray(x))
    return x.to(device=device, dtype=dtype)


def _first_device(*values) -> torch.device:
    """The device of the first torch tensor among `values` (CPU when they are all numpy)."""
    return next((v.device for v in values if torch.is_tensor(v)), torch.device("cpu"))


def _float_pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (n, d) feature sets as tensors on `a`'s device, both float64 if either is, else float32."""
    a, b = _as_tensor(a), _as_tensor(b)
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    a, b = a.to(dtype), b.to(device=a.device, dtype=dtype)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (n, d) feature arrays with the same d, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return a, b


# ----------------------------------------------------------------------------------------------------------------
# Gaussian statistics and the Fréchet distance
# ----------------------------------------------------------------------------------------------------------------
class _MomentAccumulator:
    """Running mean and covariance of feature rows, in float64 on the features' device.

    Streaming lets the image evaluation keep a (d, d) matrix instead of all N x d features. Rows are shifted by the
    first batch's mean before their moments are summed ("shifted data" algorithm), so cov = (Σ yyᵀ - n ȳȳᵀ)/(n-1)
    does not cancel catastrophically when the mean is large compared with the spread; for a single batch this is
    the two-pass formula of `np.cov`.
    """

    def __init__(self):
        self.n = 0
        self.shift = self.sum = self.outer = None

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of `x`, (B, d) float tensor."""
        x = x.to(torch.float64)
        if self.n == 0:
            self.shift = x.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        y = x - self.shift
        self.sum += y.sum(0)
        self.outer.addmm_(y.T, y)
        self.n += x.shape[0]

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu (d,), sigma (d, d)) float64 tensors; sigma is the unbiased (n-1) covariance, like np.cov."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        mean_y = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mean_y, mean_y)) / (self.n - 1)
        return self.shift + mean_y, (cov + cov.T) / 2  # exact symmetry; gemm leaves rounding asymmetries


def feature_statistics(features):
    """Mean and covariance of features, as pytorch-fid's `calculate_activation_statistics`.

    features: (N, d) numpy array or tensor, N >= 2.
    Returns (mu (d,), sigma (d, d)) in float64 (np.mean / np.cov(rowvar=False) semantics), as numpy arrays for a
    numpy input and as tensors on the input's device for a tensor input.
    """
    x = _as_tensor(features)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, d), got shape {tuple(x.shape)}")
    acc = _MomentAccumulator()
    for chunk in x.split(4096):  # bounds the float64 copy for large N
        acc.update(chunk)
    mu, sigma = acc.finalize()
    if torch.is_tensor(features):
        return mu, sigma
    return mu.cpu().numpy(), sigma.cpu().numpy()


def _trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """tr(sqrtm(Σ1 Σ2)) for symmetric PSD (d, d) float64 tensors; a 0-d tensor.

    For any factor F with Σ1 = F Fᵀ, Σ1Σ2 = F (Fᵀ Σ2) has the same non-zero eigenvalues as the symmetric PSD matrix
    Fᵀ Σ2 F, so tr(sqrtm(Σ1Σ2)) = Σ √eig(Fᵀ Σ2 F). With F = V diag(√w) from Σ1 = V diag(w) Vᵀ this matrix is
    √Σ1 Σ2 √Σ1 written in Σ1's eigenbasis. When Σ1 is positive definite (more samples than dimensions, the usual
    case) its Cholesky factor is used as F instead: it costs a small fraction of an eigendecomposition (2048-d
    on 2 CPU cores: 1.7 s instead of 2.1 s for the whole distance). Eigenvalues at round-off level
    (rank-deficient covariances, from fewer samples than dimensions; tiny negatives) are set to 0 in both
    decompositions; for Σ1 this drops their directions, which also shrinks the second eigenproblem to
    rank(Σ1) x rank(Σ1).
    """
    f, not_pd = torch.linalg.cholesky_ex(sigma1)
    if not_pd:
        w, v = torch.linalg.eigh(sigma1)
        keep = w > _noise_floor(w)
        if not keep.any():  # Σ1 = 0
            return w.new_zeros(())
        f = v[:, keep] * w[keep].sqrt()
    m = f.T @ sigma2 @ f
    eig = torch.linalg.eigvalsh((m + m.T) / 2)
    return eig[eig > _noise_floor(eig)].sqrt().sum()


def _noise_floor(eigenvalues: torch.Tensor) -> torch.Tensor:
    """√n·eps·max|λ|, the round-off level of the eigenvalues of a symmetric n x n matrix (the probabilistic form of
    LAPACK's n·eps·‖A‖ bound; the "zeros" of rank-deficient covariances measure 1-5 eps·max|λ| for n ≤ 2048).
    Eigenvalues below it are set to 0: √ magnifies them, and a few hundred √(1e-15) terms would add ~1e-5 to the
    trace. A tighter floor than n·eps keeps genuine tiny eigenvalues of strongly anisotropic covariances."""
    n = eigenvalues.numel()
    return eigenvalues.abs().max() * math.sqrt(n) * torch.finfo(eigenvalues.dtype).eps


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance ||mu1 - mu2||² + tr(Σ1 + Σ2 - 2 sqrtm(Σ1Σ2)) between N(mu1, Σ1) and N(mu2, Σ2).

    mu: (d,), sigma: (d, d) symmetric PSD; numpy arrays or tensors (mixed is fine). Computed in float64 on the device
    of the first tensor argument (CPU for numpy): give CUDA tensors to run the eigendecompositions on the GPU.
    Returns a Python float equal to pytorch-fid's `calculate_frechet_distance` (scipy.linalg.sqrtm) within 1e-6
    relative: ~1e-12 to 1e-9 for full-rank covariances, ~1e-7 for rank-deficient ones (fewer samples than
    dimensions), where
    this route is the more accurate one (it matches the exact value computed through the data matrix to ~1e-15,
    sqrtm of the singular product does not). Symmetric in the two Gaussians up to round-off, never NaN for finite
    PSD inputs; identical inputs give ~±1e-12 rather than 0 (not clamped, to stay comparable with pytorch-fid).
    """
    device = _first_device(mu1, sigma1, mu2, sigma2)
    mu1, sigma1, mu2, sigma2 = (_as_tensor(v, torch.float64, device) for v in (mu1, sigma1, mu2, sigma2))
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu1 {tuple(mu1.shape)}, sigma1 {tuple(sigma1.shape)}, "
                         f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)}")
    if not all(bool(torch.isfinite(v).all()) for v in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("Gaussian statistics contain NaN or inf")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2  # eigh reads one triangle only
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * _trace_sqrt_product(sigma1, sigma2))


# ----------------------------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------------------------
def inception_score(probs_or_logits, splits: int = 10, from_logits: bool | None = None) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))), as openai/improved-gan `inception_score/model.py`.

    probs_or_logits: (N, C) class probabilities or logits (numpy or tensor). For the original IS these are the
        1008-way softmax of the bias-free logits `pool3 @ W` that `FIDInceptionV3` returns.
    splits: the N rows are cut into `splits` contiguous parts [i·N//splits, (i+1)·N//splits); p(y) is each part's
        mean prediction. Needs N >= splits.
    from_logits: True = rows are logits (softmax applied), False = rows are probabilities; None (default) detects:
        rows that are nonnegative and sum to 1 (±1e-3) are probabilities, anything else is logits.
    Returns (mean, std) over the splits as Python floats (std is the population std, np.std, like the original).
    Computed in float64 with 0·log 0 = 0, so one-hot predictions are fine: identical predictions give 1, balanced
    one-hot predictions over C classes give C.
    """
    x = _as_tensor(probs_or_logits, torch.float64)
    if x.ndim != 2:
        raise ValueError(f"expected (N, classes), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be between 1 and the number of samples {n}, got {splits}")
    if from_logits is None:
        from_logits = not (bool((x >= 0).all()) and bool(torch.allclose(x.sum(1), torch.ones_like(x[:, 0]), atol=1e-3)))
    p = torch.softmax(x, dim=1) if from_logits else x
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        marginal = part.mean(0, keepdim=True)
        # KL(p(y|x) || p(y)) per row; xlogy gives 0·log 0 = 0 where a class has zero probability
        kl = (torch.xlogy(part, part) - torch.xlogy(part, marginal)).sum(1)
        scores.append(math.exp(float(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------------------------
# Kernel Inception Distance
# ----------------------------------------------------------------------------------------------------------------
def _mmd2_unbiased_cubic(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² of two (m, d) samples with the kernel k(a, b) = (a·b/d + 1)³.

    The within-set sums drop the diagonal (k(x_i, x_i) is not an independent pair); the cross term keeps all m²
    pairs (Bińkowski et al. 2018, eq. 2; torch-fidelity's mmd_est="unbiased").
    """
    m, d = x.shape

    def kernel(a, b):
        return ((a @ b.T) / d + 1).pow(3).to(torch.float64)  # products in the features' dtype, sums in float64

    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def kid(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the unbiased cubic-kernel MMD² over random subsets.

    feats_a: (Na, d), feats_b: (Nb, d) features (numpy or tensors; computed on feats_a's device).
    subset_size is clipped to min(Na, Nb) (and must end up >= 2); each of the `subsets` draws takes subset_size rows
    of each set without replacement from np.random.RandomState(seed), a then b, the draws torch-fidelity makes
    (its default seed is 2020). Returns (mean, std) as Python floats; KID can be slightly negative for identical
    distributions (it is unbiased). Usually reported x 1000.
    """
    a, b = _float_pair(feats_a, feats_b)
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2 or subsets < 1:
        raise ValueError(f"KID needs subset_size >= 2 and subsets >= 1 (got subset size {m}, {subsets} subsets)")
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        ia = torch.from_numpy(rng.choice(a.shape[0], m, replace=False)).to(a.device)
        ib = torch.from_numpy(rng.choice(b.shape[0], m, replace=False)).to(a.device)
        values.append(_mmd2_unbiased_cubic(a[ia], b[ib]))
    return float(np.mean(values)), float(np.std(values))


# ----------------------------------------------------------------------------------------------------------------
# k-NN manifold metrics: precision/recall and density/coverage
# ----------------------------------------------------------------------------------------------------------------
def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) squared Euclidean distances via |a|² + |b|² - 2a·b (one matmul), clamped at 0."""
    return ((a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2 * (a @ b.T)).clamp_min_(0)


def _dist_blocks(a: torch.Tensor, b: torch.Tensor):
    """Yield (start, block) with block = _sq_dists(a[start:start+r], b), r rows chosen to stay under _BLOCK_ELEMS."""
    rows = max(1, _BLOCK_ELEMS // max(1, b.shape[0]))
    for start in range(0, a.shape[0], rows):
        yield start, _sq_dists(a[start:start + rows], b)


def _knn_sq_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) squared distance from each row of x to its k-th nearest neighbour in x, the point itself excluded."""
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k must be between 1 and the number of samples - 1 = {x.shape[0] - 1}, got {k}")
    # k+1 smallest: the point itself (distance 0) comes first, then its k nearest others
    return torch.cat([block.topk(k + 1, dim=1, largest=False).values[:, -1] for _, block in _dist_blocks(x, x)])


def _centred_pair(real, fake) -> tuple[torch.Tensor, torch.Tensor]:
    """Both feature sets shifted by the real mean: distances are unchanged, and the |a|²+|b|²-2a·b expansion loses
    far less precision on small norms (Inception features have a large common mean)."""
    real, fake = _float_pair(real, fake)
    centre = real.mean(0)
    return real - centre, fake - centre


def precision_recall(real, fake, k: int = 3) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    real: (Nr, d), fake: (Nf, d) features (numpy or tensors; computed on real's device in float32, or float64 if an
    input is float64). Each point's manifold ball has radius = distance to its k-th nearest neighbour in its own
    set (itself excluded). precision = fraction of fakes inside at least one real ball; recall = fraction of reals
    inside at least one fake ball. Strict `<` as clovaai/generative-evaluation-prdc (the original uses `<=`; they
    differ only on exact ties). Distances are computed in blocks: memory O(block), not O(Nr·Nf).
    Returns {"precision": float, "recall": float}.
    """
    real, fake = _centred_pair(real, fake)
    r_real, r_fake = _knn_sq_radius(real, k), _knn_sq_radius(fake, k)
    fake_in_real = torch.cat([(block < r_real).any(1) for _, block in _dist_blocks(fake, real)])
    real_in_fake = torch.cat([(block < r_fake).any(1) for _, block in _dist_blocks(real, fake)])
    return {"precision": float(fake_in_real.double().mean()), "recall": float(real_in_fake.double().mean())}


def density_coverage(real, fake, k: int = 5) -> dict:
    """Density and coverage (Naeem et al. 2020), as clovaai/generative-evaluation-prdc.

    real: (Nr, d), fake: (Nf, d) features (as in `precision_recall`). With real k-NN balls (radius = distance to the
    k-th nearest other real point): density = (1/k)·mean over fakes of the number of real balls containing it
    (≈1 when both sets come from the same distribution; unbounded above); coverage = fraction of real points whose
    ball contains at least one fake. Strict `<`, blocked distances. Returns {"density": float, "coverage": float}.
    """
    real, fake = _centred_pair(real, fake)
    r_real = _knn_sq_radius(real, k)
    balls_hit = sum(int((block < r_real).sum()) for _, block in _dist_blocks(fake, real))
    covered = torch.cat([block.min(1).values < r_real[start:start + block.shape[0]]
                         for start, block in _dist_blocks(real, fake)])
    return {"density": balls_hit / (k * fake.shape[0]), "coverage": float(covered.double().mean())}


# ----------------------------------------------------------------------------------------------------------------
# 2-D Gaussian mixtures
# ----------------------------------------------------------------------------------------------------------------
def grid_centers(n_modes: int, spacing: float) -> np.ndarray:
    """(n_modes, 2) float64 centres of a square grid with `spacing` between neighbours, centred at the origin.

    n_modes must be a perfect square (25 → 5 x 5 grid at -2s, -s, 0, s, 2s); rows run over x first, then y.
    Raises ValueError otherwise or for spacing <= 0.
    """
    side = math.isqrt(max(n_modes, 0))
    if n_modes < 1 or side * side != n_modes:
        raise ValueError(f"n_modes must be a positive perfect square for a square grid, got {n_modes}")
    if spacing <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    axis = (np.arange(side) - (side - 1) / 2) * spacing
    xs, ys = np.meshgrid(axis, axis, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def mode_metrics(samples, centers, std: float, threshold: float = 4.0) -> dict:
    """Mode-coverage metrics of 2-D samples from a Gaussian-mixture GAN.

    samples: (N, 2), centers: (M, 2) (numpy or tensors); std: the mixture components' standard deviation.
    Each sample is assigned to its nearest centre; it is high quality (HQ) when within threshold·std of it
    (VEEGAN / PacGAN use 3 std; the default here is 4).
    Returns a dict:
        high_quality     fraction of samples that are HQ, in [0, 1];
        modes_recovered  fraction of centres that are the nearest centre of at least one HQ sample, in [0, 1];
        reverse_kl       KL(q || p) = Σ_i q_i log(q_i / p_i) in nats, with q_i = (HQ samples of mode i) / (HQ samples),
                         p_i = 1/M uniform, and 0·log 0 = 0: finite when modes are missing (M/2 equally filled
                         modes give log 2), 0 for a perfectly balanced cover, at most log M (all HQ samples in one
                         mode). With no HQ sample q is undefined and we return log M, the value of the worst
                         collapse, so the metric stays finite and monotone in quality;
        counts           list of M ints, HQ samples per mode.
    """
    x, c = _as_tensor(samples, torch.float64, "cpu"), _as_tensor(centers, torch.float64, "cpu")
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1] or x.shape[0] == 0:
        raise ValueError(f"expected (N, 2) samples and (M, 2) centres, got {tuple(x.shape)} and {tuple(c.shape)}")
    n_modes = c.shape[0]
    nearest_d2, nearest = _sq_dists(x, c).min(1)
    hq = nearest_d2 <= (threshold * std) ** 2
    counts = torch.bincount(nearest[hq], minlength=n_modes)
    n_hq = int(counts.sum())
    if n_hq == 0:
        reverse_kl = math.log(n_modes)
    else:
        q = counts.double() / n_hq
        reverse_kl = float(torch.xlogy(q, q * n_modes).sum())
    return {"high_quality": float(hq.double().mean()), "modes_recovered": float((counts > 0).double().mean()),
            "reverse_kl": reverse_kl, "counts": counts.tolist()}


# ----------------------------------------------------------------------------------------------------------------
# The FID Inception network (pytorch-fid's port of the TF graph used by TTUR and the original IS)
# ----------------------------------------------------------------------------------------------------------------
def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3/1 average pool that, like TensorFlow's, leaves the zero padding out of the average."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


@functools.cache
def _inception_blocks() -> SimpleNamespace:
    """torchvision's Inception-v3 blocks, with FIDInceptionA/C/E: the FID graph's variants. Built at the first
    Inception network, so importing this module (mog_topk.py's mode metrics) does not import torchvision (~2 s)."""
    from torchvision.models import inception as tv

    class FIDInceptionA(tv.InceptionA):
        """torchvision's InceptionA with TF's average pooling (the only difference in the FID graph)."""

        def forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)

    class FIDInceptionC(tv.InceptionC):
        """torchvision's InceptionC with TF's average pooling."""

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = self.branch7x7dbl_1(x)
            for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
                bd = layer(bd)
            return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)

    class FIDInceptionE(tv.InceptionE):
        """torchvision's InceptionE with the FID graph's pooling: TF average pooling in Mixed_7b (`pool="avg"`) and
        max pooling in Mixed_7c (`pool="max"`; a quirk of the 2015 TF graph that FID inherited)."""

        def __init__(self, in_channels: int, pool: str):
            super().__init__(in_channels)
            if pool not in ("avg", "max"):
                raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
            self.pool = pool

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)

    return SimpleNamespace(BasicConv2d=tv.BasicConv2d, InceptionB=tv.InceptionB, InceptionD=tv.InceptionD,
                           FIDInceptionA=FIDInceptionA, FIDInceptionC=FIDInceptionC, FIDInceptionE=FIDInceptionE)


class FIDInceptionV3(nn.Module):
    """The Inception-v3 graph of FID (TTUR) and the original Inception Score, as ported by pytorch-fid.

    Module names match torchvision's Inception3 (aux_logits=False, 1008 classes), so pytorch-fid's weight file
    `pt_inception-2015-12-05-6726825d.pth` loads strictly. Use `load_inception` to get a ready network.

    forward(x): x (N, 3, H, W) float32 in [0, 1], any H, W (bilinearly resized to 299 x 299, align_corners=False,
    then scaled to [-1, 1]). Returns (pool3, logits): pool3 (N, 2048) float32, the FID/KID features; logits
    (N, 1008) float32 = pool3 @ fc.weightᵀ WITHOUT fc.bias, whose softmax is the original IS's p(y|x).
    """

    def __init__(self):
        super().__init__()
        b = _inception_blocks()
        self.Conv2d_1a_3x3 = b.BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = b.BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = b.BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = b.BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = b.BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = b.FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = b.FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = b.FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = b.InceptionB(288)
        self.Mixed_6b = b.FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = b.FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = b.FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = b.FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = b.InceptionD(768)
        self.Mixed_7b = b.FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = b.FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(FID_DIMS, INCEPTION_CLASSES)  # the bias is part of the weight file but unused (see IS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool3 = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return pool3, pool3 @ self.fc.weight.T


def _hub_state_dict() -> dict:
    """pytorch-fid's weights from the torch.hub cache, downloading (hash-checked) when missing; UserError offline."""
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    try:
        return torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", progress=True,
                                                  check_hash=True, weights_only=True)
    except Exception as e:  # urllib/http/hash errors all mean the same thing to the user: no weights
        reason = " ".join(str(e).split())[:120]
        raise UserError(
            f"FID Inception weights unavailable ({type(e).__name__}: {reason}). "
            f"Either pass --fid-weights PATH (weights_path=PATH) to a copy of {os.path.basename(FID_WEIGHTS_URL)}, "
            f"or put that file into the torch hub cache {cache}/ (download {FID_WEIGHTS_URL} on a machine with "
            f"internet access); --no-fid skips FID") from None


def load_inception(weights_path: str | os.PathLike | None = None, device="cpu") -> FIDInceptionV3:
    """The FID Inception network with pytorch-fid's weights, in eval mode, without gradients, on `device`.

    weights_path: a local copy of pt_inception-2015-12-05-6726825d.pth (the scripts' `--fid-weights PATH`), or any
        state dict of an `FIDInceptionV3` (tests use random ones). None: the torch.hub cache
        (<torch hub dir>/checkpoints/), downloaded from pytorch-fid's release with its hash checked when missing.
    Files are read with torch.load(weights_only=True). Raises common.UserError (one clear line) when the file is
    missing or unreadable, or when there is no path, no cached copy and no network.
    """
    if weights_path is None:
        state = _hub_state_dict()
        source = f"the torch hub copy of {FID_WEIGHTS_URL}"
    else:
        source = f"--fid-weights {weights_path}"
        if not os.path.isfile(weights_path):
            raise UserError(f"{source}: no such file")
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for corrupt files (pickle, zip, runtime)
            raise UserError(f"{source}: cannot be read ({type(e).__name__})") from None
    net = FIDInceptionV3()
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError):
        raise UserError(f"{source} is not a state dict of the FID Inception network "
                        f"({os.path.basename(FID_WEIGHTS_URL)})") from None
    return net.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Image-level evaluation: streaming Inception passes, cached reference statistics, generator FID/IS
# ----------------------------------------------------------------------------------------------------------------
def _module_device(module) -> torch.device:
    """Device of a module's first parameter (CPU for a parameter-less callable)."""
    params = module.parameters() if isinstance(module, nn.Module) else iter(())
    return next((p.device for p in params), torch.device("cpu"))


def _quantize(images: torch.Tensor) -> torch.Tensor:
    """Generator outputs in [-1, 1], (N, C, H, W) float → uint8, exactly as torchvision's save_image(normalize=True,
    value_range=(-1, 1)) writes PNGs: clamp, map to [0, 1], x·255 + 0.5, truncate. NaN/inf are not checked here
    (see evaluate_generator, which checks once for the whole stream)."""
    unit = (images.float().clamp(-1, 1) + 1) / 2
    return unit.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


@contextlib.contextmanager
def _pytorch_fid_precision():
    """Within the block, the float32 settings pytorch-fid runs with (PyTorch's defaults): no TF32 in matrix
    products (the Inception fc layer, hence the IS logits), cuDNN's default for convolutions; restored after. The
    scripts turn TF32 products on for training speed, which must not reach FID or IS."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _inception_pass(batches, inception, device, keep_logits: bool):
    """Run uint8 image batches through `inception` and accumulate pool3 statistics.

    batches: iterable of (B, C, H, W) uint8 tensors, C in {1, 3} (grayscale is repeated to RGB, as PIL's
    convert("RGB") does for pytorch-fid on saved PNGs). Pixels enter the network as uint8/255 in float32, with
    autocast disabled and under torch.inference_mode. Returns (mu, sigma) float64 tensors on `device`, and the
    (N, 1008) float32 CPU logits when keep_logits (else None). Nothing is read back to the host per batch: the
    logits stay on `device` until the end (one copy), so a GPU pass never waits on the host.
    """
    acc, logits = _MomentAccumulator(), []
    with torch.inference_mode(), torch.autocast(torch.device(device).type, enabled=False), _pytorch_fid_precision():
        for images in batches:
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
                raise ValueError(f"expected (N, 1 or 3, H, W) uint8 images, got {images.dtype} {tuple(images.shape)}")
            x = images.to(device).float().div_(255).expand(-1, 3, -1, -1)
            pool3, batch_logits = inception(x)
            acc.update(pool3)
            if keep_logits:
                logits.append(batch_logits.float())
    mu, sigma = acc.finalize()
    return mu, sigma, (torch.cat(logits).cpu() if keep_logits else None)


def _load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a pytorch-fid-style .npz; UserError when it is unreadable or malformed."""
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = f["mu"], f["sigma"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"FID statistics file {path} is unreadable ({type(e).__name__}); "
                        f"delete it to recompute") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"FID statistics file {path} has mu {mu.shape} and sigma {sigma.shape}; delete it to recompute")
    return mu.astype(np.float64), sigma.astype(np.float64)


def reference_statistics(images_uint8, inception, cache_path: str | os.PathLike | None = None,
                         batch_size: int = 100, device=None) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics of a real dataset, computed once and cached.

    images_uint8: (N, C, H, W) uint8 tensor or numpy array (NCHW, C = 1 or 3), e.g. the CIFAR-10 training set.
    inception: an `FIDInceptionV3` (from `load_inception`), already on `device`.
    cache_path: .npz path with keys mu, sigma (pytorch-fid's format: `python -m pytorch_fid cache.npz dir` reads it).
        When the file exists it is loaded (np.load, allow_pickle=False) and the images are not looked at, so use one
        path per dataset/split; otherwise the statistics are computed and written atomically. None: no caching.
    batch_size: images per Inception forward; device: None = the network's device.
    Returns (mu (2048,), sigma (2048, 2048)) float64 numpy arrays.
    """
    if cache_path is not None and os.path.exists(cache_path):
        return _load_stats(os.fspath(cache_path))
    images = _as_tensor(images_uint8)
    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"expected (N >= 2, C, H, W) uint8 images, got shape {tuple(images.shape)}")
    device = _module_device(inception) if device is None else torch.device(device)
    mu, sigma, _ = _inception_pass(images.split(batch_size), inception, device, keep_logits=False)
    mu, sigma = mu.cpu().numpy(), sigma.cpu().numpy()
    if cache_path is not None:  # atomic, so an interrupted run never leaves a torn cache
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        write_atomically(cache_path, lambda f: np.savez(f, mu=mu, sigma=sigma))  # a file: no ".npz" appended
    return mu, sigma


def training_set_statistics(images_uint8, inception, data_dir, dataset: str, weights_path=None,
                            batch_size: int = 100, device=None) -> tuple[np.ndarray, np.ndarray]:
    """FID reference statistics of a training set, cached as <data_dir>/fid_stats_<dataset>_train[_<hash>].npz.

    The suffix is the first 10 hex digits of the sha256 of `weights_path` (none for the default pytorch-fid
    weights), so statistics made with other Inception weights are never mixed up. dataset "fake" (random smoke-test
    images) is never cached: its statistics are of the images themselves, and the numbers mean nothing."""
    cache = None
    if dataset != "fake":
        tag = ""
        if weights_path is not None:
            h = hashlib.sha256()
            with open(weights_path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            tag = "_" + h.hexdigest()[:10]
        cache = Path(data_dir) / f"fid_stats_{dataset}_train{tag}.npz"
    return reference_statistics(images_uint8, inception, cache, batch_size, device)


def evaluate_generator(sample_fn, n_samples: int, ref_mu, ref_sigma, inception, batch_size: int = 100,
                       device=None, is_splits: int = 10) -> dict:
    """FID against reference statistics and Inception Score of `n_samples` generated images, streamed in batches.

    sample_fn(n) -> (n, C, H, W) float tensor in [-1, 1] (tanh outputs), C = 1 (repeated to RGB) or 3. It draws its
        own noise and is called under torch.inference_mode; put the generator in eval mode first if that is wanted.
    Images are quantized to uint8 exactly as saved PNGs (`_quantize`), so the numbers equal pytorch-fid / TTUR run on
    the saved images. Only the (2048, 2048) running moments and the (n_samples, 1008) logits are kept (200 MB for
    50k), never the images. Inception runs in float32 on `device` (None = the network's device); FID is computed
    there in float64 against ref_mu / ref_sigma (numpy or tensors, e.g. from `reference_statistics`).
    Returns {"fid": float, "is_mean": float, "is_std": float} (IS over `is_splits` contiguous splits).
    """
    if n_samples < max(2, is_splits):
        raise ValueError(f"n_samples must be at least max(2, is_splits={is_splits}), got {n_samples}")
    device = _module_device(inception) if device is None else torch.device(device)
    all_finite = torch.ones((), dtype=torch.bool, device=device)  # checked once at the end, not per batch

    def batches():
        nonlocal all_finite
        for start in range(0, n_samples, batch_size):
            n = min(batch_size, n_samples - start)
            images = sample_fn(n)
            if images.ndim != 4 or images.shape[0] != n:
                raise ValueError(f"sample_fn({n}) must return (n, C, H, W), got shape {tuple(images.shape)}")
            all_finite = all_finite & torch.isfinite(images).all().to(device)
            yield _quantize(images)

    mu, sigma, logits = _inception_pass(batches(), inception, device, keep_logits=True)
    if not bool(all_finite):
        raise ValueError("generated images contain NaN or inf")
    is_mean, is_std = inception_score(logits, splits=is_splits, from_logits=True)
    return {"fid": frechet_distance(mu, sigma, ref_mu, ref_sigma), "is_mean": is_mean, "is_std": is_std}
