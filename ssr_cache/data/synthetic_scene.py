"""Procedural street scenes: one set of flat shapes from which both the label map and the image follow.

Every shape is drawn once into an instance map (PIL polygons, no anti-aliasing) and remembered with its
label id and colour; the label map and the flat-coloured image are table look-ups of that map, so a label is
exact for the geometry the image shows. Geometry is a pinhole camera over a straight street, in units of
the camera height (1 unit ≈ 1.5 m): X right, Y up, Z forward. The two domains differ only in their
`DomainStyle` (palette, camera, object statistics, photometric finish); the layout rules are shared.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Cityscapes label ids (see ssr_cache.data.labels).
UNLABELED, EGO_VEHICLE, STATIC = 0, 1, 4
ROAD, SIDEWALK, BUILDING, WALL, FENCE = 7, 8, 11, 12, 13
POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, TERRAIN, SKY = 17, 19, 20, 21, 22, 23
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = 24, 25, 26, 27, 28, 31, 32, 33

# Colours of parts that are not a class's own surface (windows, tyres, lamps); both domains share them.
GLASS, TYRE, SKIN, MARKING = (45, 55, 80), (28, 28, 30), (225, 180, 150), (235, 235, 228)
TRUNK, SIGN_FACE, LAMP_DARK = (95, 70, 45), (240, 240, 240), (40, 40, 40)
LAMPS = ((235, 40, 30), (240, 180, 20), (40, 220, 90))

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
FAR = 5000.0  # depth that projects onto the horizon row, for ground polygons


@dataclass(frozen=True)
class DomainStyle:
    """Everything that makes one domain look like itself; geometry rules are the same for both."""

    name: str
    palette: dict[int, tuple[int, int, int]]  # label id → base colour of that class's surfaces
    colour_jitter: float  # std of the per-object colour offset (0..255 scale)
    focal: tuple[float, float]  # focal length, as a fraction of the image width
    horizon: tuple[float, float]  # horizon row, as a fraction of the image height
    road_half: tuple[float, float]  # distance from the camera to each road edge
    sidewalk: tuple[float, float]  # sidewalk width
    verge: float  # probability of a grass verge between sidewalk and houses, per side
    building_height: tuple[float, float]
    facade_kinds: dict[str, float]  # building / wall / vegetation / gap: share of facade segments
    counts: dict[str, float]  # mean number of each street object per image (Poisson)
    ridden: float  # probability that a two-wheeler has a rider
    object_scale: tuple[float, float]  # size factor of street objects
    object_depth: tuple[float, float]  # street objects stand between these multiples of the bottom depth
    ego_hood: tuple[float, float]  # height of the ego car's bonnet strip, fraction of H; (0, 0): none
    # photometric finish (the source domain leaves all of these at their neutral values)
    texture: float = 0.0
    noise: float = 0.0
    blur: tuple[float, float] = (0.0, 0.0)
    saturation: tuple[float, float] = (1.0, 1.0)
    casts: tuple[tuple[float, float, float], ...] = ((1.0, 1.0, 1.0),)
    gradient: float = 0.0
    vignette: float = 0.0


SOURCE_PALETTE = {
    UNLABELED: (0, 0, 0), EGO_VEHICLE: (30, 30, 34), STATIC: (150, 110, 60),
    ROAD: (72, 72, 84), SIDEWALK: (222, 70, 200), BUILDING: (205, 95, 50), WALL: (110, 110, 245),
    FENCE: (245, 200, 110), POLE: (235, 235, 235), TRAFFIC_LIGHT: (255, 145, 0), TRAFFIC_SIGN: (250, 235, 0),
    VEGETATION: (30, 190, 40), TERRAIN: (165, 235, 85), SKY: (70, 160, 255),
    PERSON: (255, 25, 70), RIDER: (190, 0, 150), CAR: (0, 45, 235), TRUCK: (0, 190, 190), BUS: (0, 120, 95),
    TRAIN: (130, 40, 210), MOTORCYCLE: (50, 0, 150), BICYCLE: (165, 30, 30),
}  # fmt: skip

TARGET_PALETTE = {
    UNLABELED: (0, 0, 0), EGO_VEHICLE: (45, 45, 50), STATIC: (125, 105, 85),
    ROAD: (108, 102, 98), SIDEWALK: (162, 140, 150), BUILDING: (142, 126, 112), WALL: (135, 135, 160),
    FENCE: (160, 150, 125), POLE: (152, 152, 146), TRAFFIC_LIGHT: (175, 130, 60), TRAFFIC_SIGN: (195, 185, 80),
    VEGETATION: (78, 112, 58), TERRAIN: (145, 160, 100), SKY: (192, 206, 220),
    PERSON: (160, 80, 90), RIDER: (140, 70, 125), CAR: (70, 80, 140), TRUCK: (80, 140, 140), BUS: (70, 115, 105),
    TRAIN: (115, 85, 150), MOTORCYCLE: (75, 60, 125), BICYCLE: (140, 70, 70),
}  # fmt: skip

SOURCE = DomainStyle(
    name="gta5",
    palette=SOURCE_PALETTE,
    colour_jitter=10.0,
    focal=(0.75, 0.9),
    horizon=(0.42, 0.52),
    road_half=(1.8, 3.8),
    sidewalk=(1.2, 2.4),
    verge=0.2,
    building_height=(5.0, 16.0),
    facade_kinds={"building": 0.72, "wall": 0.06, "vegetation": 0.12, "gap": 0.10},
    counts={"car": 4.0, "truck": 0.9, "bus": 0.5, "train": 0.08, "motorcycle": 0.6, "bicycle": 0.3,
            "person": 2.0, "pole": 2.0, "light": 1.0, "sign": 1.0, "tree": 1.2, "fence": 0.4, "wall": 0.3,
            "static": 0.5},
    ridden=0.85,
    object_scale=(0.95, 1.3),
    object_depth=(1.1, 14.0),
    ego_hood=(0.0, 0.0),
)

TARGET = DomainStyle(
    name="cityscapes",
    palette=TARGET_PALETTE,
    colour_jitter=18.0,
    focal=(1.0, 1.2),
    horizon=(0.36, 0.44),
    road_half=(1.4, 3.0),
    sidewalk=(1.4, 2.8),
    verge=0.45,
    building_height=(3.5, 10.0),
    facade_kinds={"building": 0.52, "wall": 0.10, "vegetation": 0.28, "gap": 0.10},
    counts={"car": 3.0, "truck": 0.25, "bus": 0.2, "train": 0.05, "motorcycle": 0.3, "bicycle": 1.2,
            "person": 4.0, "pole": 4.0, "light": 1.2, "sign": 2.0, "tree": 3.0, "fence": 1.0, "wall": 0.6,
            "static": 1.0},
    ridden=0.5,
    object_scale=(0.75, 1.0),
    object_depth=(1.6, 30.0),
    ego_hood=(0.07, 0.12),
    texture=1.0,
    noise=7.0,
    blur=(0.6, 1.1),
    saturation=(0.55, 0.85),
    casts=((1.08, 1.0, 0.84), (0.88, 0.97, 1.12), (0.95, 1.06, 0.92)),
    gradient=0.25,
    vignette=0.3,
)

STYLES = {SOURCE.name: SOURCE, TARGET.name: TARGET}


def _texture_table(amplitudes: dict[int, float]) -> np.ndarray:
    table = np.zeros(256, dtype=np.float32)
    for label, amplitude in amplitudes.items():
        table[label] = amplitude
    return table


# Target-domain surface textures: relative brightness modulation per label id, blotchy and grainy parts.
_SMOOTH_TEXTURE = _texture_table({ROAD: 0.08, SIDEWALK: 0.10, BUILDING: 0.14, WALL: 0.12, FENCE: 0.06,
                                  VEGETATION: 0.18, TERRAIN: 0.14, SKY: 0.05, STATIC: 0.08})
_FINE_TEXTURE = _texture_table({ROAD: 0.10, SIDEWALK: 0.07, BUILDING: 0.05, WALL: 0.05, FENCE: 0.05,
                                VEGETATION: 0.28, TERRAIN: 0.18, POLE: 0.03, PERSON: 0.05, RIDER: 0.05,
                                CAR: 0.03, TRUCK: 0.03, BUS: 0.03, TRAIN: 0.03, STATIC: 0.06})


class Scene:
    """One street scene being drawn: camera, street cross-section, instance map and its colour table."""

    def __init__(self, style: DomainStyle, width: int, height: int, rng: np.random.Generator) -> None:
        self.style, self.width, self.height, self.rng = style, width, height, rng
        self.horizon = height * rng.uniform(*style.horizon)
        self.cx = width * (0.5 + rng.uniform(-0.06, 0.06))
        self.focal = width * rng.uniform(*style.focal)
        self.z_bottom = self.focal / (height - self.horizon)  # depth of the ground seen at the bottom row
        # street cross-section: road edges, then sidewalk, verge and house front on each side (-1 left, +1 right)
        self.road_edge = {-1: -rng.uniform(*style.road_half), 1: rng.uniform(*style.road_half)}
        self.sidewalk = {side: rng.uniform(*style.sidewalk) for side in (-1, 1)}
        self.verge = {side: (rng.uniform(0.8, 2.5) if rng.random() < style.verge else 0.0) for side in (-1, 1)}
        self.hood = rng.uniform(*style.ego_hood) * height  # bonnet height at the centre, 0 for none
        self.ids = Image.new("I", (width, height), 0)
        self.draw = ImageDraw.Draw(self.ids)
        self.labels: list[int] = [UNLABELED]
        self.colours: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)]

    # --- geometry -----------------------------------------------------------------------------------------

    def project(self, x: float, y: float, z: float) -> tuple[float, float]:
        return self.cx + self.focal * x / z, self.horizon + self.focal * (1.0 - y) / z

    def kerb(self, side: int) -> float:
        return self.road_edge[side]

    def sidewalk_outer(self, side: int) -> float:
        return self.road_edge[side] + side * self.sidewalk[side]

    def facade(self, side: int) -> float:
        return self.sidewalk_outer(side) + side * self.verge[side]

    def depth(self, near: float | None = None, far: float | None = None) -> float:
        """A depth drawn log-uniformly, by default over the style's range for street objects."""
        lo = self.z_bottom * (near if near is not None else self.style.object_depth[0])
        hi = self.z_bottom * (far if far is not None else self.style.object_depth[1])
        return float(math.exp(self.rng.uniform(math.log(lo), math.log(max(hi, lo * 1.01)))))

    # --- colours ------------------------------------------------------------------------------------------

    def colour(self, label: int, shade: float = 1.0) -> tuple[float, float, float]:
        """The class's base colour with this object's own offset."""
        base = np.asarray(self.style.palette[label], dtype=np.float64) * shade
        return tuple(base + self.rng.normal(0.0, self.style.colour_jitter, 3))

    def part(self, rgb: tuple[float, float, float], shade: float = 1.0) -> tuple[float, float, float]:
        base = np.asarray(rgb, dtype=np.float64) * shade
        return tuple(base + self.rng.normal(0.0, self.style.colour_jitter * 0.3, 3))

    # --- drawing primitives: each call is one instance with one label and one colour -------------------

    def _instance(self, label: int, colour: tuple[float, float, float]) -> int:
        self.labels.append(label)
        self.colours.append(colour)
        return len(self.labels) - 1

    def polygon(self, points: list[tuple[float, float]], label: int, colour) -> None:
        self.draw.polygon(points, fill=self._instance(label, colour))

    def world_polygon(self, points: list[tuple[float, float, float]], label: int, colour) -> None:
        self.polygon([self.project(x, y, z) for x, y, z in points], label, colour)

    def flat_box(self, x: float, z: float, u0: float, v0: float, u1: float, v1: float, label: int, colour) -> None:
        """Rectangle in the plane facing the camera at depth z; (u, v) are offsets right/up from (x, 0, z)."""
        self.world_polygon([(x + u0, v0, z), (x + u1, v0, z), (x + u1, v1, z), (x + u0, v1, z)], label, colour)

    def flat_ellipse(self, x: float, z: float, u: float, v: float, ru: float, rv: float, label: int, colour,
                     ring: float = 0.0) -> None:
        px, py = self.project(x + u, v, z)
        sx, sy = self.focal * ru / z, self.focal * rv / z
        box = [px - sx, py - sy, px + sx, py + sy]
        if ring > 0:
            width = max(1, round(self.focal * ring / z))
            if width < min(sx, sy):
                self.draw.ellipse(box, outline=self._instance(label, colour), width=width)
                return
        self.draw.ellipse(box, fill=self._instance(label, colour))

    def flat_line(self, x: float, z: float, points: list[tuple[float, float]], width: float, label: int,
                  colour) -> None:
        pixels = [self.project(x + u, v, z) for u, v in points]
        self.draw.line(pixels, fill=self._instance(label, colour), width=max(1, round(self.focal * width / z)))

    def ground_patch(self, x0: float, x1: float, z0: float, z1: float, label: int, colour) -> None:
        self.world_polygon([(x0, 0.0, z0), (x1, 0.0, z0), (x1, 0.0, z1), (x0, 0.0, z1)], label, colour)

    # --- output -------------------------------------------------------------------------------------------

    def label_map(self) -> np.ndarray:
        return np.asarray(self.labels, dtype=np.uint8)[np.asarray(self.ids, dtype=np.int32)]

    def flat_image(self) -> np.ndarray:
        return np.asarray(self.colours, dtype=np.float32)[np.asarray(self.ids, dtype=np.int32)]


