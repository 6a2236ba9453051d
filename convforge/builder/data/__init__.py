"""Data for the builder: datasets from local files, splits, statistics, augmentation.

* :mod:`.images`: :class:`ImageSet`, the one dataset type the trainer sees
  (items are ``(uint8 image [C, H, W], label)``), stratified splits and
  channel statistics.
* :mod:`.sources`: ``--dataset`` specs (digits, synthetic, imagefolder:PATH,
  cifar10:PATH, cifar100:PATH, mnist:PATH, fashion-mnist:PATH) turned into a
  :class:`~.sources.DataBundle` of train and validation ImageSets. Nothing is
  ever downloaded.
* :mod:`.augment`: training-time augmentation (torchvision transforms v2),
  evaluation preprocessing, and batch-level Mixup/CutMix.
"""
