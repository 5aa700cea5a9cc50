"""`tf.train.Example` records serialised straight to bytes, without Python protobuf objects.

Why not `tf.train.Example(...).SerializeToString()`: protobuf's Python runtime (upb) calls glibc's
`malloc_trim(0)` once every 10,000 freed message arenas, and a pseudo-label record makes about ten.
On a CPU run that keeps freed memory for reuse (`nsjax.host_memory`: one malloc arena, no
trimming), each such call hands every free page of that arena back to the system -- the inference
step's retained activations included -- and the next steps fault them all in again. Writing
pseudo-label shards that way cost the labeling stage a share of its throughput.

The wire format (proto3, `tensorflow/core/example/{example,feature}.proto`):
  Example   { Features features = 1; }
  Features  { map<string, Feature> feature = 1; }   // entries: { string key = 1; Feature value = 2; }
  Feature   { oneof { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
  BytesList { repeated bytes value = 1; }  FloatList { repeated float value = 1 [packed]; }
  Int64List { repeated int64 value = 1 [packed]; }
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

_BYTES_LIST, _FLOAT_LIST, _INT64_LIST = 1, 2, 3
_LENGTH_DELIMITED = 2


def _varint(value: int) -> bytes:
  """Base-128 varint; negative int64 values as their 64-bit two's complement (10 bytes)."""
  value &= (1 << 64) - 1
  out = bytearray()
  while value > 0x7F:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
  return _varint(field_number << 3 | _LENGTH_DELIMITED) + _varint(len(payload)) + payload


class Feature:
  """One feature's serialised value (a BytesList, FloatList or Int64List)."""

  __slots__ = ("serialized",)

  def __init__(self, kind: int, payload: bytes):
    self.serialized = _length_delimited(kind, payload)

  @classmethod
  def bytes_list(cls, values: Iterable[bytes]) -> Feature:
    return cls(_BYTES_LIST, b"".join(_length_delimited(1, bytes(v)) for v in values))

  @classmethod
  def float_list(cls, values) -> Feature:
    packed = np.asarray(values, "<f4").reshape(-1).tobytes()
    return cls(_FLOAT_LIST, _length_delimited(1, packed) if packed else b"")

  @classmethod
  def int64_list(cls, values) -> Feature:
    packed = b"".join(_varint(int(v)) for v in np.asarray(values, np.int64).reshape(-1))
    return cls(_INT64_LIST, _length_delimited(1, packed) if packed else b"")


def serialize_example(features: Mapping[str, Feature]) -> bytes:
  """The serialised `tf.train.Example` holding `features` (name -> Feature), in that order."""
  entries = b"".join(
      _length_delimited(1, _length_delimited(1, name.encode()) + _length_delimited(2, f.serialized))
      for name, f in features.items())
  return _length_delimited(1, entries)
