"""Shared infrastructure for the five method scripts: dataset loading (data), augmentations
(augment), dense CRF (crf) and mIoU (miou). Nothing a paper claims lives here."""
