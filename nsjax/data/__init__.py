"""Input pipelines: decoding, preprocessing views and RandAugment, all as tf.data-friendly TF ops."""