# --- background and street ----------------------------------------------------------------------------


def draw_background(scene: Scene, force: frozenset[int]) -> None:
    """Sky, the ground beyond the houses, and a distant skyline on the horizon."""
    w, h, rng = scene.width, scene.height, scene.rng
    if TERRAIN in force and not any(scene.verge.values()):
        scene.verge[-1 if rng.random() < 0.5 else 1] = rng.uniform(0.8, 2.5)
    scene.polygon([(0, 0), (w, 0), (w, h), (0, h)], SKY, scene.colour(SKY))
    z, x = 150.0, -130.0
    while x < 130.0:
        width = rng.uniform(4.0, 18.0)
        kind = rng.random()
        if kind < 0.62:
            top = rng.uniform(2.0, 18.0)
            scene.world_polygon([(x, 0, z), (x + width, 0, z), (x + width, top, z), (x, top, z)],
                                BUILDING, scene.colour(BUILDING, 0.85))
        elif kind < 0.9:
            scene.flat_ellipse(x + width / 2, z, 0, 0, width * 0.6, rng.uniform(3.0, 8.0),
                               VEGETATION, scene.colour(VEGETATION, 0.9))
        x += width
    ground = TERRAIN if any(scene.verge.values()) else SIDEWALK
    scene.polygon([(0, scene.horizon), (w, scene.horizon), (w, h), (0, h)], ground, scene.colour(ground, 0.9))


