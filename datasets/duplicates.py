"""Duplicates: the same picture twice, within a split or leaking from training into evaluation
(the leak check of train.py, evaluate.py and scripts/audit_dataset.py)."""

from __future__ import annotations

import functools
import hashlib
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .folders import SplitData, _read_cache, _write_cache

# Two stages over the decoded uint8 arrays (docs/DATA.md has the measurements):
# 1. a perceptual fingerprint per image, pHash's 8 x 8 lowest DCT frequencies without the mean
#    (brightness) term, scaled to unit length (contrast); pairs whose fingerprints have a cosine
#    of FINGERPRINT_SIMILARITY or more are candidates (one matrix product per block of images);
# 2. each candidate pair is verified at full resolution: the correlation of the two images,
#    band-passed (without JPEG's pixel noise and without the face-on-background layout that all
#    faces share), at the best of every shift up to MAX_SHIFT pixels. Pairs at
#    NEAR_DUPLICATE_SIMILARITY or more are near-duplicates; identical pixels are exact ones.
# Binary pHash (imagehash) flips up to 18 of its 64 bits when a 48 x 48 face moves by one pixel,
# so a Hamming threshold loose enough for that also matches unrelated faces (docs/DATA.md).

BLANK_STD = 2.0  # grey levels: flatter images are blank or constant and match no other image
FINGERPRINT_SIMILARITY = 0.95  # stage 1: keeps 1-pixel shifts, brightness and JPEG changes
NEAR_DUPLICATE_SIMILARITY = 0.93  # stage 2: the verified correlation of a near-duplicate
MAX_SHIFT = 1  # pixels in each direction tried by stage 2
_DCT_FREQUENCIES = 8
_BLOCK = 2048  # images per matrix-product block (memory: 2048 x N floats)


@dataclass
class ImageHashes:
    """What the duplicate search needs of N images (`hash_images`)."""

    pixels: list[bytes]  # digest of the decoded pixels: equal digests = identical pictures
    fingerprints: np.ndarray  # (N, 63) float32 unit vectors; zero for blank images
    blank: np.ndarray  # (N,) bool: pixel standard deviation below BLANK_STD
    std: np.ndarray  # (N,) float32 pixel standard deviation


def dct_basis(n: int, k: int) -> np.ndarray:
    """The first k DCT-II basis vectors over n samples, (k, n)."""
    return np.cos(np.pi * (2 * np.arange(n) + 1)[None, :] * np.arange(k)[:, None] / (2 * n))


def hash_images(images: np.ndarray | torch.Tensor) -> ImageHashes:
    """Pixel digests, perceptual fingerprints and blank flags of uint8 images (N, H, W)."""
    images = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    n, h, w = images.shape
    pixels = [hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in images]
    rows = dct_basis(h, _DCT_FREQUENCIES).astype(np.float32)
    cols = dct_basis(w, _DCT_FREQUENCIES).astype(np.float32)
    fingerprints = np.zeros((n, _DCT_FREQUENCIES**2 - 1), np.float32)
    std = np.zeros(n, np.float32)
    for start in range(0, n, _BLOCK):
        x = images[start : start + _BLOCK].astype(np.float32)
        std[start : start + len(x)] = x.reshape(len(x), -1).std(1)
        coefficients = (rows @ x @ cols.T).reshape(len(x), -1)[:, 1:]
        norms = np.linalg.norm(coefficients, axis=1, keepdims=True)
        fingerprints[start : start + len(x)] = coefficients / np.maximum(norms, 1e-6)
    blank = std < BLANK_STD
    fingerprints[blank] = 0.0  # a flat image's fingerprint is noise: it matches nothing
    return ImageHashes(pixels, fingerprints, blank, std)


