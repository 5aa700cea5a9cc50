"""Random access to TFRecord files: read any record by its byte offset, on local disk or gs://.

Training streams (labeled TFDS splits and pseudo-label shards) are read by position rather than
sequentially (nsjax.data.balanced_order), so each host reads only the records of its own rows
of each global batch, and a resume reads nothing before its step. That needs each record's byte
offset:
  - pseudo-label shards store them in their sidecars when they are written;
  - TFDS's TFRecord files do not, so `index_tfds_files` computes them once per file, by walking
    the record headers (8-byte lengths; the payloads are skipped, not read, on local disk), and
    caches them as `<file name>.<fingerprint>.offsets.npy` in an index directory (the workdir's
    `record_index/` in a run; the fingerprint is the size and mtime of the dataset's
    dataset_info.json). The hosts split the files between them.

Why TFRecord and not ArrayRecord (+ Grain): the open-source ArrayRecord reader cannot open gs://
paths (google/array_record#120; riegeli has no open GCS reader), while a TPU run keeps its data
and workdir on GCS; TFRecord through tf.io.gfile reads them directly, keeps the TFDS datasets
users already prepared, and needs no new dependency. The order and per-host slicing that Grain's
index sampler would give are in nsjax.data.balanced_order.
"""
from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from nsjax import parallel
from nsjax.files import atomic_write

RECORD_FRAMING = 16  # uint64 length, uint32 masked crc of it, payload, uint32 masked crc of payload
PAYLOAD_START = 12
_HEADER_CHUNK = 1 << 20
_IO_THREADS = 16


def is_local(path: str) -> bool:
  return "://" not in path


def tfrecord_offsets(path: str) -> np.ndarray:
  """Byte offsets of the complete records of a TFRecord file, plus the end of the last one
  ([n + 1]). A file cut short ends at its last complete record."""
  size = tf.io.gfile.stat(path).length
  offsets = [0]
  if is_local(path):
    with open(path, "rb") as f:
      while offsets[-1] + RECORD_FRAMING <= size:
        f.seek(offsets[-1])
        length = int.from_bytes(f.read(8), "little")
        end = offsets[-1] + length + RECORD_FRAMING
        if end > size:
          break
        offsets.append(end)
  else:  # remote: read sequentially in large chunks (one request per MiB, not per record)
    with tf.io.gfile.GFile(path, "rb") as f:
      buffer, buffer_start = b"", 0
      while offsets[-1] + RECORD_FRAMING <= size:
        at = offsets[-1] - buffer_start
        if at + 8 > len(buffer):
          f.seek(offsets[-1])
          buffer, buffer_start, at = f.read(_HEADER_CHUNK), offsets[-1], 0
        length = int.from_bytes(buffer[at:at + 8], "little")
        end = offsets[-1] + length + RECORD_FRAMING
        if end > size:
          break
        offsets.append(end)
  return np.asarray(offsets, np.int64)


def offsets_path(index_dir: str, path: str, stamp: str) -> str:
  """Where `path`'s offsets are cached: named by the file and its fingerprint, so a file rebuilt
  or replaced in place (another dataset version, a regenerated split) is indexed afresh instead
  of being read at the old file's offsets."""
  return os.path.join(index_dir, f"{os.path.basename(path)}.{stamp}.offsets.npy")


def fingerprint(path: str) -> str:
  """The file's size and modification time (as make and rsync judge a file changed)."""
  stat = tf.io.gfile.stat(path)
  return f"{stat.length}-{stat.mtime_nsec}"


def _fingerprints(paths: Sequence[str]) -> list[str]:
  """Each file's fingerprint. The files of a prepared TFDS dataset take that of its
  dataset_info.json, which TFDS writes anew whenever it prepares the dataset: one request per
  dataset instead of one per file (a split can have thousands, and every host of a run asks at
  every stage start). Other files take their own."""
  folders = sorted({os.path.dirname(path) for path in paths})

  def dataset_stamp(folder):
    info = os.path.join(folder, "dataset_info.json")
    return "info-" + fingerprint(info) if tf.io.gfile.exists(info) else None

  by_folder = dict(zip(folders, _in_parallel(dataset_stamp, folders)))
  loose = [path for path in paths if by_folder[os.path.dirname(path)] is None]
  by_file = dict(zip(loose, _in_parallel(fingerprint, loose)))
  return [by_folder[os.path.dirname(path)] or by_file[path] for path in paths]


def _save_offsets(path: str, index_path: str) -> None:
  buffer = io.BytesIO()
  np.save(buffer, tfrecord_offsets(path))

  def write(tmp):
    with tf.io.gfile.GFile(tmp, "wb") as f:
      f.write(buffer.getvalue())

  atomic_write(index_path, write)


def _in_parallel(fn: Callable, items: Sequence) -> list:
  """fn over items on a few threads: each call is a file-system request, which on GCS waits
  tens of milliseconds."""
  with ThreadPoolExecutor(_IO_THREADS) as pool:
    return list(pool.map(fn, items))


def _index_missing(paths: Sequence[str], index_paths: Sequence[str], index_dir: str) -> None:
  present = set(tf.io.gfile.listdir(index_dir))  # one listing, not a request per file
  _in_parallel(lambda pair: _save_offsets(*pair),
               [(p, i) for p, i in zip(paths, index_paths) if os.path.basename(i) not in present])


