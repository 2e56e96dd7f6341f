"""The scene grammar: vocabulary, prompt parsing, and random scenes (layout included).

A prompt names one or two objects, each with a size, a colour and a shape, the spatial relation
of the first to the second, and the background::

    a big red circle on a black background
    a small blue triangle left of a big yellow square on a gray background

The two objects of a prompt always have different colours, so the checker can find each one by
colour alone. Sizes and positions are integers in pixels of the 32x32 image.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

IMAGE_SIZE = 32
SIZES = {"small": (7, 8), "big": (12, 13)}  # side length in pixels of the shape's bounding box
SIZE_THRESHOLD = 10.0  # the checker's small/big boundary on the detected bounding-box extent
OBJECT_COLOURS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
BACKGROUNDS = {"black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5), "white": (1.0, 1.0, 1.0)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = {"left of": ("left", "of"), "right of": ("right", "of"), "above": ("above",), "below": ("below",)}
FILLER = ("a", "on", "background")

# Every word a prompt may use, in the order of the tokenizer's ids (after the padding id 0).
VOCABULARY: tuple[str, ...] = (
    FILLER
    + tuple(SIZES)
    + tuple(OBJECT_COLOURS)
    + SHAPES
    + ("left", "right", "of", "above", "below")
    + tuple(BACKGROUNDS)
)
MAX_WORDS = 16

GRAMMAR = (
    "'a SIZE COLOUR SHAPE [RELATION a SIZE COLOUR SHAPE] on a BACKGROUND background' with "
    f"SIZE in {tuple(SIZES)}, COLOUR in {tuple(OBJECT_COLOURS)}, SHAPE in {SHAPES}, "
    f"RELATION in {tuple(RELATIONS)}, BACKGROUND in {tuple(BACKGROUNDS)}, the two colours different"
)


@dataclass(frozen=True)
class SceneObject:
    size: str
    colour: str
    shape: str


@dataclass(frozen=True)
class Scene:
    """What a prompt says: objects, the relation of objects[0] to objects[1], the background."""

    objects: tuple[SceneObject, ...]
    relation: str | None
    background: str

    def prompt(self) -> str:
        words = [f"a {o.size} {o.colour} {o.shape}" for o in self.objects]
        head = words[0] if self.relation is None else f"{words[0]} {self.relation} {words[1]}"
        return f"{head} on a {self.background} background"


@dataclass(frozen=True)
class Placed:
    """An object with its bounding box: top-left corner (x, y) and side length, in pixels."""

    obj: SceneObject
    x: int
    y: int
    side: int

    @property
    def centre(self) -> tuple[float, float]:
        """Area centroid (what the checker measures): an upright triangle's sits 2/3 down its box."""
        down = 2 / 3 if self.obj.shape == "triangle" else 1 / 2
        return self.x + self.side / 2, self.y + self.side * down


def words_of(prompt: str) -> list[str]:
    """Lower-cased words of a prompt; a final full stop is allowed."""
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
    text = prompt.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    return text.split()


def _error(prompt: str, why: str) -> ValueError:
    return ValueError(f"bad prompt {prompt!r}: {why}. Prompts follow {GRAMMAR}; vocabulary: {' '.join(VOCABULARY)}")


def validate_words(prompt: str) -> list[str]:
    """The prompt's words, or a ValueError naming the vocabulary (empty, unknown word, too long)."""
    words = words_of(prompt)
    if not words:
        raise _error(prompt, "it is empty")
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise _error(prompt, f"unknown word(s) {unknown}")
    if len(words) > MAX_WORDS:
        raise _error(prompt, f"{len(words)} words, at most {MAX_WORDS} are accepted")
    return words


def parse_prompt(prompt: str) -> Scene:
    """Prompt -> Scene; a ValueError naming the grammar and vocabulary if it does not parse."""
    words = validate_words(prompt)

    def obj(at: int) -> SceneObject:
        if len(words) < at + 4 or words[at] != "a":
            raise _error(prompt, f"expected 'a SIZE COLOUR SHAPE' at word {at + 1}")
        size, colour, shape = words[at + 1: at + 4]
        if size not in SIZES or colour not in OBJECT_COLOURS or shape not in SHAPES:
            raise _error(prompt, f"expected 'a SIZE COLOUR SHAPE' at word {at + 1}, got {' '.join(words[at:at + 4])!r}")
        return SceneObject(size, colour, shape)

    first, i, relation = obj(0), 4, None
    objects = [first]
    for name, rel_words in RELATIONS.items():
        if tuple(words[i:i + len(rel_words)]) == rel_words:
            relation = name
            i += len(rel_words)
            objects.append(obj(i))
            i += 4
            break
    tail = words[i:]
    if len(tail) != 4 or tail[:2] != ["on", "a"] or tail[2] not in BACKGROUNDS or tail[3] != "background":
        raise _error(prompt, "expected it to end with 'on a BACKGROUND background'")
    if len(objects) == 2 and objects[0].colour == objects[1].colour:
        raise _error(prompt, "the two objects must have different colours")
    return Scene(tuple(objects), relation, tail[2])


