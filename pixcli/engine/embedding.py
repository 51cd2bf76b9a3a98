"""Pixel-feature embeddings: class-balanced pixel samples, cluster indices, t-SNE.

What ``pixcli embed-report`` measures, as pure functions on numpy arrays:

- :func:`labels_on_grid` brings a full-resolution label map to the model's output grid.
  Labels go down to the features, not features up to the labels: upsampled features are
  interpolations the model never produced (mixtures across class boundaries) and ``stride^2``
  near-copies of each real feature. Each grid cell takes the label at its centre.
- :class:`ClassBudgetSampler` keeps a uniform random sample of at most ``per_class`` pixels of
  every class over a stream of images, so rare classes are seen as well as frequent ones.
- :func:`cluster_scores`: Calinski-Harabasz and Davies-Bouldin on the full-dimensional
  features, the silhouette on a random subset (it is quadratic in the number of points).
- :func:`tsne_2d`: a 2-D t-SNE embedding (scikit-learn, Barnes-Hut) for the pictures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

from pixcli.data.taxonomy import IGNORE_INDEX


def labels_on_grid(label: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resample of an ``H x W`` label map to ``grid`` = (h, w).

    Grid cell ``(i, j)`` covers rows ``[i H/h, (i+1) H/h)`` and takes the label of the pixel
    at its centre (as ``align_corners=False`` maps cells to pixels elsewhere in pixcli).
    """
    big_h, big_w = label.shape
    h, w = grid
    rows = np.minimum(((np.arange(h) + 0.5) * big_h / h).astype(np.int64), big_h - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * big_w / w).astype(np.int64), big_w - 1)
    return label[np.ix_(rows, cols)]


class ClassBudgetSampler:
    """At most ``per_class`` pixels of every class, uniformly sampled over many images.

    Bottom-k sampling: every pixel gets a random key and each class keeps the pixels with
    the ``per_class`` smallest keys seen so far, which is a uniform sample without
    replacement of all that class's pixels, kept in ``C x per_class x D`` memory. The keys
    of image ``i`` come from a generator seeded with ``(seed, i)``: the same seed gives the
    same sample, and two models with the same labels and output grid get the same pixels.
    Pixels labelled ``ignore_index`` are left out.
    """

    def __init__(
        self, num_classes: int, per_class: int, seed: int = 0, ignore_index: int = IGNORE_INDEX
    ) -> None:
        if per_class < 1:
            raise ValueError(f"per_class must be at least 1, got {per_class}")
        self.num_classes = num_classes
        self.per_class = per_class
        self.seed = seed
        self.ignore_index = ignore_index
        self._keys: dict[int, np.ndarray] = {}
        self._features: dict[int, np.ndarray] = {}

    def add(self, image: int, features: np.ndarray, labels: np.ndarray) -> None:
        """Offer image number ``image``'s pixels: ``features`` (P, D), ``labels`` (P,)."""
        if features.shape[0] != labels.shape[0]:
            raise ValueError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels")
        labels = labels.astype(np.int64)
        keys = np.random.default_rng([self.seed, image]).random(labels.shape[0])
        present = np.unique(labels[labels != self.ignore_index])
        if present.size and (present[0] < 0 or present[-1] >= self.num_classes):
            raise ValueError(f"labels outside 0..{self.num_classes - 1} (and {self.ignore_index})")
        for c in present.tolist():
            idx = self._smallest(np.flatnonzero(labels == c), keys)
            self._merge(c, keys[idx], features[idx])

    def _smallest(self, idx: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """The ``per_class`` entries of ``idx`` with the smallest keys (all if fewer)."""
        if idx.size <= self.per_class:
            return idx
        return idx[np.argpartition(keys[idx], self.per_class - 1)[: self.per_class]]

    def _merge(self, c: int, keys: np.ndarray, features: np.ndarray) -> None:
        if c in self._keys:
            keys = np.concatenate([self._keys[c], keys])
            features = np.concatenate([self._features[c], features])
        keep = self._smallest(np.arange(keys.size), keys)
        self._keys[c], self._features[c] = keys[keep], features[keep]

    def counts(self) -> np.ndarray:
        """Pixels kept per class, ``(C,)`` int64."""
        out = np.zeros(self.num_classes, dtype=np.int64)
        for c, keys in self._keys.items():
            out[c] = keys.size
        return out

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """The sample: features ``(N, D)`` float32 and labels ``(N,)`` int64, by class then key."""
        if not self._keys:
            return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
        parts = [(c, np.argsort(self._keys[c], kind="stable")) for c in sorted(self._keys)]
        features = np.concatenate([self._features[c][order] for c, order in parts])
        labels = np.concatenate([np.full(order.size, c, dtype=np.int64) for c, order in parts])
        return features.astype(np.float32, copy=False), labels


def cluster_scores(
    features: np.ndarray, labels: np.ndarray, silhouette_points: int = 5000, seed: int = 0
) -> dict[str, float | None]:
    """How well ``labels`` separate ``features`` (N, D) into clusters.

    - ``calinski_harabasz``: between-class over within-class dispersion, scaled by
      ``(N - k) / (k - 1)``; higher is better.
    - ``davies_bouldin``: mean over classes of the largest ``(s_i + s_j) / d(c_i, c_j)``
      (spreads over centroid distance); lower is better, 0 at best.
    - ``silhouette``: mean silhouette in [-1, 1] (higher is better) on a random subset of
      ``silhouette_points`` points (all points when there are no more).

    Euclidean distances on the full-dimensional features. Every value is None when there
    are fewer than two classes or no more points than classes (the indices are undefined).
    """
    k = np.unique(labels).size
    if k < 2 or labels.size <= k:
        return {"calinski_harabasz": None, "davies_bouldin": None, "silhouette": None}
    x = features.astype(np.float64, copy=False)
    sample = silhouette_points if labels.size > silhouette_points else None
    return {
        "calinski_harabasz": float(calinski_harabasz_score(x, labels)),
        "davies_bouldin": float(davies_bouldin_score(x, labels)),
        "silhouette": float(silhouette_score(x, labels, sample_size=sample, random_state=seed)),
    }


@dataclass
class TsneConfig:
    """scikit-learn t-SNE settings (van der Maaten & Hinton 2008 defaults)."""

    perplexity: float = 30.0
    max_iter: int = 1000  # optimisation steps (scikit-learn needs at least 250)
    pca_dims: int = 50  # first reduce wider features to this many PCA dims; 0 = never


def tsne_2d(features: np.ndarray, cfg: TsneConfig | None = None, seed: int = 0) -> np.ndarray:
    """A 2-D t-SNE embedding ``(N, 2)`` float32 of ``features`` (N, D); deterministic for
    ``seed``. PCA initialisation; the perplexity is capped below N/3 for small samples."""
    cfg = cfg or TsneConfig()
    n = features.shape[0]
    if n < 4:  # too few points for any perplexity: a line is as good a picture
        return np.stack([np.arange(n), np.zeros(n)], axis=1).astype(np.float32)
    x = features.astype(np.float32, copy=False)
    if 0 < cfg.pca_dims < min(x.shape):
        x = PCA(n_components=cfg.pca_dims, random_state=seed).fit_transform(x)
    tsne = TSNE(
        n_components=2,
        perplexity=min(cfg.perplexity, (n - 1) / 3),
        max_iter=cfg.max_iter,
        init="pca",
        learning_rate="auto",
        random_state=seed,
    )
    return tsne.fit_transform(x).astype(np.float32)
