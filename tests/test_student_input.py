"""The student's pseudo-label stream: the same global batches for any number of hosts, each host
reading only its rows, exact resume at any step without reading through the epoch."""
import numpy as np
import pytest
import tensorflow as tf

from nsjax.data import balanced_order, pseudo_labels, student_input, synthetic


def view(image, seed):
  del seed
  return tf.cast(image, tf.float32)  # 28x28x1 PNGs: the decoded pixels themselves


@pytest.fixture(scope="module")
def label_set(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("labels"))
  plan, _ = synthetic.write_label_set(directory, 1000, num_classes=5, num_hosts=2,
                                      shard_bytes=40_000, batch=50, num_image=150, block_size=64)
  return directory, plan


def batches(label_set, count, index=0, start=0, n=6, local=8, reader_out=None):
  directory, plan = label_set
  it = student_input.pseudo_label_batches(
      directory, plan, local_batch_size=local, view_fn=view, seed=3, start_step=start,
      shuffle_buffer=300, process_index=index, process_count=count, reader_out=reader_out)
  return [next(it) for _ in range(n)]


def test_the_set_has_several_shards_and_balanced_copies(label_set):
  directory, plan = label_set
  assert len(pseudo_labels.read_manifest(directory)["shards"]) >= 8  # ~850-byte records, 40 kB
  assert len(plan.block_counts) == 16  # blocks of 64 records
  assert sum(plan.block_counts) != 1000  # balancing dropped and duplicated records


@pytest.mark.parametrize("count", [2, 4])
def test_global_batches_do_not_depend_on_the_number_of_hosts(label_set, count):
  one = batches(label_set, 1, local=16)
  hosts = [batches(label_set, count, index=i, local=16 // count) for i in range(count)]
  for step, whole in enumerate(one):
    for key in ("image", "probs"):
      np.testing.assert_array_equal(np.concatenate([h[step][key] for h in hosts]), whole[key])


def test_resume_at_any_step_is_exact(label_set):
  straight = batches(label_set, 1, n=40, local=32)  # 1280 positions: past the first epoch
  for start in (1, 17, 39):
    resumed = batches(label_set, 1, start=start, n=1, local=32)[0]
    for key in ("image", "probs"):
      np.testing.assert_array_equal(resumed[key], straight[start][key])


def test_each_host_reads_its_share_of_the_bytes(label_set):
  read = {}
  for count in (1, 4):
    out = []
    batches(label_set, count, n=20, local=32 // count, reader_out=out)
    read[count] = out[0].bytes_read
  assert read[4] <= 1.2 * read[1] / 4, read


def test_an_epoch_is_the_plans_multiset_in_a_new_order(label_set):
  directory, plan = label_set
  order, blocks, reader, manifest = student_input.open_stream(directory, plan, seed=3, window=300)
  size = order.epoch_size
  assert size == sum(plan.block_counts)

  def epoch(e):
    positions = np.arange(e * size, (e + 1) * size)
    shards, records = student_input.locate_records(order, blocks, positions)
    return list(zip(shards.tolist(), records.tolist()))

  first, second = epoch(0), epoch(1)
  expected = sorted((k, r) for k in range(len(manifest["shards"]))
                    for r, c in enumerate(reader.table(k)[1]) for _ in range(c))
  assert sorted(first) == sorted(second) == expected
  assert first != second  # each epoch has its own order
  # Consecutive batches mix several shards (a window spans shards in a random order).
  assert len({k for k, _ in first[:64]}) >= 3


def test_order_is_a_pure_function_of_seed_and_position(label_set):
  directory, plan = label_set
  a, *_ = student_input.open_stream(directory, plan, seed=3, window=300)
  b, *_ = student_input.open_stream(directory, plan, seed=3, window=300)
  positions = np.array([5000, 3, 999, 4, 2500])
  np.testing.assert_array_equal(np.stack(a.locate(positions)), np.stack(b.locate(positions)))
  c, *_ = student_input.open_stream(directory, plan, seed=4, window=300)
  assert not np.array_equal(np.stack(a.locate(np.arange(64))), np.stack(c.locate(np.arange(64))))


def test_a_plan_without_block_counts_names_the_fix(label_set):
  directory, plan = label_set
  old = type(plan)(**dict(plan.to_json(), block_counts=None))
  with pytest.raises(ValueError, match="rerun the label stage"):
    student_input.open_stream(directory, old, seed=0)


def test_the_stream_does_not_depend_on_how_many_hosts_labeled(tmp_path):
  # The records' sequence is the unlabeled split's whichever hosts labeled it; shards differ.
  streams = []
  for hosts in (1, 3):
    directory = str(tmp_path / f"h{hosts}")
    plan, _ = synthetic.write_label_set(directory, 500, num_classes=5, num_hosts=hosts,
                                        shard_bytes=20_000, batch=50, num_image=80, block_size=64)
    order, blocks, reader, _ = student_input.open_stream(directory, plan, seed=1, window=200)
    streams.append([pseudo_labels.parse_fn(5, 0)(r)["id"].numpy() for r in reader.read(
        *student_input.locate_records(order, blocks, np.arange(700)))])
  assert streams[0] == streams[1]


def test_a_plan_that_keeps_nothing_is_refused():
  with pytest.raises(ValueError, match="keeps no pseudo-labeled images"):
    balanced_order.BalancedOrder([0, 0], lambda k: np.zeros(3, np.int64), seed=0, window=10)


def test_an_image_that_does_not_decode_stops_the_stream_naming_the_fix(tmp_path, monkeypatch):
  # The label stage writes only images that decoded: one that does not is damage, never dropped
  # (that would shift every later batch off its step).
  monkeypatch.setattr(synthetic, "png_images", lambda n, seed: [b"not an image"] * n)
  directory = str(tmp_path)
  plan, _ = synthetic.write_label_set(directory, 100, num_classes=5, batch=50)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=rf"(?s)Reading the pseudo-labeled records in {directory} failed: .*"
                           rf"damaged shard: delete {directory} and rerun the label stage"):
    batches((directory, plan), 1, n=1)
