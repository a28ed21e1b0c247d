"""The miniature's uncurated corpus (tars the real pseudo-label reader takes, noise as configured
and recorded, resumable and refusing other params) and the toy world's richer captions (counts,
sizes, positions, room colours and mention order all true of the image)."""

import collections
import os
import re

import pytest

from clipzoo_jax import cli
from clipzoo_jax.data import records, toyworld
from clipzoo_jax.evals import datasets
from clipzoo_jax.miniature import corpus as miniature_corpus
from clipzoo_jax.pseudo_label import corpus as corpus_lib

SEED, COUNT, TARS, SIZE = 3007, 40, 3, 48
NOISE = dict(wrong=0.2, vague=0.1)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """A small corpus, its pattern, its tars' bytes and the log of writing it."""
  out_dir = str(tmp_path_factory.mktemp("corpus"))
  lines = []
  pattern = miniature_corpus.write_corpus(out_dir, COUNT, seed=SEED, num_tars=TARS, noise=NOISE,
                                          size=SIZE, log=lines.append)
  tars = {name: open(os.path.join(out_dir, name), "rb").read()
          for name in sorted(os.listdir(out_dir)) if name.endswith(".tar")}
  return out_dir, pattern, tars, lines


def read_items(pattern):
  reader = corpus_lib.make_corpus(corpus_lib.parse_spec(pattern))
  return [item for part in reader.plan() for item in reader.read(part)]


def test_tars_are_read_by_the_pseudo_label_reader_with_noise_as_configured(written):
  out_dir, pattern, tars, lines = written
  assert pattern == f"tar:{out_dir}/{{00000..00002}}.tar"
  assert sorted(tars) == ["00000.tar", "00001.tar", "00002.tar"] and len(lines) == TARS
  items = read_items(pattern)
  assert [item.key for item in items] == [toyworld.key_for(SEED, i) for i in range(COUNT)]
  sidecar = miniature_corpus.read_sidecar(out_dir)
  assert sidecar["counts"] == {"wrong": 8, "vague": 4, "true": 28}
  assert sidecar["noise_rate"] == {"wrong": 0.2, "vague": 0.1}
  kinds = collections.Counter()
  for index, item in enumerate(items):
    assert item.problem is None and item.caption
    scene = toyworld.render_scene(SEED, index, SIZE)
    assert item.image == records.encode_jpeg(scene.image, 95)  # this very scene's JPEG
    kind = sidecar["noisy"].get(item.key, "true")
    kinds[kind] += 1
    if kind == "true":
      assert item.caption == scene.caption
    elif kind == "vague":
      assert item.caption in miniature_corpus.VAGUE_CAPTIONS
    else:  # wrong: not this scene's caption, and false of its objects
      assert item.caption != scene.caption and item.caption not in miniature_corpus.VAGUE_CAPTIONS
      assert mentioned(item.caption) != {f"{scene.objects[i].colour} {scene.objects[i].shape}"
                                         for i in scene.visible}, item.caption
  assert kinds == {"true": 28, "wrong": 8, "vague": 4}


def test_rerun_keeps_complete_tars_and_refuses_other_params(written):
  out_dir, pattern, tars, _ = written
  lines = []
  again = miniature_corpus.write_corpus(out_dir, COUNT, seed=SEED, num_tars=TARS, noise=NOISE,
                                        size=SIZE, log=lines.append)
  assert again == pattern and lines == [f"corpus: {out_dir}: all 3 tars complete, nothing to do"]
  with pytest.raises(cli.UserError, match=r"corpus.json: .*num_examples: found 40, this call 41"):
    miniature_corpus.write_corpus(out_dir, COUNT + 1, seed=SEED, num_tars=TARS, noise=NOISE,
                                  size=SIZE)
  with pytest.raises(cli.UserError, match=r"noise: found .*'wrong': 0.2.*this call .*'wrong': 0.3"):
    miniature_corpus.write_corpus(out_dir, COUNT, seed=SEED, num_tars=TARS,
                                  noise=dict(wrong=0.3, vague=0.1), size=SIZE)


