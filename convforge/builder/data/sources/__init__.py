"""``--dataset`` specs turned into train and validation ImageSets. Nothing is ever downloaded.

A spec is ``KIND`` or ``KIND:ARG`` (see :data:`DATASETS`), one module per format:

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (the default), and
  ``synthetic`` or ``synthetic:key=value,...``: procedural images
  (:mod:`..synthetic`); both in :mod:`.builtin`.
* ``imagefolder:PATH``: ``PATH/<class>/<images>``, or ``PATH/train/<class>/...`` and
  ``PATH/val/<class>/...`` (:mod:`.imagefolder`).
* ``cifar10:PATH``, ``cifar100:PATH``: the "python version" pickle batches (:mod:`.cifar`).
* ``mnist:PATH``, ``fashion-mnist:PATH``: the four IDX files, optionally gzipped (:mod:`.mnist`).

:func:`load_dataset` (:mod:`.spec`) returns a :class:`DataBundle` (:mod:`.bundle`).
Datasets without a test part (digits, synthetic, a single ImageFolder) get a
seeded stratified split; the test part of CIFAR and MNIST is the validation
split. Every problem a user can fix (a missing file, a malformed one, a bad
spec) is a one-line UserError.
"""

from convforge.builder.data.sources.bundle import DataBundle, to_channels
from convforge.builder.data.sources.mnist import FASHION_MNIST_CLASSES, read_idx
from convforge.builder.data.sources.spec import DATASETS, load_dataset, parse_spec

__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "DataBundle",
    "load_dataset",
    "parse_spec",
    "read_idx",
    "to_channels",
]
