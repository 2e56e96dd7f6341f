"""The scenes tokenizer: prompt-order ids (``sequence``) and slot-grounded ids and rope positions (``slots``)."""
import pytest
import torch

from dcache.pipelines.zoo.scenes.grammar import SLOTS, VOCABULARY
from dcache.pipelines.zoo.scenes.model import ScenesModelConfig, SceneTokenizer, config_of, image_ids

WORD = {w: i + 2 for i, w in enumerate(VOCABULARY)}


def _group_of(ids: list[int], words: tuple[str, str, str]) -> int:
    """Index of the 3-token group holding these words (groups start at token 1)."""
    want = [WORD[w] for w in words]
    hits = [k for k in range(5) if ids[1 + 3 * k:4 + 3 * k] == want]
    assert len(hits) == 1, (ids, words)
    return hits[0]


def _pixel_centre_of(pos: torch.Tensor) -> tuple[float, float]:
    """(x, y) pixel centre of the image token a text position coincides with (patch 4)."""
    ids = image_ids(32, 32, 4)
    k = int(((ids[:, 1:] - pos[1:]) ** 2).sum(1).argmin())
    return float(ids[k, 2]) * 4 + 2, float(ids[k, 1]) * 4 + 2


def test_slots_layout_puts_each_object_at_the_slot_its_relation_gives():
    tok = SceneTokenizer("slots")
    pos = tok.positions()
    for relation, (first, second) in [("left of", SLOTS["left of"]), ("right of", SLOTS["right of"]),
                                      ("above", SLOTS["above"]), ("below", SLOTS["below"])]:
        ids = tok.encode(f"a big red circle {relation} a small blue square on a gray background")
        for words, (x, y) in [(("big", "red", "circle"), first), (("small", "blue", "square"), second)]:
            k = _group_of(ids, words)
            cx, cy = _pixel_centre_of(pos[1 + 3 * k])
            assert abs(cx - x) <= 2 and abs(cy - y) <= 2, (relation, words, (cx, cy), (x, y))
            assert torch.equal(pos[1 + 3 * k], pos[3 + 3 * k])  # the group's three words share the slot
        assert ids[-1] == WORD["gray"] and ids[0] == SceneTokenizer.SUMMARY
        assert sum(i != SceneTokenizer.PAD for i in ids) == 8
    one = tok.encode("a small green triangle on a white background")
    cx, cy = _pixel_centre_of(pos[1 + 3 * _group_of(one, ("small", "green", "triangle"))])
    assert (abs(cx - 16) <= 2 and abs(cy - 16) <= 2) and sum(i != SceneTokenizer.PAD for i in one) == 5


def test_slots_layout_tokenizes_a_scene_not_its_wording():
    tok = SceneTokenizer("slots")
    a = tok.encode("a big red circle left of a small blue square on a black background")
    b = tok.encode("a small blue square right of a big red circle on a black background")
    c = tok.encode("a small blue square left of a big red circle on a black background")
    assert a == b and a != c


def test_sequence_layout_keeps_prompt_order_at_position_zero():
    tok = SceneTokenizer("sequence")
    ids = tok.encode("a big red circle on a black background")
    assert ids[:9] == [1] + [WORD[w] for w in "a big red circle on a black background".split()]
    assert set(ids[9:]) == {0} and torch.equal(tok.positions(), torch.zeros(17, 3))


def test_layout_names_are_checked_and_old_configs_read_as_sequence():
    with pytest.raises(ValueError, match=r"\('sequence', 'slots'\)"):
        SceneTokenizer("grid")
    with pytest.raises(ValueError, match="text_layout must be one of"):
        ScenesModelConfig(text_layout="grid")
    assert config_of({"model": {"image_size": 32}}).text_layout == "sequence"
    assert config_of({"model": {"text_layout": "slots"}}).text_layout == "slots"