def draw_street(scene: Scene) -> None:
    """Road with lane markings, kerbs, sidewalks and grass verges."""
    rng = scene.rng
    left, right = scene.road_edge[-1], scene.road_edge[1]
    scene.ground_patch(left, right, 0.2, FAR, ROAD, scene.colour(ROAD))
    for side in (-1, 1):
        inner, outer = scene.kerb(side), scene.sidewalk_outer(side)
        scene.ground_patch(min(inner, outer), max(inner, outer), 0.2, FAR, SIDEWALK, scene.colour(SIDEWALK))
        scene.ground_patch(inner, inner + side * 0.12, 0.2, FAR, SIDEWALK, scene.colour(SIDEWALK, 0.75))
        if scene.verge[side]:
            facade = scene.facade(side)
            scene.ground_patch(min(outer, facade), max(outer, facade), 0.2, FAR, TERRAIN, scene.colour(TERRAIN))
    lane = 2.3
    offset = rng.uniform(-0.3, 0.3)
    for k in range(-6, 7):
        x = offset + (k + 0.5) * lane
        if not left + 0.4 < x < right - 0.4:
            continue
        colour = scene.part(MARKING)
        z = rng.uniform(0.5, 3.0)
        while z < 90.0:
            scene.ground_patch(x - 0.06, x + 0.06, z, z + 2.0, ROAD, colour)
            z += 5.0


# --- the houses along both sides ----------------------------------------------------------------------


