"""Preprocessing pipelines composed from named steps (torchvision.transforms.v2), and the batch transform.

A pipeline is a list of step specs, stored in YAML configs and in a model's ``config.json``. The canonical form
of a step is a one-key mapping ``{name: {param: value, ...}}``, e.g. ``{"random_resized_crop": {"scale": [0.8,
1.0]}}``; also accepted: a bare name (``"hflip"``, all defaults), ``{name: None}`` (YAML ``- hflip:``) and
``{"name": "hflip", "p": 0.3}``. :func:`canonical_steps` turns any of them into the canonical form (lists, not
tuples, so it is JSON/YAML-serialisable).

Steps run in three stages, whatever their order in the list:

1. image steps (every geometric / colour step) on the decoded ``PIL`` RGB image (PIL's C code is faster than
   tensor ops at face-crop sizes), in the order given; then, if the image is not ``image_size x image_size``,
   an exact resize to that size (it squashes a non-square image: put ``square_pad`` or a crop before it to keep
   the aspect ratio);
2. ``to_tensor`` + ``normalize`` (implicit; their place in the list does not matter): float32 CHW, normalised
   with the backbone mean/std (``mode: backbone``) or FaceNet's fixed ``(x*255 - 127.5) / 128``
   (``mode: fixed``); without a ``normalize`` step the ``normalization`` argument of :func:`build_transform`
   decides (default ``"backbone"``);
3. tensor steps (``random_erasing``) on the normalised tensor, in the order given.

Step names, parameters and defaults (``S`` = ``image_size``):

=======================  ====================================================================================
``resize``               ``size=S``, ``keep_aspect=False`` (True: the short side becomes ``size``),
                         ``interpolation="bilinear"`` (``nearest``, ``bilinear``, ``bicubic``); antialiased
``center_crop``          ``size=S`` (int or ``[h, w]``, px of the incoming image: 150 on a 250x250 LFW
                         deep-funneled image is the face)
``face_crop``            ``fraction=0.6``: centred square of ``fraction`` x the short side
``random_resized_crop``  ``size=S``, ``scale=[0.8, 1.0]``, ``ratio=[0.9, 1.1]``, ``interpolation="bilinear"``
                         (face-safe: torchvision's default scale 0.08 would cut faces to pieces)
``face_affine``          ``size=S``, ``fraction=0.6``, ``degrees=10``, ``scale=[0.8, 1.0]``, ``ratio=[0.9, 1.1]``,
                         ``flip=0.5``, ``interpolation="bilinear"``, ``fill=0``: the face square (as
                         ``face_crop``), then a random window of it (as ``random_resized_crop``), rotated and
                         mirrored, resampled once straight to ``size``
``random_crop``          ``padding=8``, ``size=None`` (= the incoming size: a random shift of up to ``padding`` px),
                         ``fill=0``, ``padding_mode="constant"`` (``edge``, ``reflect``, ``symmetric``)
``hflip``                ``p=0.5``
``rotate``               ``degrees=10`` (number d: uniform in [-d, d]; or ``[min, max]``), ``fill=0``,
                         ``interpolation="bilinear"``
``color_jitter``         ``brightness=0.2``, ``contrast=0.2``, ``saturation=0.2``, ``hue=0.0``, ``p=1.0``
``grayscale``            ``p=0.1`` (the result keeps 3 channels)
``auto_augment``         ``method="randaugment"`` (``num_ops=2``, ``magnitude=9``), ``"autoaugment"``
                         (``policy="imagenet"``, ``cifar10``, ``svhn``) or ``"trivialaugment"``; ``fill=0``
``square_pad``           ``fill=0``, ``padding_mode="constant"``: pads the short side to a centred square
``gaussian_blur``        ``kernel_size=5`` (odd), ``sigma=[0.1, 2.0]``, ``p=0.5``
``random_erasing``       ``p=0.25``, ``scale=[0.02, 0.2]``, ``ratio=[0.3, 3.3]``, ``value=0.0`` (tensor stage:
                         0 is the mean colour after normalisation)
``normalize``            ``mode=None`` (``"backbone"`` or ``"fixed"``; None: ``build_transform(normalization=)``)
``to_tensor``            no parameters; implicit (allowed in the list for readability, it has no effect)
=======================  ====================================================================================

``fill`` is a grey level 0..255 or ``[r, g, b]``. New steps join with :func:`register_step`.

Training batches::

    bt = BatchTransform(build_transform(steps, image_size=112, mean=mean, std=std), bad_image_policy="skip")
    dl = DataLoader(ds.with_transform(bt), batch_sampler=pk_sampler, collate_fn=collate_batch, num_workers=2)

``Dataset.__getitems__`` runs ``bt`` once per batch (in the worker), splits its output into rows, and
:func:`collate_batch` stacks them again: ``{"pixel_values", "labels", "valid", "bad"}``.
"""

from facenet_hf.constants import (
    BAD_IMAGE_POLICIES,
    DEFAULT_EVAL_STEPS,
    DEFAULT_TRAIN_STEPS,
    FIXED_MEAN,
    FIXED_STD,
    NORMALIZATION_MODES,
)
from facenet_hf.data.transforms.factory import FaceTransform, build_transform, canonical_steps
from facenet_hf.data.transforms.loader import BatchTransform, collate_batch
from facenet_hf.data.transforms.registry import STEPS, StepContext, StepFactory, register_step

__all__ = [
    "BAD_IMAGE_POLICIES",
    "DEFAULT_EVAL_STEPS",
    "DEFAULT_TRAIN_STEPS",
    "FIXED_MEAN",
    "FIXED_STD",
    "NORMALIZATION_MODES",
    "STEPS",
    "BatchTransform",
    "FaceTransform",
    "StepContext",
    "StepFactory",
    "build_transform",
    "canonical_steps",
    "collate_batch",
    "register_step",
]
