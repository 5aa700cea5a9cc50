"""Evaluation pieces: metrics, robustness benchmarks, offline corruptions, adversarial attacks.

Pure, reusable building blocks; the dataset wiring (TFDS, folders) lives in the eval driver.
  metrics     -- masked top-k counts, ImageNet-A/R class-subset predictions
  robustness  -- ImageNet-C mCE / relative mCE, CIFAR-10-C mean error, ImageNet-P flip rates,
                 TFDS names and folder listings of the corrupted datasets
  corruptions -- ImageNet-C-style corruptions for uint8 images of any size
  adversarial -- FGSM / PGD in [0, 1] pixel space, epsilon sweeps, JSON and PNG outputs
"""
from __future__ import annotations

from nsjax.evaluate import adversarial, corruptions, metrics, robustness
from nsjax.evaluate.adversarial import (epsilon_sweep, fgsm, make_attack, model_apply_fn,
                                        normalize_imagenet, pgd, plot_sweep, save_json)
from nsjax.evaluate.corruptions import corrupt, corrupt_batch
from nsjax.evaluate.metrics import (TopKAccumulator, class_subset_indices, subset_predict,
                                    subset_topk_correct, topk_correct)
from nsjax.evaluate.robustness import (cifar10_c_summary, flip_probability, imagenet_c_summary,
                                       imagenet_p_summary)

__all__ = ["TopKAccumulator", "adversarial", "cifar10_c_summary", "class_subset_indices", "corrupt",
           "corrupt_batch", "corruptions", "epsilon_sweep", "fgsm", "flip_probability",
           "imagenet_c_summary", "imagenet_p_summary", "make_attack", "metrics", "model_apply_fn",
           "normalize_imagenet", "pgd", "plot_sweep", "robustness", "save_json", "subset_predict",
           "subset_topk_correct", "topk_correct"]