def _facade_box(scene: Scene, side: int, z0: float, z1: float, top: float, label: int, colour,
                depth: float = 8.0) -> None:
    """A block whose street face lies in the house-front plane, with its near end wall (seen at an angle)."""
    x = scene.facade(side)
    back = x + side * depth
    shade = np.asarray(colour) * 0.78
    scene.world_polygon([(x, 0, z0), (back, 0, z0), (back, top, z0), (x, top, z0)], label, tuple(shade))
    scene.world_polygon([(x, 0, z0), (x, 0, z1), (x, top, z1), (x, top, z0)], label, colour)


def _windows(scene: Scene, side: int, z0: float, z1: float, top: float) -> None:
    x = scene.facade(side)
    if scene.focal * 0.9 / z0 < 2.5 or scene.focal * abs(x) * 0.8 / (z0 * (z0 + 0.8)) < 1.5:  # too small to see
        return
    glass = scene.part(GLASS)
    floor = 0.9
    while floor + 1.0 < top:
        z = z0 + 0.5
        while z + 1.0 < z1:
            scene.world_polygon([(x, floor, z), (x, floor, z + 0.8), (x, floor + 0.9, z + 0.8), (x, floor + 0.9, z)],
                                BUILDING, glass)
            z += 1.7
        floor += 1.9


def _facade_trees(scene: Scene, side: int, z0: float, z1: float) -> None:
    rng, x = scene.rng, scene.facade(side)
    colour = scene.colour(VEGETATION)
    scene.world_polygon([(x, 0, z0), (x, 0, z1), (x, 1.1, z1), (x, 1.1, z0)], VEGETATION, colour)
    z = z0
    while z < z1:
        crown = scene.colour(VEGETATION, rng.uniform(0.8, 1.1))
        scene.flat_ellipse(x + side * 1.5, z, 0, rng.uniform(2.0, 4.0), rng.uniform(1.2, 2.4),
                           rng.uniform(1.3, 2.6), VEGETATION, crown)
        z += rng.uniform(2.0, 4.0)


def draw_facades(scene: Scene, force: frozenset[int]) -> None:
    """House fronts along both sides: buildings, low walls, trees and gaps, drawn far to near."""
    rng, style = scene.rng, scene.style
    kinds, weights = zip(*style.facade_kinds.items(), strict=True)
    weights = np.asarray(weights) / sum(weights)
    segments = []
    for side in (-1, 1):
        z = rng.uniform(0.2, 2.0)
        while z < 110.0:
            length = rng.uniform(3.0, 12.0)
            segments.append([side, z, z + length, str(rng.choice(kinds, p=weights))])
            z += length + rng.uniform(0.0, 1.0)
    # a forced class takes over one of the near segments, so that it is in view
    near = [seg for seg in segments if seg[1] < 6.0 * scene.z_bottom]
    for label, kind in ((BUILDING, "building"), (WALL, "wall"), (VEGETATION, "vegetation")):
        if label in force and near and not any(seg[3] == kind for seg in near):
            near[int(rng.integers(len(near)))][3] = kind
    for side, z0, z1, kind in sorted(segments, key=lambda seg: -seg[1]):
        if kind == "building":
            top = rng.uniform(*style.building_height)
            _facade_box(scene, side, z0, z1, top, BUILDING, scene.colour(BUILDING))
            _windows(scene, side, z0, z1, top)
        elif kind == "wall":
            if rng.random() < 0.5:
                _facade_trees(scene, side, z0, z1)
            _facade_box(scene, side, z0, z1, rng.uniform(0.5, 1.3), WALL, scene.colour(WALL), depth=0.3)
        elif kind == "vegetation":
            _facade_trees(scene, side, z0, z1)


def draw_barrier(scene: Scene, label: int, side: int, z0: float, length: float) -> None:
    """A fence (with posts and rails) or a low wall along the outer edge of the sidewalk."""
    rng = scene.rng
    x, z1 = scene.sidewalk_outer(side), z0 + length
    top = rng.uniform(0.6, 1.0)
    colour = scene.colour(label)
    scene.world_polygon([(x, 0, z0), (x, 0, z1), (x, top, z1), (x, top, z0)], label, colour)
    if label == FENCE:
        dark = tuple(np.asarray(colour) * 0.6)
        z = z0
        while z < z1:
            scene.world_polygon([(x, 0, z), (x, 0, z + 0.12), (x, top, z + 0.12), (x, top, z)], FENCE, dark)
            z += 1.2
        scene.world_polygon([(x, top - 0.1, z0), (x, top - 0.1, z1), (x, top, z1), (x, top, z0)], FENCE, dark)


# --- street objects (fronto-parallel cut-outs, drawn far to near) -------------------------------------


def draw_car(scene: Scene, x: float, z: float, scale: float) -> None:
    _vehicle(scene, CAR, x, z, width=1.2 * scale, height=1.0 * scale, length=3.0 * scale)


def draw_truck(scene: Scene, x: float, z: float, scale: float) -> None:
    _vehicle(scene, TRUCK, x, z, width=1.6 * scale, height=2.1 * scale, length=5.5 * scale)


def draw_bus(scene: Scene, x: float, z: float, scale: float) -> None:
    _vehicle(scene, BUS, x, z, width=1.65 * scale, height=2.0 * scale, length=8.0 * scale)


def draw_train(scene: Scene, x: float, z: float, scale: float) -> None:
    _vehicle(scene, TRAIN, x, z, width=1.6 * scale, height=2.3 * scale, length=18.0 * scale)