@functools.lru_cache(maxsize=8)
def _band_pass_matrices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(fine, coarse) blurs along one axis of length n as matrices: [1, 2, 1] / 4 once, and nine
    times (a Gaussian of about 2 pixels), edges repeated."""
    fine = np.zeros((n, n))
    for i in range(n):
        for offset, weight in ((-1, 0.25), (0, 0.5), (1, 0.25)):
            fine[i, min(max(i + offset, 0), n - 1)] += weight
    return fine.astype(np.float32), np.linalg.matrix_power(fine, 9).astype(np.float32)


def _band_pass(images: np.ndarray) -> np.ndarray:
    """Images without their pixel-level noise (JPEG) and without the coarse layout every face
    shares (a bright oval on a background): what is left, the features and texture, is what
    tells two photographs apart."""
    x = images.astype(np.float32)
    fine_rows, coarse_rows = _band_pass_matrices(x.shape[1])
    fine_cols, coarse_cols = _band_pass_matrices(x.shape[2])
    return fine_rows @ x @ fine_cols.T - coarse_rows @ x @ coarse_cols.T


def _best_correlation(a: np.ndarray, b: np.ndarray, max_shift: int = MAX_SHIFT) -> np.ndarray:
    """Pairwise correlation coefficient of a's centre (a border of `max_shift` pixels left out)
    with b's window of the same size, at the best shift."""
    m, (h, w) = max_shift, a.shape[1:]
    centre = a[:, m : h - m, m : w - m]
    centre = centre - centre.mean((1, 2), keepdims=True)
    centre /= np.maximum(np.sqrt((centre**2).sum((1, 2), keepdims=True)), 1e-6)
    pixels = centre.shape[1] * centre.shape[2]
    best = np.full(len(a), -1.0, np.float32)
    for dy in range(-m, m + 1):
        for dx in range(-m, m + 1):
            window = b[:, m + dy : h - m + dy, m + dx : w - m + dx]
            dot = np.einsum("nij,nij->n", centre, window)  # centre has mean 0: no window mean
            total = window.sum((1, 2))
            spread = np.einsum("nij,nij->n", window, window) - total**2 / pixels
            best = np.maximum(best, dot / np.sqrt(np.maximum(spread, 1e-6)))
    return best


