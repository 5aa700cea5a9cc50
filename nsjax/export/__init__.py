"""Exports for serving outside JAX: TF SavedModel (orbax-export) and TFLite, classifier or backbone.

`nsjax.export.preprocessing` (TensorFlow only) is the eval view inside the serving graph,
`nsjax.export.saved_model` builds the SavedModel, `nsjax.export.tflite` converts it;
`nsjax export ...` (nsjax/export/__main__.py) is the command line. docs/export.md describes the
signatures.
"""