def _vehicle(scene: Scene, label: int, x: float, z: float, *, width: float, height: float, length: float) -> None:
    """A box vehicle seen from behind (or the front), with the long side nearer the camera also visible."""
    rng = scene.rng
    body = scene.colour(label)
    half = width / 2
    side_x = x - half if x - half > 0.05 else x + half if x + half < -0.05 else None
    tyre, glass = scene.part(TYRE), scene.part(GLASS)
    if side_x is not None:
        z1 = z + length
        scene.world_polygon([(side_x, 0.2, z), (side_x, 0.2, z1), (side_x, height, z1), (side_x, height, z)],
                            label, tuple(np.asarray(body) * 0.78))
        band = (0.58, 0.85) if label == CAR else (0.55, 0.82)
        if label in (BUS, TRAIN):
            step = 1.1
            zz = z + 0.3
            while zz + 0.8 < z1:
                scene.world_polygon([(side_x, height * band[0], zz), (side_x, height * band[0], zz + 0.85),
                                     (side_x, height * band[1], zz + 0.85), (side_x, height * band[1], zz)],
                                    label, glass)
                zz += step
        elif label == CAR:
            scene.world_polygon([(side_x, height * band[0], z + 0.4), (side_x, height * band[0], z1 - 0.5),
                                 (side_x, height * band[1], z1 - 0.7), (side_x, height * band[1], z + 0.6)],
                                label, glass)
        for wz in (z + 0.5, z1 - 0.8):
            scene.world_polygon([(side_x, 0, wz), (side_x, 0, wz + 0.45), (side_x, 0.4, wz + 0.45),
                                 (side_x, 0.4, wz)], label, tyre)
    for u in (-half + 0.05, half - 0.3):
        scene.flat_box(x, z, u, 0.0, u + 0.25, 0.35, label, tyre)
    if label == CAR:
        scene.flat_box(x, z, -half, 0.22 * height, half, 0.62 * height, label, body)
        cabin = [(-half * 0.95, 0.62 * height), (half * 0.95, 0.62 * height), (half * 0.72, height),
                 (-half * 0.72, height)]
        scene.world_polygon([(x + u, v, z) for u, v in cabin], label, body)
        window = [(-half * 0.82, 0.66 * height), (half * 0.82, 0.66 * height), (half * 0.66, 0.94 * height),
                  (-half * 0.66, 0.94 * height)]
        scene.world_polygon([(x + u, v, z) for u, v in window], label, glass)
        lamp = scene.part(LAMPS[0])
        for u in (-half + 0.06, half - 0.22):
            scene.flat_box(x, z, u, 0.45 * height, u + 0.16, 0.55 * height, label, lamp)
    else:
        scene.flat_box(x, z, -half, 0.2, half, height, label, body)
        if label in (BUS, TRAIN):
            scene.flat_box(x, z, -half + 0.12, 0.55 * height, half - 0.12, 0.85 * height, label, glass)
        else:
            scene.flat_box(x, z, -half + 0.1, 0.3, half - 0.1, 0.36, label, scene.part(LAMPS[rng.integers(2)]))
        if label == TRAIN:
            scene.flat_box(x, z, -0.3, height, 0.3, height + 0.25, label, tuple(np.asarray(body) * 0.6))


def draw_person(scene: Scene, x: float, z: float, scale: float) -> None:
    """A pedestrian facing the camera: legs, torso, arms and head."""
    rng = scene.rng
    s = scale * rng.uniform(0.9, 1.1)
    clothes, trousers = scene.colour(PERSON), scene.colour(PERSON, 0.55)
    stride = rng.uniform(0.0, 0.06) * s
    scene.flat_box(x, z, -0.11 * s - stride, 0, -0.02 * s - stride, 0.52 * s, PERSON, trousers)
    scene.flat_box(x, z, 0.02 * s + stride, 0, 0.11 * s + stride, 0.52 * s, PERSON, trousers)
    scene.flat_box(x, z, -0.19 * s, 0.58 * s, 0.19 * s, 0.92 * s, PERSON, clothes)
    scene.flat_box(x, z, -0.14 * s, 0.5 * s, 0.14 * s, 0.96 * s, PERSON, clothes)
    scene.flat_ellipse(x, z, 0, 1.05 * s, 0.08 * s, 0.1 * s, PERSON, scene.part(SKIN))


