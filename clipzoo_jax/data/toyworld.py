"""The built-in toy world: ray-cast rooms with coloured primitives, their captions and exact
per-pixel ground truth (seg, metric depth, normals, boxes), written as pseudo-labelled shards.

Geometry. World frame: x right, y forward (away from the camera), z up; the floor is z = 0, the
back wall the plane y = back_wall_y, an optional side wall x = +-side_wall_x. The camera stands at
(0, 0, height), looks along +y and is pitched down by `pitch`. Camera frame (OpenCV): x right,
y down, z forward. Pixel (row v, column u) is the ray through its centre, camera-frame direction
((u + 0.5 - size/2) / focal, (v + 0.5 - size/2) / focal, 1); depth is the z-depth along the camera
axis in metres (the ray parameter of that direction); normals are unit vectors in the camera frame
facing the camera (the floor's is (0, -cos(pitch), -sin(pitch))). Every ray hits the room, so
every pixel has valid labels. Boxes are the normalized pixel-edge extent (ymin, xmin, ymax, xmax)
of an object's visible pixels: row r is inside iff ymin <= (r + 0.5) / size <= ymax.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import time

import numpy as np

from clipzoo_jax import cli
from clipzoo_jax import atomic_files
from clipzoo_jax import storage
from clipzoo_jax.data import records, shards

SEG_CLASSES = ("floor", "wall", "sphere", "box", "cylinder")
DET_CLASSES = ("sphere", "box", "cylinder")
OBJECT_COLOURS = {
    "red": (0.80, 0.10, 0.10), "green": (0.12, 0.62, 0.16), "blue": (0.10, 0.25, 0.85),
    "yellow": (0.92, 0.82, 0.10), "purple": (0.50, 0.16, 0.66), "orange": (0.95, 0.50, 0.05),
    "white": (0.93, 0.93, 0.93), "black": (0.07, 0.07, 0.07), "cyan": (0.10, 0.75, 0.80),
    "pink": (0.96, 0.52, 0.70),
}
WALL_COLOURS = {
    "white": (0.86, 0.86, 0.83), "gray": (0.55, 0.55, 0.56), "beige": (0.82, 0.74, 0.60),
    "pale blue": (0.62, 0.72, 0.84), "pale green": (0.66, 0.78, 0.62),
}
FLOOR_COLOURS = {
    "wooden": (0.56, 0.38, 0.22), "gray": (0.42, 0.42, 0.42), "sandy": (0.76, 0.68, 0.50),
    "dark": (0.22, 0.22, 0.24),
}
REPEAT_COLOUR_PROBABILITY = 0.35  # of an object taking a colour already shown (on another shape)
MIN_VISIBLE_PIXELS = 4  # fewer visible pixels: no box and no mention in the caption
KEY_PREFIX = "toyworld"
PARAMS_NAME = "toyworld_params.json"  # written before the first shard, so a resume can check it
EXPERT = {"name": "toyworld-ground-truth", "source": "clipzoo_jax.data.toyworld",
          "weights_sha256": None}
_EPS = 1e-6
_KEY_RE = re.compile(rf"^{KEY_PREFIX}-s(\d+)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class Camera:
  size: int        # image height = width, pixels
  focal: float     # pixels
  height: float    # metres above the floor
  pitch: float     # radians, downwards


@dataclasses.dataclass(frozen=True)
class Room:
  back_wall_y: float
  side_wall_x: float | None   # signed x of the side wall, None without one
  wall_colour: str
  floor_colour: str
  checker_size: float         # metres per floor tile


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One primitive resting on the floor. `size`: sphere (r,), box (half x, half y, half z),
  cylinder (r, height). `yaw` turns a box about the vertical axis."""
  shape: str
  colour: str
  centre: tuple[float, float, float]   # world frame; a cylinder's centre is mid-height
  size: tuple[float, ...]
  yaw: float = 0.0

  def footprint_radius(self) -> float:
    return float(np.hypot(*self.size[:2])) if self.shape == "box" else self.size[0]


