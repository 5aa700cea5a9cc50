"""Image folders as data sources: the folder example schedule end to end, rebuild caching, layout
errors, and class-name checks between models and data."""
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from nsjax import config_lib, exported_model, parallel, pipeline
from nsjax.data import folder, input_pipeline, pseudo_labels
from nsjax.stages import evaluate as eval_stage
from nsjax.stages import teachers
from nsjax.stages import train as train_stage
from nsjax.stages.context import Context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = {"cat": (200, 40, 40), "dog": (40, 200, 40), "emu": (40, 40, 200)}


def load_example(arg):
  path = os.path.join(ROOT, "configs", "folder_example.py")
  spec = importlib.util.spec_from_file_location("folder_example", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def write_png(path, color, size=(20, 24), seed=0, mode="RGB"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  pixels = (np.asarray(color) + rng.integers(-30, 30, size + (3,))).clip(0, 255).astype(np.uint8)
  image = Image.fromarray(pixels)
  image = image.convert(mode) if mode != "RGB" else image
  image.save(path)


def write_bytes(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def make_labeled(root, classes=CLASSES, per_class=8, bad_files=False):
  for c, color in classes.items():
    for i in range(per_class):
      write_png(f"{root}/{c}/{i:02d}.png", color, size=(20 + i, 24), seed=i)
    write_png(f"{root}/{c}/nested/deeper/extra.jpg", color, seed=99)  # nesting inside a class
    write_png(f"{root}/{c}/gray.bmp", color, seed=7, mode="L")  # a non-JPEG/PNG format
  write_bytes(f"{root}/.DS_Store", b"ignored")
  if bad_files:
    write_bytes(f"{root}/cat/truncated.png", open(f"{root}/cat/00.png", "rb").read()[:60])
    write_bytes(f"{root}/dog/empty.jpg", b"")
    write_bytes(f"{root}/emu/notes.txt", b"not an image")
  return root


def make_unlabeled(root, n=40):
  for i in range(n):
    color = list(CLASSES.values())[i % 3]
    write_png(f"{root}/batch{i % 4}/sub/{i:03d}.png", color, size=(24, 20 + i % 5), seed=100 + i)
  write_bytes(f"{root}/batch0/corrupt.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 50)
  return root


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
  data = tmp_path_factory.mktemp("images")
  make_labeled(str(data / "labeled"), bad_files=True)
  make_unlabeled(str(data / "unlabeled"))
  make_labeled(str(data / "test"), per_class=4)
  workdir = str(tmp_path_factory.mktemp("work"))
  config = load_example(f"{data},tiny")
  state = pipeline.run(config, workdir)
  return config, workdir, state, str(data)


def test_folder_example_runs_the_whole_schedule(example_run):
  config, workdir, state, data = example_run
  expected = ["teacher", "label-1", "student-1", "eval-teacher", "eval-student-1", "summary"]
  assert sorted(state["completed"]) == sorted(expected)
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  rows = summary["iterations"]
  assert [r["role"] for r in rows] == ["teacher", "student"]
  for r in rows:
    assert 0.0 <= r["test_top1"] <= r["test_top5"] <= 1.0
  # Three bad labeled files and one bad unlabeled file: skipped and counted, never a crash.
  skipped = summary["skipped_files"]
  assert skipped["labeled"]["num_skipped"] == 3
  assert skipped["labeled"]["skipped_by_reason"] == {"corrupt": 1, "empty": 1, "not an image": 1}
  assert sorted(skipped["labeled"]["skipped_files"]) == ["cat/truncated.png", "dog/empty.jpg",
                                                        "emu/notes.txt"]
  assert skipped["unlabeled"]["num_skipped"] == 1
  assert skipped["unlabeled"]["skipped_files"] == ["batch0/corrupt.jpg"]
  assert skipped["test"]["num_skipped"] == 0
  # 3 classes x (8 PNG + 1 nested JPEG + 1 BMP) labeled; 4 + 2 per class in test.
  sources = json.load(open(os.path.join(workdir, folder.SOURCES_FILE)))
  assert sources["labeled"]["num_examples"] == 30
  assert sources["test"]["num_examples"] == 18
  assert sources["unlabeled"]["num_examples"] == 40


def test_class_names_and_count_travel_with_the_exports(example_run):
  _, workdir, _, _ = example_run
  for stage in ("teacher", "student-1"):
    description = exported_model.read_description(pipeline.export_dir(workdir, stage))
    assert description["model"]["num_classes"] == 3
    assert description["metadata"]["class_names"] == ["cat", "dog", "emu"]


def test_pseudo_labels_cover_every_readable_unlabeled_image(example_run):
  _, workdir, _, _ = example_run
  manifest = pseudo_labels.read_manifest(os.path.join(workdir, "label-1"))
  assert manifest["num_examples"] == 40
  records = list(pseudo_labels.read_dataset(os.path.join(workdir, "label-1")).as_numpy_iterator())
  ids = sorted(r["id"].decode() for r in records)
  assert ids == sorted(f"batch{i % 4}/sub/{i:03d}.png" for i in range(40))
  assert np.stack([r["probs"] for r in records]).shape == (40, 3)


def test_labeled_images_decode_with_their_labels(tmp_path):
  labeled = make_labeled(str(tmp_path / "labeled"), per_class=2)
  name, data_dir, split = folder.materialize(labeled, "labeled", str(tmp_path / "cache"))
  src = input_pipeline.Source(name, split, data_dir)
  assert folder.source_class_names(src) == ["cat", "dog", "emu"]
  builder = input_pipeline.load_builder(name, data_dir)
  examples = list(builder.as_dataset(split=split).as_numpy_iterator())
  assert len(examples) == 12
  for ex in examples:
    rel = ex["id"].decode()
    assert ex["label"] == ["cat", "dog", "emu"].index(rel.split("/")[0])
    assert ex["image"].ndim == 3 and ex["image"].shape[-1] == 3
    if rel.endswith("gray.bmp"):  # re-encoded; grayscale comes back as equal RGB channels
      assert np.array_equal(ex["image"][..., 0], ex["image"][..., 2])
    elif rel.endswith("00.png"):  # kept as given: exactly the pixels written
      np.testing.assert_array_equal(ex["image"], np.asarray(Image.open(os.path.join(labeled, rel))))


def test_unchanged_folder_is_reused_and_a_changed_one_rebuilt(tmp_path):
  labeled = make_labeled(str(tmp_path / "labeled"), per_class=2)
  cache = str(tmp_path / "cache")
  first = folder.build(labeled, "labeled", cache)
  assert first["rebuilt"] and first["num_examples"] == 12
  info_file = os.path.join(cache, first["name"], "1.0.0", "dataset_info.json")
  built_at = os.stat(info_file).st_mtime_ns
  again = folder.build(labeled, "labeled", cache)
  assert not again["rebuilt"] and again["fingerprint"] == first["fingerprint"]
  assert os.stat(info_file).st_mtime_ns == built_at  # nothing was rewritten
  write_png(f"{labeled}/dog/new.png", CLASSES["dog"], seed=5)
  changed = folder.build(labeled, "labeled", cache)
  assert changed["rebuilt"] and changed["fingerprint"] != first["fingerprint"]
  assert changed["num_examples"] == 13 and changed["examples_per_class"]["dog"] == 5
  builder = input_pipeline.load_builder(changed["name"], cache)
  assert builder.info.splits["train"].num_examples == 13


def test_unlabeled_folder_needs_no_structure(tmp_path):
  unlabeled = make_unlabeled(str(tmp_path / "u"), n=6)
  write_png(str(tmp_path / "u" / "top.png"), (9, 9, 9))
  result = folder.build(unlabeled, "unlabeled", str(tmp_path / "cache"))
  assert result["num_examples"] == 7 and result["num_skipped"] == 1
  assert result["class_names"] is None
  src = input_pipeline.Source(result["name"], "train", str(tmp_path / "cache"))
  assert folder.source_class_names(src) is None


def test_bad_labeled_layouts_get_clear_errors(tmp_path):
  cache = str(tmp_path / "cache")
  top = make_labeled(str(tmp_path / "top"), per_class=1)
  write_png(f"{top}/stray.png", (0, 0, 0))
  with pytest.raises(folder.FolderError, match="files at its top level.*'stray.png'"):
    folder.build(top, "labeled", cache)
  empty = make_labeled(str(tmp_path / "empty"), per_class=1)
  os.makedirs(f"{empty}/fox")
  with pytest.raises(folder.FolderError, match="'fox'.*no files"):
    folder.build(empty, "labeled", cache)
  unreadable = make_labeled(str(tmp_path / "unreadable"), per_class=1)
  write_bytes(f"{unreadable}/fox/a.png", b"\x89PNG\r\n\x1a\n garbage")
  with pytest.raises(folder.FolderError, match="'fox'.*no readable image"):
    folder.build(unreadable, "labeled", cache)
  with pytest.raises(folder.FolderError, match="does not exist"):
    folder.build(str(tmp_path / "missing"), "labeled", cache)


def test_class_mismatch_between_teacher_and_data_is_an_error(example_run, tmp_path):
  config, workdir, _, data = example_run
  teacher_dir = pipeline.export_dir(workdir, "teacher")
  student = train_stage.build_model(config.students[0], pipeline.resolve_data(config, workdir)[0])
  with pytest.raises(folder.ClassMismatchError,
                     match=r"only in the teacher at .*\['emu'\]; only in the student's labeled "
                           r"data: \['fox'\]"):
    teachers.check_teacher_export(teacher_dir, student.num_classes, ["cat", "dog", "fox"],
                                  "the student's labeled data")
  teachers.check_teacher_export(teacher_dir, student.num_classes, ["cat", "dog", "emu"],
                                "the student's labeled data")  # the same classes pass
  # An eval whose test classes differ from the model's.
  other = make_labeled(str(tmp_path / "other"), classes={"ant": (1, 2, 3), "bee": (4, 5, 6),
                                                         "cat": (7, 8, 9)}, per_class=1)
  changed = load_example(f"{data},tiny")
  changed.data.labeled.folder = other
  changed.data.test.folder = other
  changed.data.folder_cache_dir = os.path.join(workdir, folder.CACHE_SUBDIR)  # reuse the builds
  resolved, data_dir = pipeline.resolve_data(changed, str(tmp_path / "work"))
  with pytest.raises(folder.ClassMismatchError,
                     match=r"only in the teacher model: \['dog', 'emu'\]"):
    eval_stage.run(pipeline.Stage("eval-teacher", "eval", 0),
                   Context(resolved, workdir, data_dir, parallel.make_mesh(), None, 0.0))


def test_labeled_and_test_folders_must_share_classes(tmp_path):
  labeled = make_labeled(str(tmp_path / "labeled"), per_class=1)
  test = make_labeled(str(tmp_path / "test"), classes={"cat": (1, 1, 1), "dog": (2, 2, 2)},
                      per_class=1)
  config = load_example(f"{tmp_path},tiny")
  config.data.unlabeled = config_lib.data_source(folder=labeled, kind="unlabeled")
  config.data.test.folder = test
  with pytest.raises(folder.ClassMismatchError, match=r"only in the labeled data: \['emu'\]"):
    folder.resolve_sources(config, str(tmp_path / "work"))


def test_num_classes_comes_from_the_labeled_source():
  assert folder.resolve_num_classes(0, ["a", "b"]) == 2
  assert folder.resolve_num_classes(2, ["a", "b"]) == 2
  assert folder.resolve_num_classes(7, None) == 7
  with pytest.raises(folder.FolderError, match="num_classes = 3.*has 2 classes"):
    folder.resolve_num_classes(3, ["a", "b"])
  with pytest.raises(folder.FolderError, match="set config.data.num_classes"):
    folder.resolve_num_classes(0, None)


def test_class_difference_names_order_changes():
  assert folder.class_difference(["a", "b"], ["a", "b"], "x", "y") == ""
  assert "label 0 is 'a' in x but 'b' in y" in folder.class_difference(["a", "b"], ["b", "a"],
                                                                      "x", "y")


def test_data_source_takes_a_name_or_a_folder():
  src = config_lib.data_source(folder="gs://bucket/images", kind="unlabeled")
  assert (src.folder, src.kind, src.split, src.name) == ("gs://bucket/images", "unlabeled",
                                                         "train", "")
  assert "folder" not in config_lib.data_source("mnist5k/labels_10", "train")
  with pytest.raises(ValueError, match="exactly one of"):
    config_lib.data_source("mnist5k", "train", folder="x")
  with pytest.raises(ValueError, match="kind="):
    config_lib.data_source(folder="x", kind="test")
  config = load_example("/data,tiny")
  config.data.test.kind = "unlabeled"
  with pytest.raises(folder.FolderError, match="test data needs labels"):
    folder.resolve_sources(config, "/tmp/unused")
