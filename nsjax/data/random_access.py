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

Every record read is verified against the checksums the TFRecord framing carries (the masked
CRC-32C of its length field and of its payload; `record_problem`), as tf.data's sequential reader
does: a flipped byte in a stored probability or image would otherwise become a wrong label or
picture without a word. A record that fails stops the read with `DamagedRecord` (an
ArtifactError) naming the file, the record and the fix. The index walk checks each length field
the same way, so a damaged length is never taken for the end of a file cut short.
"""
from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import google_crc32c
import numpy as np
import tensorflow as tf

from nsjax import artifacts, parallel
from nsjax.files import atomic_write

RECORD_FRAMING = 16  # uint64 length, uint32 masked crc of it, payload, uint32 masked crc of payload
PAYLOAD_START = 12
_LENGTH_BYTES = 8
_CRC_MASK_DELTA = 0xA282EAD8  # TFRecord's (and LevelDB's) masking constant
_HEADER_CHUNK = 1 << 20
_IO_THREADS = 16


def is_local(path: str) -> bool:
  return "://" not in path


class DamagedRecord(artifacts.DamagedArtifact):
  """A record whose bytes do not match its checksums: the file changed after it was written."""


def masked_crc(data: bytes) -> int:
  """TFRecord's checksum of `data`: its CRC-32C rotated right by 15 bits, plus a constant."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def _stored_crc(data: bytes, at: int) -> int:
  return int.from_bytes(data[at:at + 4], "little")


def header_problem(header: bytes) -> str | None:
  """What is wrong with a record's header (length field, its masked CRC), or None."""
  if masked_crc(header[:_LENGTH_BYTES]) != _stored_crc(header, _LENGTH_BYTES):
    return "its length field does not match its checksum"
  return None


def record_problem(framed: bytes) -> str | None:
  """What is wrong with one framed record (header, payload, the payload's masked CRC), or None
  when its length field, the length read and both checksums agree."""
  problem = header_problem(framed)
  if problem:
    return problem
  length = int.from_bytes(framed[:_LENGTH_BYTES], "little")
  if length != len(framed) - RECORD_FRAMING:
    return (f"its length field says {length} bytes where its index says "
            f"{len(framed) - RECORD_FRAMING}")
  if masked_crc(framed[PAYLOAD_START:-4]) != _stored_crc(framed, len(framed) - 4):
    return "its payload does not match its checksum"
  return None


def damaged_record(path: str, record: int, offset: int, problem: str, fix: str) -> DamagedRecord:
  return DamagedRecord(path, f"record {record} (at byte {offset}) is damaged: {problem} "
                       "(TFRecord's masked CRC-32C); nothing is trained on it", fix)


def rebuild_tfds_fix(path: str) -> str:
  """How to write a TFDS dataset's file again: prepare the dataset anew (a new dataset_info.json
  also renews every record index of it, see `fingerprint`)."""
  folder = os.path.dirname(path)
  return (f"Rebuild that TFDS split: delete {folder} and prepare the dataset again (tfds build "
          "with the same name and data_dir; nsjax's embedded datasets and converted image "
          "folders are rebuilt by the next run on their own), then rerun the same command.")


def tfrecord_offsets(path: str) -> np.ndarray:
  """Byte offsets of the complete records of a TFRecord file, plus the end of the last one
  ([n + 1]). A file cut short ends at its last complete record; a length field that fails its
  checksum raises DamagedRecord (read as a length, it would cut the file short there)."""
  size = tf.io.gfile.stat(path).length
  offsets = [0]
  for header in _headers(path, size, offsets):
    problem = header_problem(header)
    if problem:
      raise damaged_record(path, len(offsets) - 1, offsets[-1], problem, rebuild_tfds_fix(path))
    end = offsets[-1] + int.from_bytes(header[:_LENGTH_BYTES], "little") + RECORD_FRAMING
    if end > size:
      break
    offsets.append(end)
  return np.asarray(offsets, np.int64)


def _headers(path: str, size: int, offsets: list[int]):
  """The 12-byte header at `offsets[-1]`, for as long as a whole record's framing fits (the
  caller appends each next offset)."""
  if is_local(path):
    with open(path, "rb") as f:
      while offsets[-1] + RECORD_FRAMING <= size:
        f.seek(offsets[-1])
        yield f.read(PAYLOAD_START)
    return
  with tf.io.gfile.GFile(path, "rb") as f:  # remote: one request per MiB, not per record
    buffer, buffer_start = b"", 0
    while offsets[-1] + RECORD_FRAMING <= size:
      at = offsets[-1] - buffer_start
      if at + PAYLOAD_START > len(buffer):
        f.seek(offsets[-1])
        buffer, buffer_start, at = f.read(_HEADER_CHUNK), offsets[-1], 0
      yield buffer[at:at + PAYLOAD_START]


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
  damage = None
  try:
    _index_missing(paths[share], index_paths[share], index_dir)
  except DamagedRecord as error:  # raised past the barrier, so the other hosts do not wait
    damage = error
  parallel.host_barrier("record-index-built")
  if damage is not None:
    raise damage
  _index_missing(paths, index_paths, index_dir)  # a damaged file's index is still missing
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

  Every record read is verified (`record_problem`). The first that fails is kept in `damage` as
  well as raised: a stream reads inside tf.data, where the error may be dropped (the labeled
  stream skips what fails to decode), so the stream's iterator calls `check()` before it hands
  out each batch, and no batch read after a damaged record is trained on. `fix(path)` is the fix
  its message names (default: rerun the stage that wrote the file, nsjax.artifacts.fix_for).
  """

  def __init__(self, paths: Sequence[str], table: Callable[[int], tuple[np.ndarray, np.ndarray]],
               table_bytes: Callable[[int], int], first_record: Sequence[int] | None = None,
               fix: Callable[[str], str] = artifacts.fix_for):
    self.paths = list(paths)
    self._table_fn, self._table_bytes, self._fix = table, table_bytes, fix
    self.damage: DamagedRecord | None = None
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
      problem = (f"the file ends before it (its record index wants bytes up to {end})"
                 if len(data) != end - start else record_problem(data))
      if problem:
        self._refuse(damaged_record(self.paths[k], r, start, problem, self._fix(self.paths[k])))
      out.append(data[PAYLOAD_START:len(data) - 4])
    with self._lock:
      self.bytes_read += sum(len(d) + RECORD_FRAMING for d in out)
    return out

  def _refuse(self, error: DamagedRecord) -> None:
    with self._lock:
      self.damage = self.damage or error
    raise error

  def check(self) -> None:
    """Raises the first damaged record met so far, if any (see the class docstring)."""
    damage = self.damage
    if damage is not None:
      raise DamagedRecord(damage.path, damage.problem, damage.fix)

  def _read_range(self, k: int, start: int, size: int) -> bytes:
    path = self.paths[k]
    if is_local(path):
      with self._lock:
        if k not in self._handles:
          if len(self._handles) >= 64:
            self._close_handles()
          self._handles[k] = os.open(path, os.O_RDONLY)
        fd = self._handles[k]
      return os.pread(fd, size, start)
    with tf.io.gfile.GFile(path, "rb") as f:
      f.seek(start)
      return f.read(size)

  def _close_handles(self) -> None:
    for fd in self._handles.values():
      os.close(fd)
    self._handles.clear()

  def close(self) -> None:
    with self._lock:
      self._close_handles()