def test_truncated_tar_and_killed_writer_debris_are_redone(tmp_path, written):
  _, _, tars, _ = written
  out_dir = str(tmp_path)
  for name, data in tars.items():
    (tmp_path / name).write_bytes(data)
  (tmp_path / "corpus.json").write_bytes(open(os.path.join(written[0], "corpus.json"), "rb").read())
  (tmp_path / "00001.tar").write_bytes(tars["00001.tar"][:len(tars["00001.tar"]) // 2])
  (tmp_path / "00002.tar.tmp-123-456").write_bytes(b"half a tar")
  lines = []
  miniature_corpus.write_corpus(out_dir, COUNT, seed=SEED, num_tars=TARS, noise=NOISE, size=SIZE,
                                log=lines.append)
  assert len(lines) == 1 and "00001.tar done" in lines[0]
  assert sorted(os.listdir(out_dir)) == ["00000.tar", "00001.tar", "00002.tar", "corpus.json"]
  for name, data in tars.items():  # same params, same bytes
    assert (tmp_path / name).read_bytes() == data, name


# ---------------------------------------------------------------------------------------------
# Captions.

_COLOURS = "|".join(toyworld.OBJECT_COLOURS)
_SHAPES = "|".join(toyworld.DET_CLASSES)
_OBJECT_RE = re.compile(rf"\ban? (?:(small|large) )?({_COLOURS}) ({_SHAPES})"
                        rf"(?: (on the left|in the middle|on the right))?")
_NUMBERS = {word: n for n, word in enumerate(toyworld.NUMBER_WORDS)}
CAPTION_SCENES = [toyworld.render_scene(11, i, 64) for i in range(150)]


def mentioned(caption):
  return {f"{m[2]} {m[3]}" for m in _OBJECT_RE.finditer(caption)}


def scene_facts(scene):
  facts = toyworld.caption_facts(scene.objects, scene.visible, scene.instances, scene.camera)
  return {f["phrase"]: f for f in facts}


def test_caption_counts_sizes_and_positions_are_true_of_the_image():
  checked = collections.Counter()
  for scene in CAPTION_SCENES:
    facts, caption = scene_facts(scene), scene.caption
    assert mentioned(caption) == set(facts), caption
    count = re.search(rf"\b({'|'.join(toyworld.NUMBER_WORDS)}) objects?:", caption)
    if count:
      assert _NUMBERS[count[1]] == len(facts), caption
      checked["count"] += 1
    shapes = re.match(rf"^(?:a photo of |a picture of )?((?:(?:\w+) (?:{_SHAPES})(?:s|es)?"
                      rf"(?:, | and )?)+):", caption)
    if shapes and not count:
      expected = collections.Counter(phrase.split()[-1] for phrase in facts)
      found = {}
      for number, shape in re.findall(rf"(\w+) ({_SHAPES})", shapes[1]):
        found[shape] = 1 if number in ("a", "an") else _NUMBERS[number]
      assert found == expected, caption
      checked["shapes"] += 1
    for match in _OBJECT_RE.finditer(caption):
      fact = facts[f"{match[2]} {match[3]}"]
      if match[1]:
        assert toyworld.size_word(fact["area"]) == match[1], caption
        assert (fact["area"] > toyworld.LARGE_AREA) == (match[1] == "large"), caption
        checked["size"] += 1
      if match[4]:
        third = {"on the left": 0, "in the middle": 1, "on the right": 2}[match[4]]
        assert third / 3 <= fact["x"] < (third + 1) / 3, caption
        checked["position"] += 1
  assert min(checked.values()) >= 5 and len(checked) == 4, checked


def test_caption_room_colours_and_most_visible_object_first():
  checked = collections.Counter()
  for scene in CAPTION_SCENES:
    caption = scene.caption
    wall = re.search(rf"an? ({'|'.join(toyworld.WALL_COLOURS)}) wall", caption)
    if wall:
      assert wall[1] == scene.room.wall_colour, caption
      checked["wall"] += 1
    floor = re.search(rf"an? ({'|'.join(toyworld.FLOOR_COLOURS)}) floor", caption)
    if floor:
      assert floor[1] == scene.room.floor_colour, caption
      checked["floor"] += 1
    plain_list = not re.search(r"from left to right|:| (left of|right of|in front of|behind|"
                               r"next to) an? ", caption)
    if plain_list and scene.visible:
      dominant = scene.objects[datasets.dominant_object(scene)]
      first = _OBJECT_RE.search(caption)
      assert (first[2], first[3]) == (dominant.colour, dominant.shape), caption
      checked["first"] += 1
  assert min(checked.values()) >= 10 and len(checked) == 3, checked


def test_captions_rarely_repeat_within_a_batch():
  """The contrastive loss treats each other caption of a batch as a negative: repeats are false
  negatives, which the toy world's earlier, shorter captions had many of."""
  captions = [scene.caption for scene in CAPTION_SCENES[:128]]
  assert len(set(captions)) >= 124