def index_tfds_files(paths: Sequence[str], index_dir: str, process_index: int,
                     process_count: int) -> list[str]:
  """The offset index of each file (read them with `load_offsets`), built where missing: each
  process indexes its share of the files, waits for the others, then indexes whatever is still
  missing (an index directory that is not shared between hosts). Every process of a run must
  call it (it holds a barrier): whether an index exists is not known alike on all hosts while
  another host may be writing it.

  An index is named by its file and the file's fingerprint (`_fingerprints`), so a dataset
  prepared again in place, or another one at the same path, is indexed afresh instead of being
  read at the old files' offsets (its records would fail to parse and be dropped, silently)."""
  tf.io.gfile.makedirs(index_dir)
  paths = list(paths)
  index_paths = [offsets_path(index_dir, path, stamp)
                 for path, stamp in zip(paths, _fingerprints(paths))]
  share = slice(process_index, None, process_count)
  _index_missing(paths[share], index_paths[share], index_dir)
  parallel.host_barrier("record-index-built")
  _index_missing(paths, index_paths, index_dir)
  return index_paths


def load_offsets(index_path: str) -> np.ndarray:
  with tf.io.gfile.GFile(index_path, "rb") as f:
    return np.load(io.BytesIO(f.read()))


def host_rows(read: Callable[[np.ndarray], list[bytes]], first_batch: int, global_batch: int,
              process_index: int, local_batch: int) -> tf.data.Dataset:
  """(stream position, serialized record) of this process's rows of global batches first_batch,
  first_batch + 1, ...: rows [process_index * local_batch, (process_index + 1) * local_batch) of
  each, fetched by `read(positions)` two batches at a time, in order. Every training stream (labeled
  and pseudo-labeled) is cut into host batches here, so they slice hosts alike."""

  def read_batch(batch):
    positions = int(batch) * global_batch + process_index * local_batch + np.arange(local_batch)
    return np.array(read(positions), dtype=object), positions.astype(np.int64)

  def fetch(batch):
    records, positions = tf.numpy_function(read_batch, [batch], (tf.string, tf.int64),
                                           stateful=False)
    return tf.ensure_shape(positions, [local_batch]), tf.ensure_shape(records, [local_batch])

  return (tf.data.Dataset.range(int(first_batch), np.iinfo(np.int64).max)
          .map(fetch, num_parallel_calls=2, deterministic=True)
          .unbatch())


class RecordReader:
  """Reads records of a list of TFRecord files by (file, record) index. Thread-safe; counts the
  bytes it reads (records and tables).

  `table(k) -> (offsets [n + 1], extra)` gives file k's record offsets (and whatever else the
  stream needs of it, e.g. balance copies); tables are cached, a bounded number at a time.
  `first_record[k]` is added to record indices (TFDS file instructions may skip records).
  """

  def __init__(self, paths: Sequence[str], table: Callable[[int], tuple[np.ndarray, np.ndarray]],
               table_bytes: Callable[[int], int], first_record: Sequence[int] | None = None):
    self.paths = list(paths)
    self._table_fn, self._table_bytes = table, table_bytes
    self._first = np.zeros(len(paths), np.int64) if first_record is None else np.asarray(
        first_record, np.int64)
    self.bytes_read = 0  # records and tables
    self.table_bytes_read = 0
    self._tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._handles: dict[int, int] = {}
    self._lock = threading.Lock()

  def table(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    with self._lock:
      if k not in self._tables:
        if len(self._tables) >= 256:  # a window spans a few files; never the whole set
          self._tables.clear()
        size = self._table_bytes(k)
        self.bytes_read += size
        self.table_bytes_read += size
        self._tables[k] = self._table_fn(k)
      return self._tables[k]

  def read(self, files: np.ndarray, records: np.ndarray) -> list[bytes]:
    """The records' payloads, in the order asked; b"" for a record beyond the end of a file that
    was cut short (its decoding fails and the stream counts it as skipped)."""
    out = []
    for k, r in zip(np.asarray(files).tolist(), np.asarray(records).tolist()):
      offsets = self.table(k)[0]
      r += int(self._first[k])
      if r + 1 >= len(offsets):
        out.append(b"")
        continue
      start, end = int(offsets[r]), int(offsets[r + 1])
      data = self._read_range(k, start, end - start)
      out.append(data[PAYLOAD_START:len(data) - 4])
    with self._lock:
      self.bytes_read += sum(len(d) + RECORD_FRAMING for d in out)
    return out

  def _read_range(self, k: int, start: int, size: int) -> bytes:
    path = self.paths[k]
    if is_local(path):
      with self._lock:
        if k not in self._handles:
          if len(self._handles) >= 64:
            self._close_handles()
          self._handles[k] = os.open(path, os.O_RDONLY)
        fd = self._handles[k]
      data = os.pread(fd, size, start)
    else:
      with tf.io.gfile.GFile(path, "rb") as f:
        f.seek(start)
        data = f.read(size)
    if len(data) != size:
      raise IOError(f"{path} is shorter than its record index says (wanted bytes [{start}, "
                    f"{start + size})): the file was changed or damaged after it was indexed. "
                    "Pseudo-label shards: delete the label directory and relabel; TFDS files: "
                    "delete the run's record_index/ folder so it is rebuilt.")
    return data

  def _close_handles(self) -> None:
    for fd in self._handles.values():
      os.close(fd)
    self._handles.clear()

  def close(self) -> None:
    with self._lock:
      self._close_handles()