def draw_two_wheeler(scene: Scene, label: int, x: float, z: float, scale: float, ridden: bool) -> None:
    """A bicycle or motorcycle seen from the side (wheels as rings), optionally with its rider."""
    rng = scene.rng
    s = scale
    facing = 1 if rng.random() < 0.5 else -1
    radius = (0.24 if label == MOTORCYCLE else 0.22) * s
    gap = (0.5 if label == MOTORCYCLE else 0.4) * s
    frame = scene.colour(label)
    tyre = scene.part(TYRE)
    ring = 0.07 * s if label == MOTORCYCLE else 0.03 * s
    for u in (-gap, gap):
        scene.flat_ellipse(x, z, u, radius, radius, radius, label, tyre, ring=ring)
    seat = (-0.12 * facing * s, 0.62 * s)
    bar = (0.32 * facing * s, 0.72 * s)
    if label == MOTORCYCLE:
        hull = [(-gap * 0.8, 0.3 * s), (gap * 0.7, 0.3 * s), (gap * 0.6, 0.58 * s), (-gap * 0.7, 0.6 * s)]
        scene.world_polygon([(x + u * facing, v, z) for u, v in hull], label, frame)
    else:
        hub_back, hub_front = (-gap * facing, radius), (gap * facing, radius)
        pedal = (0.0, radius * 0.9)
        scene.flat_line(x, z, [hub_back, pedal, seat, hub_back], 0.035 * s, label, frame)
        scene.flat_line(x, z, [pedal, (bar[0] * 0.9, bar[1] * 0.92), hub_front], 0.035 * s, label, frame)
    scene.flat_line(x, z, [(bar[0] - 0.06 * facing * s, bar[1]), (bar[0] + 0.04 * facing * s, bar[1] + 0.04 * s)],
                    0.04 * s, label, frame)
    if not ridden:
        return
    clothes = scene.colour(RIDER)
    hip = (seat[0], seat[1] + 0.05 * s)
    shoulder = (seat[0] + 0.14 * facing * s, seat[1] + 0.5 * s)
    torso = [(hip[0] - 0.1 * s, hip[1]), (hip[0] + 0.1 * s, hip[1]), (shoulder[0] + 0.1 * s, shoulder[1]),
             (shoulder[0] - 0.1 * s, shoulder[1])]
    scene.world_polygon([(x + u, v, z) for u, v in torso], RIDER, clothes)
    scene.flat_line(x, z, [hip, (0.05 * facing * s, radius * 1.4), (0.02 * facing * s, radius * 0.7)], 0.08 * s,
                    RIDER, scene.colour(RIDER, 0.55))
    scene.flat_line(x, z, [shoulder, bar], 0.06 * s, RIDER, clothes)
    head = SKIN if label == BICYCLE else LAMP_DARK  # motorcyclists wear helmets
    scene.flat_ellipse(x, z, shoulder[0] + 0.03 * facing * s, shoulder[1] + 0.13 * s, 0.09 * s, 0.1 * s, RIDER,
                       scene.part(head))


def draw_pole(scene: Scene, x: float, z: float, scale: float, attachment: str, side: int) -> None:
    """A pole with a traffic light (on the pole or on an arm over the road), a sign, or a lamp head."""
    rng = scene.rng
    top = rng.uniform(2.4, 3.6) * scale
    scene.flat_box(x, z, -0.05, 0, 0.05, top, POLE, scene.colour(POLE))
    if attachment == "light":
        u = 0.0
        if rng.random() < 0.4:  # hanging over the road
            u = -side * rng.uniform(1.2, 2.6)
            scene.flat_box(x, z, min(0.0, u), top - 0.08, max(0.0, u), top, POLE, scene.colour(POLE))
        box = scene.colour(TRAFFIC_LIGHT)
        scene.flat_box(x, z, u - 0.16, top - 0.85, u + 0.16, top, TRAFFIC_LIGHT, box)
        lit = int(rng.integers(3))
        for k in range(3):
            lamp = scene.part(LAMPS[k]) if k == lit else scene.part(LAMP_DARK)
            scene.flat_ellipse(x, z, u, top - 0.16 - 0.26 * k, 0.09, 0.09, TRAFFIC_LIGHT, lamp)
    elif attachment == "sign":
        face = scene.colour(TRAFFIC_SIGN)
        v = top - rng.uniform(0.2, 0.8)
        if rng.random() < 0.5:
            scene.flat_ellipse(x, z, 0, v, 0.3, 0.3, TRAFFIC_SIGN, face)
            scene.flat_ellipse(x, z, 0, v, 0.2, 0.2, TRAFFIC_SIGN, scene.part(SIGN_FACE))
        else:
            scene.flat_box(x, z, -0.3, v - 0.25, 0.3, v + 0.25, TRAFFIC_SIGN, face)
            scene.flat_box(x, z, -0.2, v - 0.05, 0.2, v + 0.05, TRAFFIC_SIGN, scene.part(SIGN_FACE))
    else:  # street lamp
        scene.flat_box(x, z, -side * 0.5, top - 0.08, 0.05, top, POLE, scene.colour(POLE))


def draw_tree(scene: Scene, x: float, z: float, scale: float) -> None:
    rng = scene.rng
    trunk_top = rng.uniform(1.6, 2.4) * scale
    scene.flat_box(x, z, -0.07 * scale, 0, 0.07 * scale, trunk_top, VEGETATION, scene.part(TRUNK))
    for _ in range(int(rng.integers(3, 6))):
        scene.flat_ellipse(x, z, rng.uniform(-0.5, 0.5) * scale, trunk_top + rng.uniform(0.3, 1.0) * scale,
                           rng.uniform(0.6, 1.1) * scale, rng.uniform(0.5, 0.9) * scale, VEGETATION,
                           scene.colour(VEGETATION, rng.uniform(0.8, 1.1)))


def draw_static(scene: Scene, x: float, z: float, scale: float) -> None:
    """Street furniture (bins, benches, boxes): Cityscapes 'static', ignored in training."""
    rng = scene.rng
    if rng.random() < 0.5:
        scene.flat_box(x, z, -0.18 * scale, 0, 0.18 * scale, 0.6 * scale, STATIC, scene.colour(STATIC))
    else:
        scene.flat_box(x, z, -0.5 * scale, 0.25 * scale, 0.5 * scale, 0.4 * scale, STATIC, scene.colour(STATIC))
        for u in (-0.45, 0.38):
            scene.flat_box(x, z, u * scale, 0, (u + 0.07) * scale, 0.25 * scale, STATIC, scene.colour(STATIC, 0.7))


# --- where each kind of object stands ------------------------------------------------------------------