@dataclasses.dataclass
class Scene:
  """A rendered example. `instances` (size, size) int16 is the object index per pixel (-1 room);
  `visible` is the indices of objects with boxes and caption mentions, in object order."""
  key: str
  image: np.ndarray
  caption: str
  labels: records.Labels
  camera: Camera
  room: Room
  objects: tuple[SceneObject, ...]
  instances: np.ndarray
  visible: tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# Geometry: pure functions of rays. `origins` (N,3) or (3,), `dirs` (N,3), not unit; each returns
# (t (N,), world normals (N,3)) with t = inf where the ray misses.


def camera_rotation(pitch: float) -> np.ndarray:
  """World-from-camera rotation: its columns are the camera's x, y, z axes in the world frame."""
  c, s = np.cos(pitch), np.sin(pitch)
  return np.array([[1.0, 0.0, 0.0], [0.0, -s, c], [0.0, -c, -s]])


def camera_rays(camera: Camera) -> np.ndarray:
  """Camera-frame ray directions (size*size, 3) through pixel centres, row-major, with z = 1."""
  coords = (np.arange(camera.size) + 0.5 - camera.size / 2) / camera.focal
  v, u = np.meshgrid(coords, coords, indexing="ij")
  return np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=-1)


def intersect_plane(origins, dirs, point, normal):
  """Hits on the side the normal faces (the room's inside)."""
  normal = np.asarray(normal, float)
  denom = dirs @ normal
  with np.errstate(divide="ignore", invalid="ignore"):
    t = ((np.asarray(point) - origins) @ normal) / denom
  t = np.where((denom < 0) & (t > _EPS), t, np.inf)
  return t, np.broadcast_to(normal, dirs.shape)


def intersect_sphere(origins, dirs, centre, radius):
  offset = np.broadcast_to(origins - np.asarray(centre), dirs.shape)
  a = np.einsum("ij,ij->i", dirs, dirs)
  b = np.einsum("ij,ij->i", dirs, offset)
  c = np.einsum("ij,ij->i", offset, offset) - radius * radius
  disc = b * b - a * c
  with np.errstate(invalid="ignore"):
    t = (-b - np.sqrt(disc)) / a
  t = np.where((disc >= 0) & (t > _EPS), t, np.inf)
  hits = origins + np.where(np.isfinite(t), t, 0.0)[:, None] * dirs
  return t, (hits - np.asarray(centre)) / radius


def _yaw_matrix(yaw: float) -> np.ndarray:
  c, s = np.cos(yaw), np.sin(yaw)
  return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def intersect_box(origins, dirs, centre, half_extents, yaw):
  """Slab test in the box's own frame (turned by yaw about z)."""
  turn = _yaw_matrix(yaw)
  local_o = np.broadcast_to((origins - np.asarray(centre)) @ turn, dirs.shape)
  local_d = dirs @ turn
  half = np.asarray(half_extents)
  with np.errstate(divide="ignore", invalid="ignore"):
    t1, t2 = (-half - local_o) / local_d, (half - local_o) / local_d
  near, far = np.minimum(t1, t2), np.maximum(t1, t2)
  # Column-wise: reductions along a length-3 axis are slow in NumPy.
  t_near = np.maximum(np.maximum(near[:, 0], near[:, 1]), near[:, 2])
  t_far = np.minimum(np.minimum(far[:, 0], far[:, 1]), far[:, 2])
  t = np.where((t_near <= t_far) & (t_near > _EPS), t_near, np.inf)
  axis = np.where(near[:, 0] == t_near, 0, np.where(near[:, 1] == t_near, 1, 2))
  local_n = np.zeros_like(local_d)
  rows = np.arange(len(dirs))
  local_n[rows, axis] = -np.sign(local_d[rows, axis])
  return t, local_n @ turn.T


