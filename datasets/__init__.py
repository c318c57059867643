"""FER2013-style image folders -> tensors -> augmented batches.

Layout: ``root/{train,val,test}/<Class>/<image>`` (what scripts/download_dataset.py writes, and
``make_synthetic``, the synthetic faces of the demo and the tests). Two pipelines with the same
semantics:

- ``pil``: the official torchvision transforms, image by image, in a DataLoader. The reference.
- ``fast`` (default): the split decoded once into a uint8 tensor (cached on disk), kept on the
  training device, and augmented per batch: flips, resize, rotation and crop composed into one
  affine warp per image and applied by one ``grid_sample`` call for the whole batch.

Both draw their random numbers from generators seeded by (seed, epoch, rank), never from the
global RNG, so a run resumed at epoch k sees exactly the data an uninterrupted run sees.
docs/DATA.md explains the design and the small numerical differences between the pipelines.

One room per part, data flowing down this list (a module imports only those above it):

- ``folders``: class names, `DataConfig`, layout checks, decoding and its cache, `load_split`,
  `read_soft_labels` (FER+'s soft_labels.csv)
- ``manifest``: manifests, the content hash, publishing a dataset folder
- ``duplicates``: the leak audit's duplicate search
- ``synthetic``: the synthetic faces
- ``transforms``: augmentation parameters and the `pil` pipeline's torchvision transforms
- ``warp``: the `fast` pipeline's on-device affine warp
- ``auto_augment``: RandAugment/TrivialAugment (`--aa`): timm's (`pil`), batched (`fast`)
- ``random_erasing``: random erasing (`--reprob`): timm's (`pil`), batched (`fast`)
- ``sampler``: the epoch's order: the seeds of every stream, `--sampler balanced`
- ``mixup``: Mixup/CutMix of training batches (timm's `Mixup` with a generator of its own)
- ``loader``: `Loader`, `FastLoader`, `PilLoader`, `build_loader`, `denormalize`

The public names of every room are importable from ``datasets`` itself.
"""

from .auto_augment import (
    TRIVIAL,
    RandAugmentSpec,
    apply_op,
    parse_aa,
    rand_augment,
    rand_augment_params,
    timm_rand_augment,
)
from .duplicates import (
    BLANK_STD,
    FINGERPRINT_SIMILARITY,
    MAX_SHIFT,
    NEAR_DUPLICATE_SIMILARITY,
    OVERLAP_METHOD,
    DuplicatePairs,
    ImageHashes,
    dct_basis,
    duplicate_pairs,
    hash_images,
    identical,
    overlap_counts,
    split_overlap,
    verified_similarity,
)
from .folders import (
    ALPHA_BACKGROUND,
    CACHE_VERSION,
    CLASSES,
    FER2013_CSV_CLASSES,
    FER2013_SPLIT_SIZES,
    IMG_EXTENSIONS,
    KNOWN_CLASSES,
    LABEL_TARGETS,
    OFFICIAL_CROP,
    OFFICIAL_RESIZE,
    SKIP_BAD_IMAGES_HINT,
    SOFT_LABELS,
    SOFT_SUM_TOLERANCE,
    SPLITS,
    DataConfig,
    DatasetError,
    SplitData,
    UnreadableImageError,
    canonical_class_name,
    check_dataset,
    decode_image,
    is_hidden,
    load_split,
    read_soft_labels,
    user_cache_dir,
)
from .loader import FastLoader, Loader, PilLoader, build_loader, denormalize
from .manifest import (
    check_replaceable,
    content_hash,
    count_images,
    label_mode,
    publish_dataset,
    read_manifest,
    write_manifest,
)
from .mixup import MIXUP_MODES, BatchMixup, mixup_active, numpy_global_state
from .random_erasing import erase_params, random_erase, timm_random_erasing
from .sampler import balanced_epoch_length, balanced_order
from .synthetic import (
    BACKDROP_STD,
    EXPRESSIONS,
    JITTER,
    SUPERSAMPLE,
    SYNTHETIC_SIZE,
    SYNTHETIC_SPLITS,
    SYNTHETIC_VERSION,
    draw_face,
    make_synthetic,
)
from .transforms import (
    CONVNEXT_AUGMENT,
    DEFAULT_AUGMENT,
    FixedCrop,
    RepeatChannels,
    StackCrops,
    pil_transform,
)
from .warp import fast_warp, make_theta, ten_crop_views

__all__ = [
    # folders
    "ALPHA_BACKGROUND", "CACHE_VERSION", "CLASSES", "FER2013_CSV_CLASSES", "FER2013_SPLIT_SIZES",
    "IMG_EXTENSIONS", "KNOWN_CLASSES", "LABEL_TARGETS", "OFFICIAL_CROP", "OFFICIAL_RESIZE",
    "SKIP_BAD_IMAGES_HINT", "SOFT_LABELS", "SOFT_SUM_TOLERANCE", "SPLITS", "DataConfig",
    "DatasetError", "SplitData", "UnreadableImageError", "canonical_class_name", "check_dataset",
    "decode_image", "is_hidden", "load_split", "read_soft_labels", "user_cache_dir",
    # manifest
    "check_replaceable", "content_hash", "count_images", "label_mode", "publish_dataset",
    "read_manifest", "write_manifest",
    # duplicates
    "BLANK_STD", "FINGERPRINT_SIMILARITY", "MAX_SHIFT", "NEAR_DUPLICATE_SIMILARITY",
    "OVERLAP_METHOD", "DuplicatePairs", "ImageHashes", "dct_basis", "duplicate_pairs",
    "hash_images", "identical", "overlap_counts", "split_overlap", "verified_similarity",
    # synthetic
    "BACKDROP_STD", "EXPRESSIONS", "JITTER", "SUPERSAMPLE", "SYNTHETIC_SIZE", "SYNTHETIC_SPLITS",
    "SYNTHETIC_VERSION", "draw_face", "make_synthetic",
    # transforms
    "CONVNEXT_AUGMENT", "DEFAULT_AUGMENT", "FixedCrop", "RepeatChannels", "StackCrops",
    "pil_transform",
    # warp
    "fast_warp", "make_theta", "ten_crop_views",
    # auto_augment
    "TRIVIAL", "RandAugmentSpec", "apply_op", "parse_aa", "rand_augment", "rand_augment_params",
    "timm_rand_augment",
    # random_erasing
    "erase_params", "random_erase", "timm_random_erasing",
    # sampler
    "balanced_epoch_length", "balanced_order",
    # mixup
    "MIXUP_MODES", "BatchMixup", "mixup_active", "numpy_global_state",
    # loader
    "FastLoader", "Loader", "PilLoader", "build_loader", "denormalize",
]  # fmt: skip