# kind of street object → the label id whose presence it guarantees when that class is forced
KIND_OF_LABEL = {CAR: "car", TRUCK: "truck", BUS: "bus", TRAIN: "train", MOTORCYCLE: "motorcycle",
                 BICYCLE: "bicycle", RIDER: "motorcycle", PERSON: "person", POLE: "pole", TRAFFIC_LIGHT: "light",
                 TRAFFIC_SIGN: "sign", VEGETATION: "tree", FENCE: "fence", WALL: "wall"}


def _lane_x(scene: Scene, margin: float) -> float:
    left, right = scene.road_edge[-1] + margin, scene.road_edge[1] - margin
    if right <= left:
        return (left + right) / 2
    return float(scene.rng.uniform(left, right))


def _sidewalk_x(scene: Scene, side: int, lo: float, hi: float) -> float:
    """A point across the sidewalk, `lo`..`hi` of the way from the kerb to its outer edge."""
    return scene.kerb(side) + side * scene.sidewalk[side] * float(scene.rng.uniform(lo, hi))


def place_object(scene: Scene, kind: str, z: float, force_rider: bool = False) -> tuple[float, Callable[[], None]]:
    """Choose where an object of `kind` stands at depth z; returns (z, a function that draws it)."""
    rng, style = scene.rng, scene.style
    scale = float(rng.uniform(*style.object_scale))
    side = -1 if rng.random() < 0.5 else 1
    if kind in ("car", "truck", "bus"):
        z = max(z, scene.z_bottom * 1.6) if kind != "car" else z
        x = _lane_x(scene, 0.8)
        if abs(x) < 0.9:  # the camera's own lane: keep a following distance
            z = max(z, 3.5 * scene.z_bottom)
        draw = {"car": draw_car, "truck": draw_truck, "bus": draw_bus}[kind]
        return z, lambda: draw(scene, x, z, scale)
    if kind == "train":  # trams run down the middle of the road
        x = _lane_x(scene, 0.9)
        z = max(z, 2.5 * scene.z_bottom)
        return z, lambda: draw_train(scene, x, z, scale)
    if kind in ("motorcycle", "bicycle"):
        label = MOTORCYCLE if kind == "motorcycle" else BICYCLE
        ridden = force_rider or rng.random() < style.ridden
        x = _lane_x(scene, 0.5) if ridden or rng.random() < 0.3 else _sidewalk_x(scene, side, 0.3, 0.8)
        return z, lambda: draw_two_wheeler(scene, label, x, z, scale, ridden)
    if kind == "person":
        x = _lane_x(scene, 0.4) if rng.random() < 0.12 else _sidewalk_x(scene, side, 0.15, 0.9)
        return z, lambda: draw_person(scene, x, z, scale)
    if kind in ("pole", "light", "sign"):
        x = _sidewalk_x(scene, side, 0.1, 0.25)
        attachment = "lamp" if kind == "pole" and rng.random() < 0.6 else kind
        return z, lambda: draw_pole(scene, x, z, scale, attachment, side)
    if kind == "tree":
        x = _sidewalk_x(scene, side, 0.7, 0.9)
        return z, lambda: draw_tree(scene, x, z, scale)
    if kind == "static":
        x = _sidewalk_x(scene, side, 0.5, 0.95)
        return z, lambda: draw_static(scene, x, z, scale)
    if kind in ("fence", "wall"):  # on the outer edge of the sidewalk, so nothing on the street is behind it
        length = rng.uniform(3.0, 12.0)
        label = FENCE if kind == "fence" else WALL
        return math.inf, lambda: draw_barrier(scene, label, side, z, length)
    raise ValueError(f"unknown object kind {kind!r}")


def draw_objects(scene: Scene, force: frozenset[int]) -> None:
    """Sample the street objects (forced classes at least once, in the nearer half) and draw far to near."""
    rng, style = scene.rng, scene.style
    forced_kinds = {KIND_OF_LABEL[label] for label in force if label in KIND_OF_LABEL}
    items = []
    for kind, mean in style.counts.items():
        count = int(rng.poisson(mean))
        forced = kind in forced_kinds
        for k in range(max(count, 1 if forced else 0)):
            near = forced and k == 0
            z = scene.depth(far=style.object_depth[1] / 3 if near else None)
            items.append(place_object(scene, kind, z, force_rider=near and RIDER in force and kind == "motorcycle"))
    for _, draw in sorted(items, key=lambda item: -item[0]):
        draw()


# how tall (in camera heights) each kind of fallback object may be, so that it can be placed wholly in view
_FALLBACK_TOP = {"car": 1.1, "truck": 2.8, "bus": 2.7, "train": 3.3, "motorcycle": 1.7, "bicycle": 1.7,
                 "person": 1.6, "pole": 4.7, "light": 4.7, "sign": 4.7, "tree": 4.5, "fence": 1.0, "wall": 1.0}