def intersect_cylinder(origins, dirs, centre, radius, height):
  """A vertical cylinder standing on z = 0: side and top cap (the bottom lies on the floor)."""
  origins = np.broadcast_to(origins, dirs.shape)
  ox, oy = origins[:, 0] - centre[0], origins[:, 1] - centre[1]
  dx, dy = dirs[:, 0], dirs[:, 1]
  a, b, c = dx * dx + dy * dy, ox * dx + oy * dy, ox * ox + oy * oy - radius * radius
  disc = b * b - a * c
  with np.errstate(divide="ignore", invalid="ignore"):
    t_side = (-b - np.sqrt(disc)) / a
    z = origins[:, 2] + t_side * dirs[:, 2]
    t_side = np.where((disc >= 0) & (t_side > _EPS) & (z >= 0) & (z <= height), t_side, np.inf)
    t_top = (height - origins[:, 2]) / dirs[:, 2]
    top_x, top_y = ox + t_top * dx, oy + t_top * dy
    t_top = np.where((dirs[:, 2] < 0) & (t_top > _EPS)
                     & (top_x * top_x + top_y * top_y <= radius * radius), t_top, np.inf)
    side_n = np.stack([ox + t_side * dx, oy + t_side * dy, np.zeros_like(dx)], axis=-1) / radius
  top = t_top < t_side
  normals = np.where(top[:, None], np.array([0.0, 0.0, 1.0]), side_n)
  return np.minimum(t_side, t_top), np.where(np.isfinite(normals), normals, 0.0)


def intersect_object(obj: SceneObject, origins, dirs):
  if obj.shape == "sphere":
    return intersect_sphere(origins, dirs, obj.centre, obj.size[0])
  if obj.shape == "box":
    return intersect_box(origins, dirs, obj.centre, obj.size, obj.yaw)
  if obj.shape == "cylinder":
    return intersect_cylinder(origins, dirs, obj.centre, obj.size[0], obj.size[1])
  raise ValueError(f"toyworld object shape expected one of {DET_CLASSES}, found {obj.shape!r}")


