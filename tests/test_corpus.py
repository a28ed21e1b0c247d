"""Corpus readers: webdataset tars, CSV/TSV + files, and a TFDS dataset built locally; planning
into slices covers every key once, in order; bad pairs come back as items, never as exceptions."""

import io

import numpy as np
import pytest

from clipzoo_jax.data import records
from clipzoo_jax.pseudo_label import corpus
from tests.helpers import write_tar


def _jpeg(seed):
  return records.encode_jpeg(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), np.uint8))


def _read_all(reader, slices=None):
  return [item for part in (slices or reader.plan()) for item in reader.read(part)]


def test_expand_braces_like_webdataset():
  assert corpus.expand_braces("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
  assert corpus.expand_braces("{8..10}") == ["8", "9", "10"]
  assert corpus.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
  assert corpus.expand_braces("plain.tar") == ["plain.tar"]


def test_tar_reader_groups_members_by_key(tmp_path):
  jpeg = _jpeg(0)
  path = write_tar(tmp_path / "00000.tar", [
      ("000.jpg", jpeg), ("000.txt", b"a red ball "), ("000.json", b'{"caption": "ignored"}'),
      ("001.jpg", jpeg), ("001.json", b'{"caption": "from json"}'),
      ("sub/002.jpeg", jpeg), ("sub/002.txt", b"nested key"),
      ("003.txt", b"no image here"),
      ("004.jpg", jpeg),
      (".hidden", b"x"),
  ])
  items = _read_all(corpus.TarCorpus(path))
  assert [i.key for i in items] == ["000", "001", "sub/002", "003", "004"]
  assert [i.caption for i in items] == ["a red ball", "from json", "nested key", "no image here", None]
  assert items[0].image == jpeg and items[2].image == jpeg
  assert items[3].image is None and "missing image" in items[3].problem and ".txt" in items[3].problem
  assert items[4].problem is None


def test_tar_slices_cover_every_key_once_in_order(tmp_path):
  paths = [write_tar(tmp_path / f"{t:05d}.tar",
                     [m for i in range(7) for m in ((f"{t}-{i}.jpg", _jpeg(i)), (f"{t}-{i}.txt", b"c"))])
           for t in range(2)]
  pattern = str(tmp_path / "{00000..00001}.tar")
  whole = corpus.TarCorpus(pattern)
  assert whole.plan() == [corpus.Slice(p) for p in paths]
  sliced = corpus.TarCorpus(pattern, records_per_shard=3)
  plan = sliced.plan()
  assert [(s.start, s.stop) for s in plan] == [(0, 3), (3, 6), (6, 7)] * 2
  assert [s.count for s in plan] == [3, 3, 1] * 2
  assert [i.key for i in _read_all(sliced)] == [i.key for i in _read_all(whole)]
  assert len({i.key for i in _read_all(whole)}) == 14


def test_truncated_tar_yields_a_problem_item(tmp_path):
  path = write_tar(tmp_path / "t.tar", [(f"{i}.jpg", _jpeg(i) * 20) for i in range(4)])
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])
  items = _read_all(corpus.TarCorpus(path))
  assert items[-1].problem and "unreadable tar" in items[-1].problem
  assert all(i.problem is None for i in items[:-1])


def test_missing_tar_is_named(tmp_path):
  write_tar(tmp_path / "0.tar", [("a.jpg", b"x")])
  with pytest.raises(corpus.CorpusError, match=r"1 of 2 tar files do not exist.*1\.tar"):
    corpus.TarCorpus(str(tmp_path / "{0..1}.tar"))


def test_csv_reader_relative_paths_keys_and_missing_files(tmp_path):
  (tmp_path / "img").mkdir()
  jpeg = _jpeg(1)
  (tmp_path / "img" / "a.jpg").write_bytes(jpeg)
  (tmp_path / "b.jpg").write_bytes(jpeg)
  (tmp_path / "pairs.csv").write_text(
      "id,file,text\nx1,img/a.jpg,\"a cat, sitting\"\nx2,missing.jpg,a dog\n"
      f"x3,{tmp_path / 'b.jpg'},absolute path\nx4,img/a.jpg,\n")
  reader = corpus.CsvCorpus(str(tmp_path / "pairs.csv"), image_column="file",
                            caption_column="text", key_column="id", records_per_shard=3)
  assert [(s.start, s.stop) for s in reader.plan()] == [(0, 3), (3, 4)]
  items = _read_all(reader)
  assert [i.key for i in items] == ["x1", "x2", "x3", "x4"]
  assert items[0].image == jpeg and items[0].caption == "a cat, sitting"
  assert items[1].image is None and "missing.jpg" in items[1].problem
  assert items[2].image == jpeg
  assert items[3].caption is None