def verified_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Stage 2 for pairs of uint8 images (a[k], b[k]): 1 for the same picture, about 0.96 or
    more after a 1-pixel shift, brightening or JPEG re-encoding, 0.3-0.9 for different faces."""
    return _best_correlation(_band_pass(a), _band_pass(b))


class DuplicatePairs(NamedTuple):
    """What `duplicate_pairs` finds: pair k is images[i[k]] and others[j[k]]."""

    i: np.ndarray
    j: np.ndarray
    similarity: np.ndarray  # the verified similarity (`verified_similarity`)
    mirrored: np.ndarray  # bool: the copy is mirrored left to right


# A fingerprint of an image mirrored left to right: the DCT's horizontal frequency c changes sign
# with (-1)^c, so mirroring is a sign flip of the odd columns of the 8 x 8 block (no new DCT).
_MIRROR_SIGNS = np.where(np.arange(1, _DCT_FREQUENCIES**2) % _DCT_FREQUENCIES % 2, -1.0, 1.0)
_MIRROR_SIGNS = _MIRROR_SIGNS.astype(np.float32)


def _candidates(mine: np.ndarray, theirs: np.ndarray, within: bool) -> tuple[np.ndarray, ...]:
    """Stage 1: (i, j) whose fingerprints have a cosine of FINGERPRINT_SIMILARITY or more; only
    i < j when `within` (the same images on both sides)."""
    first, second = [], []
    for start in range(0, len(mine), _BLOCK):
        cosine = mine[start : start + _BLOCK] @ theirs.T
        i, j = np.nonzero(cosine >= FINGERPRINT_SIMILARITY)
        i += start
        keep = j > i if within else slice(None)
        first.append(i[keep])
        second.append(j[keep])
    if not first:
        return np.zeros(0, int), np.zeros(0, int)
    return np.concatenate(first), np.concatenate(second)


def _verify(
    images: np.ndarray, others: np.ndarray, i: np.ndarray, j: np.ndarray, mirror: bool
) -> np.ndarray:
    """Stage 2 for the pairs (images[i], others[j]), others mirrored when `mirror`: each image
    involved is band-passed once (band-passing commutes with mirroring), pairs scored in blocks."""
    rows, row_of = np.unique(i, return_inverse=True)
    cols, col_of = np.unique(j, return_inverse=True)
    a, b = _band_pass(images[rows]), _band_pass(others[cols])
    if mirror:
        b = np.ascontiguousarray(b[:, :, ::-1])
    scores = np.zeros(len(i), np.float32)
    for k in range(0, len(i), 8192):
        block = slice(k, k + 8192)
        scores[block] = _best_correlation(a[row_of[block]], b[col_of[block]])
    return scores


def duplicate_pairs(
    images: np.ndarray | torch.Tensor,
    hashes: ImageHashes,
    others: np.ndarray | torch.Tensor | None = None,
    other_hashes: ImageHashes | None = None,
    similarity: float = NEAR_DUPLICATE_SIMILARITY,
    mirrored: bool = True,
) -> DuplicatePairs:
    """Every near- or exact-duplicate pair: i in `images`, j in `others`, or i < j within
    `images` when `others` is None; with `mirrored`, also copies mirrored left to right (flipped
    copies are common in scraped face datasets, and flip augmentation makes one a leak). A pair
    that matches as it is is not also reported mirrored. Blank images take part in no pair."""
    images = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    within = others is None
    if within:
        others, other_hashes = images, hashes
    others = others.numpy() if isinstance(others, torch.Tensor) else np.asarray(others)
    none = np.zeros(0, int)
    if images.shape[1:] != others.shape[1:]:
        return DuplicatePairs(none, none, np.zeros(0, np.float32), np.zeros(0, bool))
    found, direct = [], None
    for mirror in (False, True) if mirrored else (False,):
        theirs = other_hashes.fingerprints * (_MIRROR_SIGNS if mirror else 1.0)
        i, j = _candidates(hashes.fingerprints, theirs, within)
        if mirror:  # the pairs already found as they are
            again = np.isin(i * len(others) + j, direct)
            i, j = i[~again], j[~again]
        scores = _verify(images, others, i, j, mirror)
        keep = scores >= similarity
        found.append((i[keep], j[keep], scores[keep], np.full(int(keep.sum()), mirror)))
        direct = found[0][0] * len(others) + found[0][1]
    return DuplicatePairs(*(np.concatenate(parts) for parts in zip(*found, strict=True)))


def identical(hashes: ImageHashes, i, other_hashes: ImageHashes, j) -> np.ndarray:
    """Which pairs (i[k], j[k]) are the same pixels."""
    pairs = zip(i, j, strict=True)
    return np.array([hashes.pixels[a] == other_hashes.pixels[b] for a, b in pairs], bool)


# Bump when the duplicate search changes in a way its constants do not show (2: mirrored copies).
OVERLAP_METHOD = 2


def _overlap_key(train: SplitData, others: dict[str, SplitData]) -> str:
    """The duplicate search's inputs: its method and constants, and every split's pixels and
    labels (sha256 of 66 MB for FER2013's train split: 0.04 s, against seconds for the search)."""
    constants = (OVERLAP_METHOD, FINGERPRINT_SIMILARITY, NEAR_DUPLICATE_SIMILARITY, MAX_SHIFT)
    h = hashlib.sha256(f"overlap {constants} {BLANK_STD} {_DCT_FREQUENCIES}\n".encode())
    for name, split in {"train": train, **others}.items():
        images, targets = split.images.contiguous(), split.targets.contiguous()
        h.update(f"{name} {tuple(images.shape)} {len(targets)}\n".encode())
        h.update(memoryview(images.numpy()).cast("B"))
        h.update(memoryview(targets.numpy()).cast("B"))
    return h.hexdigest()[:24]


def overlap_counts(train: SplitData, others: dict[str, SplitData]) -> dict:
    """Per evaluation split: `images`, `exact` (an identical picture is in train), `near` (only
    near-duplicates are, mirrored copies among them), `other_label` (of these, a copy in train
    has another label)."""
    train_hashes = hash_images(train.images)
    counts = {}
    for name, split in others.items():
        hashes = hash_images(split.images)
        i, j = duplicate_pairs(split.images, hashes, train.images, train_hashes)[:2]
        exact = identical(hashes, i, train_hashes, j)
        other_label = split.targets.numpy()[i] != train.targets.numpy()[j]
        n_exact = len(np.unique(i[exact]))
        counts[name] = {
            "images": len(split.targets),
            "exact": n_exact,
            "near": len(np.unique(i)) - n_exact,
            "other_label": len(np.unique(i[other_label])),
        }
    return counts


def split_overlap(
    train: SplitData, others: dict[str, SplitData], root: str | os.PathLike = ""
) -> tuple[dict, str]:
    """overlap_counts and a one-line warning ("" when no evaluation image occurs in train).

    With a dataset folder `root`, the counts are cached beside its decoded splits, keyed by the
    splits' pixels and labels: train.py checks at every start and resume, and the search takes
    seconds (4.3 s for FER2013-sized data on 2 CPU cores, mirrored copies included).
    """
    counts, cached = None, bool(root) and Path(root).is_dir()
    if cached:
        cache_name = f"overlap-{_overlap_key(train, others)}.pt"

        def valid(cached_counts: dict) -> bool:
            fields = {"images", "exact", "near", "other_label"}
            return sorted(cached_counts) == sorted(others) and all(
                set(c) == fields and all(type(v) is int for v in c.values())
                for c in cached_counts.values()
            )

        counts = _read_cache(Path(root), cache_name, valid)
    if counts is None:
        counts = overlap_counts(train, others)
        if cached:
            _write_cache(Path(root), cache_name, counts)
    leaks = [
        f"{c['exact'] + c['near']} of {c['images']} {name}"
        for name, c in counts.items()
        if c["exact"] + c["near"]
    ]
    if not leaks:
        return counts, ""
    conflicts = sum(c["other_label"] for c in counts.values())
    script = Path(__file__).resolve().parents[1] / "scripts" / "audit_dataset.py"
    shown = os.path.relpath(script) if not os.path.relpath(script).startswith("..") else script
    return counts, (
        f"warning: {' and '.join(leaks)} images also occur in train (identical or near copies"
        f"{f', {conflicts} under another label' if conflicts else ''}); list them with: "
        f"python {shlex.quote(str(shown))} {shlex.quote(str(root))}"
    )