def draw_fallback(scene: Scene, label: int, slot: float) -> None:
    """Put a near instance of a class that the scene ended up without, at `slot` (0..1) across the view."""
    rng, style = scene.rng, scene.style
    kind = KIND_OF_LABEL.get(label)
    z = scene.depth(near=1.3, far=2.2)
    if kind is not None:  # far enough back for its top to stay below the top of the frame
        z = max(z, scene.focal * (_FALLBACK_TOP[kind] - 1.0) / (0.9 * scene.horizon))
    x = (slot * scene.width - scene.cx) * z / scene.focal
    scale = float(rng.uniform(*style.object_scale))
    if label == SKY:  # only ever hidden by something very near: open a patch at the very top
        u0, u1 = (slot - 0.08) * scene.width, (slot + 0.08) * scene.width
        bottom = max(2.0, 0.05 * scene.height)
        scene.polygon([(u0, 0), (u1, 0), (u1, bottom), (u0, bottom)], SKY, scene.colour(SKY))
    elif label in (ROAD, SIDEWALK, TERRAIN):
        scene.ground_patch(x - 0.6, x + 0.6, z, z + 2.0, label, scene.colour(label))
    elif label == BUILDING:
        side = -1 if slot < 0.5 else 1
        _facade_box(scene, side, z, z + 6.0, rng.uniform(*style.building_height), BUILDING, scene.colour(BUILDING))
    elif kind in ("fence", "wall"):  # a short piece across the view
        scene.flat_box(x, z, -0.8, 0, 0.8, rng.uniform(0.6, 1.0), label, scene.colour(label))
    elif kind in ("car", "truck", "bus", "train"):
        {"car": draw_car, "truck": draw_truck, "bus": draw_bus, "train": draw_train}[kind](scene, x, z, scale)
    elif kind in ("motorcycle", "bicycle"):
        draw_two_wheeler(scene, MOTORCYCLE if kind == "motorcycle" else BICYCLE, x, z, scale, label == RIDER)
    elif kind == "person":
        draw_person(scene, x, z, scale)
    elif kind == "tree":
        draw_tree(scene, x, z, scale)
    elif kind is not None:
        draw_pole(scene, x, z, scale, "lamp" if kind == "pole" else kind, 1)


def draw_ego_hood(scene: Scene) -> None:
    """The bonnet of the recording car along the bottom (Cityscapes 'ego vehicle', ignored in training)."""
    w, h, depth = scene.width, scene.height, scene.hood
    xs = np.linspace(0, w, 17)
    curve = [(float(x), h - depth * (1.0 - 0.4 * ((x - w / 2) / (w / 2)) ** 2)) for x in xs]
    scene.polygon([(0, h), *curve, (w, h)], EGO_VEHICLE, scene.colour(EGO_VEHICLE))
    shine = [(float(x), y + depth * 0.25) for x, y in curve[5:12]]
    scene.polygon([*shine, *[(x, y + max(1.0, depth * 0.12)) for x, y in reversed(shine)]], EGO_VEHICLE,
                  scene.colour(EGO_VEHICLE, 1.8))


# --- photometric finish -------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cell: int) -> np.ndarray:
    coarse = rng.standard_normal((height // cell + 2, width // cell + 2), dtype=np.float32)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))


def finish(scene: Scene, labels: np.ndarray) -> np.ndarray:
    """Turn the flat colours into the domain's look: textures, lighting, colour cast, blur, sensor noise."""
    style, rng = scene.style, scene.rng
    rgb = scene.flat_image()
    if style.texture == 0 and style.noise == 0 and style.blur[1] == 0 and style.gradient == 0:
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    h, w = labels.shape
    smooth = _smooth_noise(rng, w, h, cell=max(4, w // 32))
    fine = rng.standard_normal((h, w), dtype=np.float32)
    modulation = 1.0 + style.texture * (_SMOOTH_TEXTURE[labels] * smooth + _FINE_TEXTURE[labels] * fine)
    rows = np.arange(h, dtype=np.float32)[:, None]
    sky_glow = 0.8 + 0.3 * np.clip(rows / max(scene.horizon, 1.0), 0.0, 1.0)  # hazier towards the horizon
    modulation = np.where(labels == SKY, modulation * sky_glow, modulation)
    rgb *= modulation[..., None]
    luma = rgb @ LUMA
    rgb = luma[..., None] + rng.uniform(*style.saturation) * (rgb - luma[..., None])
    cast = np.asarray(style.casts[int(rng.integers(len(style.casts)))], dtype=np.float32)
    rgb *= cast * (1.0 + rng.normal(0.0, 0.03, 3)).astype(np.float32)
    xs = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
    ys = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
    light = (1.0 + style.gradient * (1 if rng.random() < 0.5 else -1) * xs) * (
        1.0 - style.vignette * 0.5 * (xs**2 + ys**2))
    exposure = rng.uniform(0.85, 1.1)
    rgb *= (light * exposure)[..., None]
    image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    radius = rng.uniform(*style.blur) * w / 512
    if radius > 0:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, style.noise, (h, w, 3)).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


# --- one scene, start to finish -----------------------------------------------------------------------


def render_scene(style: DomainStyle, width: int, height: int, rng: np.random.Generator,
                 force: frozenset[int] = frozenset()) -> tuple[np.ndarray, np.ndarray]:
    """Render one street scene; returns (uint8 (H, W, 3) image, uint8 (H, W) Cityscapes label ids).

    Every label id in `force` is visible in the result (a near fallback instance is added when the sampled
    scene hides it).
    """
    scene = Scene(style, width, height, rng)
    draw_background(scene, force)
    draw_street(scene)
    draw_facades(scene, force)
    draw_objects(scene, force)
    for attempt in range(4):
        if scene.hood > 0:
            draw_ego_hood(scene)  # same geometry every time: a fallback drawn before it stays behind it
        labels = scene.label_map()
        missing = sorted(force - set(np.unique(labels).tolist()))
        if not missing or attempt == 3:
            break
        for k, label in enumerate(missing):  # each in its own place, so they do not hide one another
            draw_fallback(scene, label, 0.1 + 0.8 * (k + rng.uniform(0.2, 0.8)) / len(missing))
    return finish(scene, labels), labels
