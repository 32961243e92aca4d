"""The parity tests run on Keras' TensorFlow backend; they import the runners shared with
the main job from the ``benchmarks`` package (pytest puts the repository root on the path)."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
