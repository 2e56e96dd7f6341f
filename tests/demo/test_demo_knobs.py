"""Knobs come from the registry and the config dataclasses; the command line; small parts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from dcache import registry
from dcache.demos import knobs


def test_every_registered_policy_has_one_knob_per_config_field():
    for task in registry.TASKS:
        table = knobs.policy_knobs(task)
        assert sorted(table) == sorted(registry.policies(task))
        for name, ks in table.items():
            fields = [f.name for f in dataclasses.fields(registry.get_policy(name).config_cls) if f.init]
            assert [k.name for k in ks] == fields


@pytest.fixture
def extra_policy():
    """A policy registered at run time (removed again afterwards)."""

    @registry.register_policy("demo-test-policy", description="test only", task="image", granularity="step")
    @dataclasses.dataclass
    class DemoTestConfig:
        stride: int = 2
        scale: float = 0.5
        enabled: bool = True
        mode: str | None = None

        def __post_init__(self):
            if self.stride < 1:
                raise ValueError(f"demo-test-policy: stride must be >= 1, got {self.stride}")

    yield DemoTestConfig
    registry._POLICIES.pop("demo-test-policy", None)


def test_a_new_policy_appears_in_the_app_with_its_knobs(extra_policy):
    pytest.importorskip("gradio")
    from dcache.demos.app import build_app

    app = build_app()
    cfg = app.get_config_file()
    comps = {c.get("props", {}).get("elem_id"): c for c in cfg["components"]}
    radio = comps["image-policy"]["props"]["choices"]
    assert "demo-test-policy" in [c[0] if isinstance(c, (list, tuple)) else c for c in radio]
    kinds = {f"knob-demo-test-policy-{n}": t for n, t in
             (("stride", "number"), ("scale", "number"), ("enabled", "checkbox"), ("mode", "textbox"))}
    for eid, kind in kinds.items():
        assert comps[eid]["type"] == kind, (eid, comps[eid]["type"])
    app.close()


def test_widget_values_become_validated_options(extra_policy):
    ks = knobs.knobs_for("demo-test-policy")
    assert [(k.kind, k.optional) for k in ks] == [("int", False), ("float", False), ("bool", False), ("text", True)]
    # defaults are not passed on; changed values are, with the field's type
    assert knobs.options_from_values(ks, [2, 0.5, True, ""]) == {}
    assert knobs.options_from_values(ks, [3, 0.25, False, "'fast'"]) == {"stride": 3, "scale": 0.25, "enabled": False,
                                                                         "mode": "fast"}
    assert knobs.options_from_values(ks, [2, 0.5, True, "fast"]) == {"mode": "fast"}  # a bare word stays a string
    cfg = knobs.build_config("demo-test-policy", "image", {"stride": 3})
    assert isinstance(cfg, extra_policy) and cfg.stride == 3
    with pytest.raises(ValueError, match="stride must be an integer"):
        knobs.options_from_values(ks, [2.5, 0.5, True, ""])
    with pytest.raises(ValueError, match="scale must be a number"):
        knobs.options_from_values(ks, [2, "lots", True, ""])
    with pytest.raises(ValueError, match="stride must be >= 1"):
        knobs.build_config("demo-test-policy", "image", {"stride": 0})
    with pytest.raises(ValueError, match="accepted"):
        knobs.build_config("demo-test-policy", "dllm", {})


def test_demo_cli_refuses_bad_options_with_one_line():
    for argv, want in ((["--port", "0"], "--port must be in [1, 65535]"),
                       (["--concurrency", "0"], "--concurrency must be at least 1"),
                       (["--port", "x"], "invalid int value")):
        r = subprocess.run([sys.executable, "-m", "dcache.cli", "demo", *argv], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and want in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_binding_beyond_localhost_warns():
    from dcache.demos.app import host_warning

    assert host_warning("127.0.0.1") is None and host_warning("localhost") is None
    assert "reachable from other machines" in host_warning("0.0.0.0")


def test_instance_pool_gives_each_concurrent_user_its_own_instance():
    from dcache.demos.pool import InstancePool

    made = []
    pool = InstancePool(lambda: made.append(object()) or made[-1])
    with pool.checkout() as a, pool.checkout() as b:
        assert a is not b and pool.peak_in_use == 2
    with pool.checkout() as c:
        assert c in (a, b) and pool.built == 2  # reused afterwards, not rebuilt


def test_timeline_lines_count_each_call_sites():
    from dcache.demos.timeline import plot, summary_lines

    tl = [{"step": 0, "branch": 0, "timestep": 1.0, "sites": {"a": "computed", "b": "computed"}},
          {"step": 1, "branch": 0, "timestep": 0.5, "sites": {"a": "reused", "b": "forecast"}}]
    assert summary_lines(tl) == ["step 0 branch 0: computed 2, reused 0, forecast 0",
                                 "step 1 branch 0: computed 0, reused 1, forecast 1"]
    img = plot(tl)
    assert img.size[0] > 300


def test_mp4_is_h264_with_every_frame():
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")

    from dcache.demos.media import write_mp4

    frames = torch.rand(7, 1, 24, 24)
    path = write_mp4(frames, fps=7)
    reader = imageio_ffmpeg.read_frames(path)
    meta = reader.__next__()
    n = sum(1 for _ in reader)
    assert meta["codec"].startswith("h264") and meta["size"] == (192, 192) and n == 7


def test_scenes_model_is_used_when_present_else_a_clear_message():
    from dcache.demos import image_task

    try:
        import dcache.pipelines.zoo.scenes  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="scenes model is not available"):
            image_task.get_model("scenes")
        return
    from dcache.pipelines.zoo.scenes import sample_prompts

    r = image_task.run_image("scenes", sample_prompts(1, 0)[0], 0, 4, 4.0, "static", {})
    assert r.accelerated.shape == r.baseline.shape and "prompt" in r.adherence


def test_exclusive_side_waits_for_every_shared_holder():
    import threading
    import time

    from dcache.demos.pool import SharedExclusiveLock

    lock, events = SharedExclusiveLock(), []
    entered = threading.Event()

    def holder():
        with lock.shared():
            entered.set()
            time.sleep(0.2)
            events.append("shared done")

    t = threading.Thread(target=holder)
    t.start()
    entered.wait()
    with lock.exclusive():
        events.append("exclusive")
        with_shared = []
        t2 = threading.Thread(target=lambda: lock.shared().__enter__() or with_shared.append(1))
        t2.start()
        time.sleep(0.05)
        assert not with_shared  # a new shared holder waits while the exclusive side is held
    t.join()
    t2.join(timeout=5)
    assert events == ["shared done", "exclusive"] and with_shared == [1]


def test_the_script_serves_the_page_on_localhost():
    """``python demos/app.py --port N`` (what ``dcache demo`` runs) serves the app on 127.0.0.1."""
    pytest.importorskip("gradio")
    import json
    import os
    import time
    import urllib.request

    from demo_checks import free_port

    port = free_port()
    script = os.path.join(os.path.dirname(__file__), "..", "..", "demos", "app.py")
    proc = subprocess.Popen([sys.executable, script, "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline, page = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as r:
                    page = json.loads(r.read().decode())
                break
            except OSError:
                time.sleep(0.5)
        assert page is not None, proc.stdout.read() if proc.poll() is not None else "no answer in 120 s"
        assert page["title"] == "dcache demo"
        assert "image-generate" in {c.get("props", {}).get("elem_id") for c in page["components"]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_instance_pool_waits_at_its_limit_instead_of_building_more():
    import threading
    import time

    from dcache.demos.pool import InstancePool

    pool = InstancePool(lambda: object(), max_instances=1)
    order = []

    def second():
        with pool.checkout() as b:
            order.append(("second", b))

    with pool.checkout() as a:
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.1)
        assert not order  # waiting: the only instance is out
        order.append(("first", a))
    t.join(timeout=5)
    assert [o[0] for o in order] == ["first", "second"] and order[1][1] is a and pool.built == 1