def random_scene(rng: random.Random, p_two: float = 0.7) -> Scene:
    def obj(exclude: str | None = None) -> SceneObject:
        colours = [c for c in OBJECT_COLOURS if c != exclude]
        return SceneObject(rng.choice(list(SIZES)), rng.choice(colours), rng.choice(SHAPES))

    first = obj()
    background = rng.choice(list(BACKGROUNDS))
    if rng.random() >= p_two:
        return Scene((first,), None, background)
    return Scene((first, obj(exclude=first.colour)), rng.choice(list(RELATIONS)), background)


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Does centre ``a`` stand in ``relation`` to centre ``b``? The named axis must dominate."""
    dx, dy = b[0] - a[0], b[1] - a[1]  # image y grows downwards
    if relation == "left of":
        return dx > 0 and abs(dx) > abs(dy)
    if relation == "right of":
        return dx < 0 and abs(dx) > abs(dy)
    if relation == "above":
        return dy > 0 and abs(dy) > abs(dx)
    if relation == "below":
        return dy < 0 and abs(dy) > abs(dx)
    raise ValueError(f"unknown relation {relation!r}; known: {tuple(RELATIONS)}")


# Slot centres (x, y) of the first and second object per relation; one object sits in the middle.
# Fixed slots (with jitter) keep the layout learnable by a small model in a CPU hour: the prompt
# decides where each object goes, the noise only moves it by a pixel or two.
SLOTS = {
    None: ((16.0, 16.0),),
    "left of": ((8.5, 16.0), (23.5, 16.0)),
    "right of": ((23.5, 16.0), (8.5, 16.0)),
    "above": ((16.0, 8.5), (16.0, 23.5)),
    "below": ((16.0, 23.5), (16.0, 8.5)),
}
JITTER = 2  # pixels each way, per object and axis


def layout(scene: Scene, rng: random.Random, margin: int = 1, gap: int = 2, slack: float = 2.0) -> list[Placed]:
    """Integer boxes for the scene's objects: slot centres chosen by the relation, jittered by up to
    JITTER pixels, inside the image, apart, and with the relation holding by at least ``slack``
    pixels on the dominant axis (so the checker is never borderline)."""
    sides = [rng.choice(SIZES[o.size]) for o in scene.objects]
    slots = SLOTS[scene.relation]
    for _ in range(10_000):
        placed = []
        for o, s, (cx, cy) in zip(scene.objects, sides, slots):
            x = round(cx - s / 2) + rng.randint(-JITTER, JITTER)
            y = round(cy - s / 2) + rng.randint(-JITTER, JITTER)
            placed.append(Placed(o, x, y, s))
        if any(p.x < margin or p.y < margin or p.x + p.side > IMAGE_SIZE - margin
               or p.y + p.side > IMAGE_SIZE - margin for p in placed):
            continue
        if len(placed) == 1:
            return placed
        a, b = placed
        apart_x = a.x + a.side + gap <= b.x or b.x + b.side + gap <= a.x
        apart_y = a.y + a.side + gap <= b.y or b.y + b.side + gap <= a.y
        if not (apart_x or apart_y):
            continue
        (ax, ay), (bx, by) = a.centre, b.centre
        dx, dy = abs(bx - ax), abs(by - ay)
        horizontal = scene.relation in ("left of", "right of")
        if (dx - dy if horizontal else dy - dx) < slack:
            continue
        if relation_holds(scene.relation, a.centre, b.centre):
            return placed
    raise RuntimeError(f"no layout found for {scene}")  # pragma: no cover - sizes always fit


def sample_prompts(n: int, seed: int) -> list[str]:
    """``n`` prompts drawn from the grammar; the same (n, seed) always gives the same list.

    >>> sample_prompts(2, seed=0)  # doctest: +SKIP
    ['a big red ... on a gray background', ...]
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    rng = random.Random(f"scenes-prompts-{seed}")
    return [random_scene(rng).prompt() for _ in range(n)]


def seed_prompts(seeds: list[int]) -> list[str]:
    """One prompt per seed, the grammar's first for that seed: what sample ``s`` of ``dcache bench``,
    ``dcache eval --model scenes`` and the magcache calibration draws, so each seed keeps its prompt
    whichever other seeds run beside it."""
    return [sample_prompts(1, seed=s)[0] for s in seeds]
