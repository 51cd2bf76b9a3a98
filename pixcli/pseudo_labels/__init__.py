"""``pseudo.h5``: soft pseudo labels, prototypes and class distribution in one HDF5 file.

Written by ``pixcli pseudolabel``, read by ``adapt`` (:class:`PseudoLabelFile`) and by
anyone with plain h5py. ``N`` images, ``C`` classes, ``D`` feature channels; every image
has a grid of ``h x w = ceil(H / s) x ceil(W / s)`` cells for its ``H x W`` pixels and the
output stride ``s`` (cell ``(y, x)`` covers the image the way a model's output grid does:
resizing the grid bilinearly, align_corners=False, to ``H x W`` gives per-pixel values).
Per-image arrays are padded to the largest grid ``hmax x wmax`` (padding: soft 0, hard 255,
confidence 0); ``grid_size`` says how much of each is real.

Root attributes::

    format              "pixcli-pseudo-labels"
    version             1
    complete            1 (a pseudo.h5 only ever appears complete; work files have 0)
    classes             class names (index = train id); num_classes = C
    output_stride       s (image pixels per grid cell)
    feature_dim         D
    checkpoint          fingerprint (sha256 prefix) of the producing model.pt
    dataset, split      the target data (KIND:PATH) and split; dataset_fingerprint
    settings            JSON: the settings that change the content (inference, ignore_below)
    pixcli_version      the writer's version
    quantization, prototype_features, compression, ignore_index: how to read the numbers

Datasets (each has a ``description`` attribute)::

    names               (N,) str           image names, in the dataset's sorted order
    image_size          (N, 2) int32       H, W
    grid_size           (N, 2) int32       h, w
    soft                (N, C, hmax, wmax) uint8   q; p = q / sum_c q, and sum_c q = 255
    hard                (N, hmax, wmax) uint8      argmax_c p (taken before quantization);
                                                   255 = ignored (max p < ignore_below) or pad
    confidence          (N, hmax, wmax) uint8      round(255 max_c p)
    class_counts_per_image (N, C) int32    grid cells per hard label, per image
    prototypes          (C, D) float32     CPSL Eq. 7: per class, the mean L2-normalised
                                           decoder feature of its cells (0 if none)
    class_counts        (C,) int64         |Gamma_c| of Eq. 7: cells per hard label
    class_distribution  (C,) float64       CPSL Eq. 10: class_counts / sum(class_counts)

Quantization: soft labels are stored as uint8 ``q`` with ``sum_c q = 255`` at every cell
(largest-remainder rounding of ``255 p``: every ``q_c`` is ``floor`` or ``ceil`` of
``255 p_c``), so ``q / 255`` is already a distribution and ``|q_c / 255 - p_c| < 1/255``.
Readers divide by ``sum_c q`` anyway (renormalising), which keeps all-zero padding at zero.
Plain rounding ``round(255 p)`` would lose the sum (off by up to ``C/510``), and
renormalising that moves a probability by up to several times 1/255.

Storage: ``soft``, ``hard`` and ``confidence`` are chunked one image per chunk,
gzip-compressed (level 4; gzip is in every HDF5 build, unlike lzf; higher levels gain ~5%
for twice the time) with a Fletcher-32 checksum, so a damaged chunk is an error, never
silent garbage. Small arrays are contiguous.

Writing, resuming, several processes: each process writes its images into its own *work
file* (the layout above plus ``done`` (N,) uint8 and ``feature_sums_per_image`` (N, C, D)
float32, ``complete`` 0), created at once in a temporary file renamed into place. Images'
rows are written, the file is flushed, and only then are they marked in ``done``, so after
Ctrl-C or kill -9 the images marked done are exactly those whose data reached the file (no
SWMR; on reopening, an image marked done whose chunks are missing is redone). This commit
happens at least once a second, so a crash loses about a second of work and flushing
costs little. When every image is done, :func:`merge` builds ``pseudo.h5`` from the work
files through a temporary file, copying compressed chunks verbatim, with the prototypes
summed from the per-image feature sums in image order. So an interrupted and resumed run,
or several processes, give the same numbers as one uninterrupted run, and the resume state
stays out of the artifact. The default HDF5 format (superblock 0) is kept on purpose:
newer ones mark a file "open for writing" and refuse to open it after a crash.

Modules, each with one job (arrows go one way: quantize <- fileformat <- reader, writer)::

    quantize     soft labels to uint8 and back; grid sizes and resized crops of a grid
    fileformat   constants, Header, open_h5, the layout of attributes and datasets
    writer       work files, PseudoLabelWriter, merge (and image_stats) across processes
    reader       PseudoLabelFile, summary

Everything public is importable from here.
"""

from __future__ import annotations

from pixcli.pseudo_labels.fileformat import (
    CHUNKED,
    DESCRIPTIONS,
    FORMAT,
    GZIP_LEVEL,
    PROTOTYPE_FEATURES,
    QUANTIZATION,
    VERSION,
    WORK_CHUNKED,
    Header,
    open_h5,
)
from pixcli.pseudo_labels.quantize import (
    SCALE,
    crop_resized,
    dequantize_probs,
    grid_size,
    quantize_probs,
    quantize_unit,
)
from pixcli.pseudo_labels.reader import PseudoLabelFile, summary
from pixcli.pseudo_labels.writer import (
    ImageRecord,
    PseudoLabelWriter,
    create_work_file,
    image_stats,
    merge,
)

__all__ = [
    "CHUNKED",
    "DESCRIPTIONS",
    "FORMAT",
    "GZIP_LEVEL",
    "PROTOTYPE_FEATURES",
    "QUANTIZATION",
    "SCALE",
    "VERSION",
    "WORK_CHUNKED",
    "Header",
    "ImageRecord",
    "PseudoLabelFile",
    "PseudoLabelWriter",
    "create_work_file",
    "crop_resized",
    "dequantize_probs",
    "grid_size",
    "image_stats",
    "merge",
    "open_h5",
    "quantize_probs",
    "quantize_unit",
    "summary",
]