def room_surfaces(room: Room) -> list[tuple[str, tuple, tuple]]:
  """(seg class, point, inward normal) of the floor and walls."""
  surfaces = [("floor", (0.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
              ("wall", (0.0, room.back_wall_y, 0.0), (0.0, -1.0, 0.0))]
  if room.side_wall_x is not None:
    surfaces.append(("wall", (room.side_wall_x, 0.0, 0.0), (-np.sign(room.side_wall_x), 0.0, 0.0)))
  return surfaces


# ---------------------------------------------------------------------------------------------
# Sampling a scene: all randomness comes from one generator seeded by (seed, index).


def _sample_camera(rng, size: int) -> Camera:
  fov = np.deg2rad(rng.uniform(50, 65))
  return Camera(size=size, focal=size / 2 / np.tan(fov / 2), height=rng.uniform(1.1, 1.8),
                pitch=np.deg2rad(rng.uniform(12, 30)))


def _sample_room(rng) -> Room:
  side = None
  if rng.random() < 0.5:
    side = float(rng.choice([-1, 1]) * rng.uniform(2.6, 4.0))
  return Room(back_wall_y=rng.uniform(7.0, 10.0), side_wall_x=side,
              wall_colour=str(rng.choice(list(WALL_COLOURS))),
              floor_colour=str(rng.choice(list(FLOOR_COLOURS))),
              checker_size=rng.uniform(0.5, 1.0))


def _sample_shape(rng, shape: str, colour: str, x: float, y: float) -> SceneObject:
  if shape == "sphere":
    r = rng.uniform(0.25, 0.55)
    return SceneObject(shape, colour, (x, y, r), (r,))
  if shape == "box":
    half = (rng.uniform(0.2, 0.5), rng.uniform(0.2, 0.5), rng.uniform(0.2, 0.5))
    return SceneObject(shape, colour, (x, y, half[2]), half, yaw=rng.uniform(0, np.pi / 2))
  r, h = rng.uniform(0.2, 0.45), rng.uniform(0.4, 1.2)
  return SceneObject(shape, colour, (x, y, h / 2), (r, h))


def _sample_kinds(rng, count: int) -> list[tuple[str, str]]:
  """`count` distinct (colour, shape) pairs. A colour repeats on another shape in about a third of
  the draws, so that the colours a caption names do not by themselves tell its image from the
  others of a batch: the contrastive task has to see shapes too (issue 15)."""
  kinds: list[tuple[str, str]] = []
  for _ in range(count):
    shown = [c for c, _ in kinds]
    reusable = [c for c in dict.fromkeys(shown) if shown.count(c) < len(DET_CLASSES)]
    if reusable and rng.random() < REPEAT_COLOUR_PROBABILITY:
      colour = str(rng.choice(reusable))
    else:
      colour = str(rng.choice([c for c in OBJECT_COLOURS if c not in shown]))
    shape = str(rng.choice([s for s in DET_CLASSES if (colour, s) not in kinds]))
    kinds.append((colour, shape))
  return kinds


def _sample_objects(rng, camera: Camera, room: Room) -> tuple[SceneObject, ...]:
  """1-4 objects of distinct colour-and-shape, inside the view and the room, not touching."""
  count = int(rng.choice([1, 2, 3, 4], p=[0.25, 0.35, 0.25, 0.15]))
  half_view = camera.size / 2 / camera.focal
  placed: list[SceneObject] = []
  for colour, shape in _sample_kinds(rng, count):
    for _ in range(30):
      y = rng.uniform(1.8, min(5.5, room.back_wall_y - 1.0))
      obj = _sample_shape(rng, shape, colour, rng.uniform(-0.8, 0.8) * half_view * y, y)
      if _fits(obj, placed, room):
        placed.append(obj)
        break
  return tuple(placed)


def _fits(obj: SceneObject, placed, room: Room) -> bool:
  x, y, _ = obj.centre
  radius = obj.footprint_radius()
  if y + radius > room.back_wall_y - 0.05:
    return False
  if room.side_wall_x is not None and abs(x - room.side_wall_x) < radius + 0.05:
    return False
  if room.side_wall_x is not None and np.sign(x - room.side_wall_x) == np.sign(room.side_wall_x):
    return False
  return all(np.hypot(x - o.centre[0], y - o.centre[1]) > radius + o.footprint_radius() + 0.1
             for o in placed)


# ---------------------------------------------------------------------------------------------
# Rendering.


def _light(rng) -> tuple[np.ndarray, float]:
  """Unit direction towards a light above and behind the camera, and the ambient share."""
  elevation, azimuth = np.deg2rad(rng.uniform(35, 70)), np.deg2rad(rng.uniform(-60, 60))
  direction = np.array([np.cos(elevation) * np.sin(azimuth), -np.cos(elevation) * np.cos(azimuth),
                        np.sin(elevation)])
  return direction, rng.uniform(0.25, 0.4)


def _cast(camera: Camera, room: Room, objects):
  """First hit per pixel: (world dirs, t = z-depth, world normals, surface index), where surfaces
  are the room's (floor first) then the objects'."""
  rotation = camera_rotation(camera.pitch)
  dirs = camera_rays(camera) @ rotation.T
  origin = np.array([0.0, 0.0, camera.height])
  hits = [intersect_plane(origin, dirs, point, normal) for _, point, normal in room_surfaces(room)]
  hits += [intersect_object(obj, origin, dirs) for obj in objects]
  ts = np.stack([t for t, _ in hits])
  surface = ts.argmin(axis=0)
  pixels = np.arange(dirs.shape[0])
  normals = np.stack([n for _, n in hits])[surface, pixels]
  return dirs, ts[surface, pixels], normals, surface


def _shadowed(points, normals, light, objects) -> np.ndarray:
  """Whether an object blocks the light from each surface point."""
  blocked = np.zeros(len(points), bool)
  facing = normals @ light > 0
  if not facing.any():
    return blocked
  starts = points[facing] + 1e-4 * normals[facing]
  dirs = np.broadcast_to(light, starts.shape)
  hit = np.zeros(len(starts), bool)
  for obj in objects:
    hit |= np.isfinite(intersect_object(obj, starts, dirs)[0])
  blocked[facing] = hit
  return blocked


def _albedo(surface, points, room: Room, objects) -> np.ndarray:
  num_room = len(room_surfaces(room))
  table = [FLOOR_COLOURS[room.floor_colour]] + [WALL_COLOURS[room.wall_colour]] * (num_room - 1)
  table += [OBJECT_COLOURS[obj.colour] for obj in objects]
  albedo = np.asarray(table)[surface]
  tile = np.floor(points[:, 0] / room.checker_size) + np.floor(points[:, 1] / room.checker_size)
  # A faint checker makes the floor's perspective (and so depth) visible.
  checker = np.where(tile % 2 == 0, 1.08, 0.92)
  return albedo * np.where(surface == 0, checker, 1.0)[:, None]


def _render(camera: Camera, room: Room, objects, light, ambient):
  """(image uint8, seg, depth, camera normals, instances), all (size, size[, 3])."""
  size = camera.size
  dirs, depth, normals, surface = _cast(camera, room, objects)
  points = np.array([0.0, 0.0, camera.height]) + depth[:, None] * dirs
  lit = np.clip(normals @ light, 0.0, None) * ~_shadowed(points, normals, light, objects)
  colour = _albedo(surface, points, room, objects) * (ambient + (1 - ambient) * lit)[:, None]
  image = np.clip(np.rint(colour * 255), 0, 255).astype(np.uint8).reshape(size, size, 3)
  num_room = len(room_surfaces(room))
  seg_of_surface = [SEG_CLASSES.index(name) for name, _, _ in room_surfaces(room)]
  seg_of_surface += [SEG_CLASSES.index(obj.shape) for obj in objects]
  seg = np.asarray(seg_of_surface, np.uint8)[surface].reshape(size, size)
  instances = np.where(surface >= num_room, surface - num_room, -1).astype(np.int16)
  camera_normals = (normals @ camera_rotation(camera.pitch)).astype(np.float32)
  return (image, seg, depth.astype(np.float32).reshape(size, size),
          camera_normals.reshape(size, size, 3), instances.reshape(size, size))


# ---------------------------------------------------------------------------------------------
# Captions: from what the image shows (visible-pixel centroids and areas) and object depths. They
# pin the image down (every visible object by colour and shape, most visible first, with counts,
# sizes, positions, relations, wall and floor) and vary in wording, so that captions rarely repeat
# within a batch and the contrastive task has signal (issue 15).

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six")
SMALL_AREA, LARGE_AREA = 0.015, 0.06  # visible fraction of the image: "small" below, "large" above
POSITION_WORDS = ("on the left", "in the middle", "on the right")  # image thirds


def _article(words: str) -> str:
  return ("an " if words[0] in "aeiou" else "a ") + words


def _plural(shape: str) -> str:
  return shape + ("es" if shape.endswith("x") else "s")


def _relation(a: dict, b: dict) -> str:
  """Where a is relative to b: horizontal offset in image widths vs depth offset in metres."""
  dx, dz = a["x"] - b["x"], a["z"] - b["z"]
  if abs(dx) < 0.12 and abs(dz) < 0.6:
    return "next to"
  if abs(dx) / 0.12 >= abs(dz) / 0.6:
    return "left of" if dx < 0 else "right of"
  return "in front of" if dz < 0 else "behind"


def _listing(phrases: list[str]) -> str:
  return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def size_word(area: float) -> str | None:
  """"small", "large" or None (medium) for a visible-area fraction."""
  return "small" if area < SMALL_AREA else "large" if area > LARGE_AREA else None


def position_word(x: float) -> str:
  """Which third of the image a horizontal centroid (image fraction) lies in."""
  return POSITION_WORDS[min(2, int(x * 3))]


def _shape_of(fact: dict) -> str:
  return fact["phrase"].rsplit(" ", 1)[-1]


def _shape_order(facts: list[dict]) -> list[str]:
  """The visible shapes, most frequent first (ties: first mentioned first)."""
  shapes = [_shape_of(f) for f in facts]
  return sorted(dict.fromkeys(shapes), key=lambda s: -shapes.count(s))


def shape_counts(facts: list[dict]) -> str:
  """"two spheres and a box": visible objects per shape, most frequent first."""
  shapes = [_shape_of(f) for f in facts]
  return _listing([_article(s) if shapes.count(s) == 1 else
                   f"{NUMBER_WORDS[shapes.count(s)]} {_plural(s)}" for s in _shape_order(facts)])


def _object_phrase(fact: dict, style: str) -> str:
  """"a red sphere", optionally with its size word ("a large red sphere") or position."""
  words = fact["phrase"]
  size = size_word(fact["area"]) if "area" in fact else None
  if style == "size" and size:
    words = f"{size} {words}"
  phrase = _article(words)
  if style == "position":
    phrase += " " + position_word(fact["x"])
  return phrase


def _setting(rng, room: Room) -> str:
  """A suffix naming the wall and / or floor ("" for none)."""
  wall, floor = _article(room.wall_colour) + " wall", _article(room.floor_colour) + " floor"
  return str(rng.choice(["", "", " in front of " + wall, " on " + floor,
                         f" in a room with {wall} and {floor}"]))


def _objects_sentence(rng, facts: list[dict]) -> str:
  """The visible objects in one of several forms, each naming every one by colour and shape."""
  n = len(facts)
  forms = ["list", "size", "position", "count"]
  if n >= 2:
    forms += ["relation", "relation", "relation", "left to right", "shapes"]
  form = str(rng.choice(forms))
  style = form if form in ("size", "position") else "plain"
  names = [_object_phrase(f, style) for f in facts]
  if form == "relation":  # of the two most visible objects; the others follow
    a, b = rng.permutation(2)
    relation = f"{names[a]} {_relation(facts[a], facts[b])} {names[b]}"
    return relation + (f", with {_listing(names[2:])}" if n > 2 else "")
  if form == "left to right":
    return "from left to right: " + _listing(
        [names[i] for i in np.argsort([f["x"] for f in facts], kind="stable")])
  if form == "count" and n == 1:
    return str(rng.choice([f"a single object: {names[0]}", f"just {names[0]}",
                           f"only {names[0]}"]))
  if form == "count":
    return f"{NUMBER_WORDS[n]} objects: {_listing(names)}"
  if form == "shapes":  # named in the order the counts give
    order = _shape_order(facts)
    grouped = sorted(range(n), key=lambda i: order.index(_shape_of(facts[i])))
    return f"{shape_counts(facts)}: {_listing([names[i] for i in grouped])}"
  return _listing(names)


def make_caption(rng, facts: list[dict], room: Room) -> str:
  """facts: per visible object {phrase ("red sphere"), x (image fraction), z (metres)} and
  optionally area (visible image fraction); objects are named most visible first."""
  if not facts:
    return str(rng.choice([
        f"an empty room with {_article(room.wall_colour)} wall and {_article(room.floor_colour)} "
        "floor", f"an empty room{_setting(rng, room)}",
        f"nothing but {_article(room.floor_colour)} floor and {_article(room.wall_colour)} wall"]))
  facts = sorted(facts, key=lambda f: -f.get("area", 0.0))
  sentence = _objects_sentence(rng, facts)
  if sentence.startswith("from left to right"):
    return sentence
  prefix = str(rng.choice(["", "", "", "", "a photo of ", "a picture of "]))
  return prefix + sentence + _setting(rng, room)


def caption_facts(scene_objects, visible, instances, camera: Camera) -> list[dict]:
  """What captions say about each visible object: phrase, centroid x (image fraction), camera
  z-depth of its centre (metres) and visible area (image fraction)."""
  rotation = camera_rotation(camera.pitch)
  facts = []
  for i in visible:
    obj = scene_objects[i]
    centre_camera = rotation.T @ (np.asarray(obj.centre) - np.array([0.0, 0.0, camera.height]))
    columns = np.nonzero(instances == i)[1]
    facts.append({"phrase": f"{obj.colour} {obj.shape}", "x": columns.mean() / camera.size,
                  "z": centre_camera[2], "area": columns.size / camera.size ** 2})
  return facts


# ---------------------------------------------------------------------------------------------
# Keys and the public renderer.


def key_for(seed: int, index: int) -> str:
  return f"{KEY_PREFIX}-s{seed}-{index:08d}"


def parse_key(key: str) -> tuple[int, int]:
  match = _KEY_RE.match(key)
  if not match:
    raise ValueError(f"key {key!r} is not a toy-world key; expected "
                     f"'{KEY_PREFIX}-s<seed>-<index, 8 digits>' such as {key_for(0, 42)!r}")
  return int(match.group(1)), int(match.group(2))


def render_scene(seed: int, index: int, size: int = 64) -> Scene:
  """Renders example `index` of toy world `seed`; independent of every other example."""
  if seed < 0 or index < 0 or size < 8:
    raise ValueError(f"render_scene: expected seed >= 0, index >= 0, size >= 8; found "
                     f"seed={seed}, index={index}, size={size}")
  rng = np.random.default_rng([seed, index])
  camera = _sample_camera(rng, size)
  room = _sample_room(rng)
  objects = _sample_objects(rng, camera, room)
  light, ambient = _light(rng)
  image, seg, depth, normals, instances = _render(camera, room, objects, light, ambient)
  counts = np.bincount(instances[instances >= 0], minlength=len(objects))
  visible = tuple(i for i in range(len(objects)) if counts[i] >= MIN_VISIBLE_PIXELS)
  boxes = [records.box_from_mask(instances == i) for i in visible]
  labels = records.Labels(
      seg=seg, depth=depth, normals=normals, det_boxes=np.array(boxes, np.float32).reshape(-1, 4),
      det_classes=np.array([DET_CLASSES.index(objects[i].shape) for i in visible], np.int64),
      det_scores=np.ones(len(visible), np.float32))
  caption = make_caption(rng, caption_facts(objects, visible, instances, camera), room)
  return Scene(key=key_for(seed, index), image=image, caption=caption, labels=labels,
               camera=camera, room=room, objects=objects, instances=instances, visible=visible)


# ---------------------------------------------------------------------------------------------
# Writing a dataset: sharded, resumable, idempotent.


def manifest_tasks(size: int) -> dict:
  resolution = [size, size]
  return {
      "seg": {"expert": dict(EXPERT), "classes": list(SEG_CLASSES), "label_resolution": resolution},
      "depth": {"expert": dict(EXPERT), "depth_kind": "metric", "units": "metres",
                "label_resolution": resolution},
      "normals": {"expert": dict(EXPERT), "frame": "camera: x right, y down, z forward",
                  "label_resolution": resolution},
      "det": {"expert": dict(EXPERT), "classes": list(DET_CLASSES)},
  }


def serialize_scene(scene: Scene, jpeg_quality: int = 95) -> bytes:
  return records.make_example(scene.key, records.encode_jpeg(scene.image, jpeg_quality),
                              scene.caption, scene.labels, num_seg_classes=len(SEG_CLASSES))


def _shard_ranges(num_examples: int, num_shards: int) -> list[range]:
  bounds = [num_examples * i // num_shards for i in range(num_shards + 1)]
  return [range(bounds[i], bounds[i + 1]) for i in range(num_shards)]


def _check_params(directory: str, params: dict) -> None:
  """An existing directory must hold this same toy world; writes the params file if new."""
  found, source = None, None
  manifest_path = os.path.join(directory, shards.MANIFEST_NAME)
  params_path = os.path.join(directory, PARAMS_NAME)
  if os.path.exists(manifest_path):
    found, source = shards.read_manifest(directory).get("toyworld"), manifest_path
  elif os.path.exists(params_path):
    with open(params_path) as f:
      found, source = json.load(f), params_path
  elif any(name.endswith(".tfrecord") for name in os.listdir(directory)):
    raise cli.UserError(f"{directory}: holds .tfrecord shards but no {shards.MANIFEST_NAME} or "
                     f"{PARAMS_NAME}; not a toy-world dataset, use an empty directory")
  if source is None:
    atomic_files.write_json(params_path, params, indent=1)
  elif found != params:
    raise cli.UserError(f"{source}: toy-world params differ from this call's; found {found}, "
                     f"expected {params}. Use another directory or the same arguments")


def _write_shard(path: str, indices: range, seed: int, size: int, jpeg_quality: int) -> None:
  with shards.ShardWriter(path) as writer:
    for index in indices:
      writer.write(key_for(seed, index), serialize_scene(render_scene(seed, index, size),
                                                         jpeg_quality))


def write_dataset(directory: str, num_examples: int, seed: int = 0, size: int = 64,
                  num_shards: int = 4, split: str = "train", jpeg_quality: int = 95,
                  verbose: bool = True) -> dict:
  """Writes examples 0..num_examples-1 of toy world `seed` as shards + manifest; returns it.

  Idempotent and resumable: a complete dataset with these params is returned as is; complete
  shards are kept, partial ones redone. Examples depend on (seed, index) only, so a held-out
  split needs its own seed (the same seed in another split repeats the same scenes).
  """
  if num_examples < 1 or not 1 <= num_shards <= num_examples:
    raise ValueError(f"write_dataset: expected num_examples >= 1 and 1 <= num_shards <= "
                     f"num_examples, found num_examples={num_examples}, num_shards={num_shards}")
  params = {"seed": seed, "size": size, "num_examples": num_examples, "split": split,
            "num_shards": num_shards, "jpeg_quality": jpeg_quality}
  if storage.is_url(directory):
    return _write_dataset_to_bucket(directory, params, verbose)
  os.makedirs(directory, exist_ok=True)
  _check_params(directory, params)
  paths = [os.path.join(directory, shards.shard_name(split, i, num_shards))
           for i in range(num_shards)]
  if os.path.exists(os.path.join(directory, shards.MANIFEST_NAME)) and all(
      shards.is_complete(p) for p in paths):
    return shards.read_manifest(directory)
  shards.remove_partial(directory)
  start, written = time.perf_counter(), 0
  for i, (path, indices) in enumerate(zip(paths, _shard_ranges(num_examples, num_shards))):
    if shards.is_complete(path):
      continue
    _write_shard(path, indices, seed, size, jpeg_quality)
    written += len(indices)
    if verbose:
      rate = written / (time.perf_counter() - start)
      print(f"toyworld: {directory}: shard {i + 1}/{num_shards} done ({len(indices)} images), "
            f"{written} images at {rate:.0f} images/s", flush=True)
  command = (f"clipzoo_jax.data.toyworld.write_dataset({directory!r}, num_examples={num_examples}, "
             f"seed={seed}, size={size}, num_shards={num_shards}, split={split!r}, "
             f"jpeg_quality={jpeg_quality})")
  manifest = shards.write_manifest(directory, manifest_tasks(size), paths, command,
                                   extra={"toyworld": params})
  params_path = os.path.join(directory, PARAMS_NAME)
  if os.path.exists(params_path):  # the manifest now holds the params
    os.remove(params_path)
  return manifest


def _write_dataset_to_bucket(directory: str, params: dict, verbose: bool) -> dict:
  """The toy world at a URL (`storage`). An object store cannot rename a finished shard into
  place, so the dataset is written to a local staging directory and uploaded with its manifest
  last: a bucket without the manifest holds no dataset yet, and a rerun uploads it again."""
  if storage.exists(storage.join(directory, shards.MANIFEST_NAME)):
    manifest = shards.read_manifest(directory)
    if manifest.get("toyworld") != params:
      raise cli.UserError(f"{storage.join(directory, shards.MANIFEST_NAME)}: toy-world params "
                          f"differ from this call's; found {manifest.get('toyworld')}, expected "
                          f"{params}. Use another directory or the same arguments")
    return manifest
  with tempfile.TemporaryDirectory(prefix="toyworld-") as staging:
    manifest = write_dataset(staging, verbose=verbose, **params)
    manifest["command"] = manifest["command"].replace(repr(staging), repr(directory))
    atomic_files.write_json(os.path.join(staging, shards.MANIFEST_NAME), manifest, indent=1)
    storage.upload_tree(staging, directory, last=[shards.MANIFEST_NAME])
  if verbose:
    print(f"toyworld: uploaded to {directory}", flush=True)
  return manifest
