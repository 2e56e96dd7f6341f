"""Head files: round trip, the reference's aliases and list form, clear errors on bad files."""

import json

import pytest
import torch

from dcache.pipelines.ar_video.profiler import frame_attention_mass, profile_heads, scores_to_split
from dcache.schedulers._forcing_heads import HeadSplit, load_head_file, save_head_file


def test_round_trip(tmp_path):
    split = HeadSplit(3, 4, [[0, 2], [], [1, 2, 3]], [[1, 3], [0, 1, 2, 3], [0]])
    p = tmp_path / "h.json"
    save_head_file(split, p, profile="x", scores=[[0.1] * 4] * 3)
    back = load_head_file(p, 3, 4)
    assert back.static == split.static and back.dynamic == split.dynamic
    assert back.meta["profile"] == "x" and back.counts() == (5, 7)


def test_aliases_list_form_and_missing_layers(tmp_path):
    p = tmp_path / "h.json"
    p.write_text(json.dumps([{"layer_idx": 1, "local_heads": [3, 0], "temporal_head": [1, 2]}]))
    s = load_head_file(p, 2, 4)
    assert s.static == [[], [0, 3]] and s.dynamic == [[0, 1, 2, 3], [1, 2]]


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"num_layers": 1, "num_heads": 4, "layers": [{"static_head": [0, 1], "dynamic_head": [2]}]}), "exactly heads"),
        (json.dumps({"num_layers": 1, "num_heads": 4, "layers": [{"static_head": [0, 1], "dynamic_head": [1, 2, 3]}]}), "both static and dynamic"),
        (json.dumps({"num_layers": 1, "num_heads": 4, "layers": [{"static_head": [0, 9], "dynamic_head": [1, 2, 3]}]}), r"ints in \[0, 4\)"),
        (json.dumps({"num_layers": 1, "num_heads": 4, "layers": [{"layer_idx": 5, "static_head": [], "dynamic_head": [0, 1, 2, 3]}]}), "out of range"),
        (json.dumps({"num_layers": 1, "num_heads": 4, "layers": [{"static_head": [0], "local_head": [1], "dynamic_head": [2, 3]}]}), "several keys"),
        (json.dumps({"num_layers": 2, "num_heads": 4, "layers": []}), "for 2 layers"),
        (json.dumps({"num_layers": 1, "num_heads": 8, "layers": []}), "8 heads"),
        (json.dumps({"heads": 1}), "'layers' list"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_head_file(p, 1, 4)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_head_file(tmp_path / "nope.json", 1, 4)


def test_frame_mass_and_split_rules():
    T = 2
    q = torch.zeros(1, 2, 2, 4)
    k = torch.zeros(1, 2, 6, 4)
    k[0, 0, 4:] = 10.0  # head 0 looks at the last key frame
    q[:] = 1.0
    m = frame_attention_mass(q, k, T, slice(0, 2))
    assert m.shape == (2, 3) and torch.allclose(m.sum(-1), torch.ones(2))
    assert m[0, 2] > 0.99 and torch.allclose(m[1], torch.full((3,), 1 / 3))
    scores = torch.tensor([[0.9, 0.1, 0.85, 0.5]])
    assert scores_to_split(scores, 0.8).static == [[0, 2]]
    assert scores_to_split(scores, static_fraction=0.25).static == [[0]]


def test_profiler_writes_a_loadable_file(pipe, emb, tmp_path):
    out = tmp_path / "heads.json"
    split, scores = profile_heads(pipe, [emb], num_frames=6, sigmas=(0.0,), last_k=2, out_path=out)
    assert scores.shape == (2, 4) and ((scores > 0) & (scores <= 1 + 1e-6)).all()
    back = load_head_file(out, 2, 4)
    assert back.static == split.static
    with pytest.raises(ValueError, match="profile_chunk"):
        profile_heads(pipe, [emb], num_frames=6, profile_chunk=0)
