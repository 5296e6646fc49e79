"""Synthetic portrait dataset in the manifest format, for tests, demos and benchmarks.

Each image is a cluttered background with, for most images, a head: a face whose skin has
one of the 10 Monk skin tone colours (with a lighting gradient and texture), eyes, brows,
a mouth, ears, a neck, clothing and hair with a visible scalp (a parting, a thinning crown
or a receding top). The scene is drawn as a label map first, then coloured, so the skin and
scalp masks agree with the pixels exactly. A blur level (sharp / slight / strong) is applied
to the final image, irrelevant images (no person) are mixed in, and a share of the label
cells is left empty per task, as in partially annotated real data.

Every image has its own random generator ``np.random.default_rng([seed, index])``: the same
seed writes byte-identical files whatever the number of worker processes.

Modules: :mod:`~ssl_mt.data.synthetic.generate` writes the dataset (rows, files, worker
processes), :mod:`~ssl_mt.data.synthetic.scene` renders one image (background, clutter,
colours, blur) and :mod:`~ssl_mt.data.synthetic.person` draws a person's label map (head,
face, hair and scalp).
"""

from ssl_mt.data.synthetic.generate import (
    BLUR_CLASSES,
    COLUMNS,
    JPEG_QUALITY,
    LABEL_COLUMNS,
    RELEVANCE_CLASSES,
    TONE_CLASSES,
    generate_dataset,
)
from ssl_mt.data.synthetic.person import (
    BG,
    BROW,
    CLOTH,
    EYE,
    HAIR,
    IRIS,
    MOUTH,
    SCALP,
    SCALP_STRANDS,
    SKIN,
)
from ssl_mt.data.synthetic.scene import (
    BLUR_SIGMA,
    HAIR_RGB,
    IRIS_RGB,
    MIN_HAIR_CONTRAST,
    MONK_HEX,
    MONK_RGB,
    apply_blur,
    render_scene,
)

__all__ = [
    "BG",
    "BLUR_CLASSES",
    "BLUR_SIGMA",
    "BROW",
    "CLOTH",
    "COLUMNS",
    "EYE",
    "HAIR",
    "HAIR_RGB",
    "IRIS",
    "IRIS_RGB",
    "JPEG_QUALITY",
    "LABEL_COLUMNS",
    "MIN_HAIR_CONTRAST",
    "MONK_HEX",
    "MONK_RGB",
    "MOUTH",
    "RELEVANCE_CLASSES",
    "SCALP",
    "SCALP_STRANDS",
    "SKIN",
    "TONE_CLASSES",
    "apply_blur",
    "generate_dataset",
    "render_scene",
]