def test_tsv_without_header_by_column_index(tmp_path):
  (tmp_path / "a.jpg").write_bytes(_jpeg(2))
  (tmp_path / "pairs.tsv").write_text("first caption\ta.jpg\nsecond\ta.jpg\n")
  reader = corpus.make_corpus({"kind": "tsv", "path": str(tmp_path / "pairs.tsv"),
                               "image_column": 1, "caption_column": 0, "has_header": False})
  items = _read_all(reader)
  assert [(i.key, i.caption) for i in items] == [("pairs-000000000", "first caption"),
                                                  ("pairs-000000001", "second")]


def test_csv_unknown_column_names_the_file_and_columns(tmp_path):
  (tmp_path / "p.csv").write_text("image,text\n")
  with pytest.raises(corpus.CorpusError, match=r"column 'caption' not in the header.*'image', 'text'"):
    corpus.CsvCorpus(str(tmp_path / "p.csv")).plan()


@pytest.mark.slow
def test_tfds_reader_keeps_jpeg_bytes_and_slices(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  jpegs = [_jpeg(10 + i) for i in range(5)]

  class TinyCaptionsForCorpusTest(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"), "caption": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, jpeg in enumerate(jpegs):
        yield i, {"image": io.BytesIO(jpeg), "caption": f"caption {i}"}

  TinyCaptionsForCorpusTest(data_dir=str(tmp_path)).download_and_prepare()
  reader = corpus.make_corpus(dict(corpus.parse_spec("tfds:tiny_captions_for_corpus_test/train"),
                                   data_dir=str(tmp_path), records_per_shard=2))
  assert [s.count for s in reader.plan()] == [2, 2, 1]
  items = _read_all(reader)
  assert len({i.key for i in items}) == 5
  for item in items:
    assert item.image == jpegs[int(item.caption.split()[-1])]  # byte-identical, not re-encoded
  whole = corpus.TfdsCorpus("tiny_captions_for_corpus_test", data_dir=str(tmp_path),
                            records_per_shard=100)
  assert [i.key for i in _read_all(whole)] == [i.key for i in items]


def test_parse_spec():
  assert corpus.parse_spec("tar:/d/{0..3}.tar") == {"kind": "tar", "pattern": "/d/{0..3}.tar"}
  assert corpus.parse_spec("/d/x.tsv") == {"kind": "tsv", "path": "/d/x.tsv"}
  assert corpus.parse_spec("tfds:coco_captions/val") == {"kind": "tfds", "name": "coco_captions",
                                                         "split": "val"}
  with pytest.raises(corpus.CorpusError, match="expected tar:PATTERN"):
    corpus.parse_spec("/d/data.bin")
  with pytest.raises(corpus.CorpusError, match="corpus.kind"):
    corpus.make_corpus({"kind": "parquet"})


def test_csv_repeated_keys_are_refused_at_planning(tmp_path):
  (tmp_path / "p.csv").write_text("id,image,caption\nx,a.jpg,one\ny,b.jpg,two\nx,c.jpg,three\n")
  with pytest.raises(corpus.CorpusError, match=r"1 keys occur more than once, e\.g\. key 'x' in "
                                               r"row 1 and in row 3.*key_column empty"):
    corpus.CsvCorpus(str(tmp_path / "p.csv"), key_column="id").plan()
  assert len(corpus.CsvCorpus(str(tmp_path / "p.csv")).plan()) == 1  # row-number keys


def test_config_fields_of_other_kinds_do_not_apply(tmp_path):
  (tmp_path / "p.tsv").write_text("filepath\ttitle\n")
  reader = corpus.make_corpus({"kind": "tsv", "path": str(tmp_path / "p.tsv"), "pattern": "",
                               "image_column": "filepath", "caption_column": "title",
                               "key_by_source": False, "records_per_shard": 0, "data_dir": ""})
  assert reader.describe()["image_column"] == "filepath" and reader.records_per_shard == 10000
  with pytest.raises(corpus.CorpusError, match=r"unknown fields \['image_colum'\]"):
    corpus.make_corpus({"kind": "tsv", "path": str(tmp_path / "p.tsv"), "image_colum": "x"})
