"""Hand-serialised tf.train.Example records equal protobuf's, field for field."""
import numpy as np
import pytest
import tensorflow as tf

from nsjax.data import example_proto
from nsjax.data.example_proto import Feature


def parsed(serialized: bytes) -> tf.train.Example:
  example = tf.train.Example()
  example.ParseFromString(serialized)  # raises on malformed bytes
  return example


def test_every_feature_kind_round_trips_through_protobuf():
  image = bytes(range(256)) * 600  # > 2^14 bytes: a 3-byte length varint
  ints = [0, 1, 127, 128, 300, 2**31, 2**63 - 1, -1, -(2**63)]
  floats = np.array([0.0, -1.5, 3.4e38, 1e-45, np.inf], np.float32)
  got = parsed(example_proto.serialize_example({
      "image": Feature.bytes_list([image, b""]), "ints": Feature.int64_list(ints),
      "floats": Feature.float_list(floats), "empty": Feature.int64_list([])}))
  expected = tf.train.Example(features=tf.train.Features(feature={
      "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image, b""])),
      "ints": tf.train.Feature(int64_list=tf.train.Int64List(value=ints)),
      "floats": tf.train.Feature(float_list=tf.train.FloatList(value=floats.tolist())),
      "empty": tf.train.Feature(int64_list=tf.train.Int64List(value=[]))}))
  assert got == expected
  assert got.features.feature["empty"].WhichOneof("kind") == "int64_list"


def test_tf_parses_the_records():
  serialized = example_proto.serialize_example({
      "label": Feature.int64_list([7]), "confidence": Feature.float_list([0.25]),
      "probs": Feature.bytes_list([np.array([0.5, 0.25], np.float16).tobytes()]),
      "classes": Feature.int64_list([3, 1])})
  ex = tf.io.parse_single_example(serialized, {
      "label": tf.io.FixedLenFeature([], tf.int64),
      "confidence": tf.io.FixedLenFeature([], tf.float32),
      "probs": tf.io.FixedLenFeature([], tf.string),
      "classes": tf.io.FixedLenFeature([2], tf.int64)})
  assert int(ex["label"]) == 7 and float(ex["confidence"]) == 0.25
  np.testing.assert_array_equal(ex["classes"], [3, 1])
  np.testing.assert_array_equal(tf.io.decode_raw(ex["probs"], tf.float16), [0.5, 0.25])


@pytest.mark.parametrize("value", [0, 1, 127, 128, 16383, 16384, 2**35 + 5, -1, -2])
def test_varints_match_protobuf(value):
  reference = tf.train.Int64List(value=[value]).SerializeToString()  # tag, length, varint
  assert reference[2:] == example_proto._varint(value)
