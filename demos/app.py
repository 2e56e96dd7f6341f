"""The Gradio app: baseline vs accelerated, side by side, for images, dLLMs and AR video.

    dcache demo                      # http://127.0.0.1:7860
    python demos/app.py --port 7861
    dcache demo --host 0.0.0.0       # reachable from the network (warns)

Policies and their knobs come from the registry (``dcache.policies(task)`` and each config
dataclass's fields). Requests go through Gradio's queue; each one checks its own model instance
out of a pool, so concurrent users never share cache state. Errors are shown in the page.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import traceback
from typing import Any, Callable

import dcache
from dcache.demos import knobs as knobs_mod

__all__ = ["build_app", "main", "launch", "host_warning", "LOCAL_HOSTS"]

log = logging.getLogger("dcache.demo")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _error_text(e: BaseException) -> str:
    if isinstance(e, ValueError):
        return f"**Error:** {e}"
    log.error("demo request failed:\n%s", traceback.format_exc())
    return f"**Internal error** ({type(e).__name__}): {e}"


def _fmt_s(x: float) -> str:
    return f"{x:.3f} s"


def _fmt_db(x: float) -> str:
    return "inf dB (identical)" if math.isinf(x) else f"{x:.2f} dB"


def _flops_line(stats: dict) -> str:
    avoided = stats.get("flops_avoided_fraction")
    if avoided is None or not 0.0 <= avoided <= 1.0:  # a table measured while another request ran
        return "FLOPs computed: n/a"
    return f"FLOPs computed: {1 - avoided:.3f} of the baseline's (estimated speedup {stats.get('estimated_speedup', 1.0):.2f}x)"


# -- knob widgets ---------------------------------------------------------------------------------
def _knob_widget(gr: Any, knob: knobs_mod.Knob) -> Any:
    eid = f"knob-{knob.policy}-{knob.name}"
    if knob.kind == "bool":
        return gr.Checkbox(value=bool(knob.default), label=knob.name, elem_id=eid)
    if knob.kind == "int":
        return gr.Number(value=knob.default, precision=0, label=knob.name, elem_id=eid)
    if knob.kind == "float":
        return gr.Number(value=knob.default, label=knob.name, elem_id=eid)
    hint = "blank = default" + (" (None)" if knob.default is None else f" ({knob.default!r})")
    return gr.Textbox(value=knobs_mod.display_default(knob), label=f"{knob.name} — Python literal, {hint}",
                      elem_id=eid)


def _policy_panel(gr: Any, task: str, default: str | None, elem_prefix: str) -> tuple[Any, list, dict, list]:
    """A policy radio plus one group of knob widgets per policy, shown only for the chosen one.

    Returns (radio, groups, {policy: [knobs]}, flat list of every knob widget)."""
    table = knobs_mod.policy_knobs(task)
    names = list(table)
    choice = default if default in names else (names[0] if names else None)
    radio = gr.Radio(choices=names, value=choice, label="policy", elem_id=f"{elem_prefix}-policy")
    groups, widgets = [], []
    for name in names:
        with gr.Group(visible=name == choice) as g:
            if table[name]:
                for k in table[name]:
                    widgets.append(_knob_widget(gr, k))
            else:
                gr.Markdown(f"`{name}` has no options.")
        groups.append(g)

    def show(selected: str):
        return [gr.update(visible=n == selected) for n in names]

    radio.change(show, inputs=radio, outputs=groups, queue=False)
    return radio, groups, table, widgets


def _options(table: dict[str, list], policy: str, values: list) -> dict[str, Any]:
    """The chosen policy's options from the flat list of every policy's widget values."""
    if policy not in table:
        raise ValueError(f"choose a policy; accepted: {', '.join(table)}")
    start = 0
    for name, ks in table.items():
        if name == policy:
            return knobs_mod.options_from_values(ks, list(values[start:start + len(ks)]))
        start += len(ks)
    raise AssertionError("unreachable")


def _progress_adapter(progress: Any) -> Callable[[float, str], None]:
    def report(frac: float, desc: str) -> None:
        try:
            progress(frac, desc=desc)
        except Exception:  # noqa: BLE001 - progress is cosmetic; never fail a generation over it
            pass

    return report


# -- image tab ------------------------------------------------------------------------------------
def _image_tab(gr: Any) -> None:
    from dcache.demos import image_task, media, timeline

    gr.Markdown("Pick a model, a policy and its options; the baseline (no cache) runs once per "
                "model, class/prompt, seed, steps and guidance and is reused when you switch policies.")
    with gr.Row():
        with gr.Column(scale=1):
            model = gr.Radio(choices=list(image_task.EMBEDDED_MODELS), value=image_task.DEFAULT_IMAGE_MODEL,
                             label="embedded model", elem_id="image-model")
            model_path = gr.Textbox(value="", label="or a diffusers pipeline: local directory or hub id (overrides)",
                                    elem_id="image-model-path")
            condition = gr.Textbox(value=image_task.default_condition(image_task.DEFAULT_IMAGE_MODEL),
                                   label="class label (digits 0-9) or prompt (scenes)", elem_id="image-condition")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="seed", elem_id="image-seed")
                steps = gr.Number(value=20, precision=0, label="steps", elem_id="image-steps")
                guidance = gr.Number(value=4.0, label="guidance", elem_id="image-guidance")
            policy, _, table, widgets = _policy_panel(gr, "image", "taylorseer", "image")
            spec = gr.Textbox(value="", label="or a policy list, one per granularity (overrides the policy above), "
                              "e.g. teacache(threshold=0.3),taylorseer(interval=4)", elem_id="image-policy-list")
            button = gr.Button("Generate", variant="primary", elem_id="image-generate")
            status = gr.Markdown("", elem_id="image-status")
        with gr.Column(scale=2):
            with gr.Row():
                base_img = gr.Image(label="baseline", type="pil", format="png", elem_id="image-baseline")
                acc_img = gr.Image(label="accelerated", type="pil", format="png", elem_id="image-accelerated")
                diff_img = gr.Image(label="|difference|", type="pil", format="png", elem_id="image-diff")
            metrics = gr.Markdown("", elem_id="image-metrics")
            tl_plot = gr.Image(label="per-step timeline", type="pil", format="png", elem_id="image-timeline-plot")
            tl_text = gr.Textbox(label="timeline (one line per denoiser call)", lines=6, max_lines=12,
                                 elem_id="image-timeline-text")

    def on_model(choice: str):
        return gr.update(value=image_task.default_condition(choice))

    model.change(on_model, inputs=model, outputs=condition, queue=False)

    def generate(model_choice, path, cond, seed_v, steps_v, guidance_v, policy_v, spec_v, *values,
                 progress=gr.Progress()):
        none = (None,) * 6
        try:
            opts = _options(table, policy_v, list(values)) if not (spec_v or "").strip() else {}
            name = (path or "").strip() or model_choice
            label = image_task.policy_label(image_task.image_configs(policy_v, opts, spec_v))
            r = image_task.run_image(name, cond, seed_v, steps_v, guidance_v, policy_v, opts,
                                     _progress_adapter(progress), spec=spec_v)
        except Exception as e:  # noqa: BLE001 - every failure becomes a message in the page
            return (_error_text(e),) + none
        diff, peak = media.diff_map(r.baseline, r.accelerated)
        st = r.stats
        lines = [
            f"wall time: baseline {_fmt_s(r.baseline_s)}{' (cached)' if r.baseline_cached else ''}"
            f" · {label} {_fmt_s(r.accelerated_s)}",
            f"speedup: {r.speedup:.2f}x",
            f"PSNR vs baseline: {_fmt_db(r.psnr)} (largest pixel difference {peak:.3f})",
            _flops_line(st),
            f"sites: computed {st.get('computed', 0)} · reused {st.get('reused', 0)} · forecast {st.get('forecast', 0)}"
            f" over {st.get('denoiser_calls', 0)} denoiser calls",
        ]
        if r.adherence:
            lines.append(f"check: {r.adherence}")
        md = "\n".join(f"- {ln}" for ln in lines)
        title = f"{label} on {name}: {steps_v} steps"
        return ("done", media.to_pil(r.baseline), media.to_pil(r.accelerated), diff, md,
                timeline.plot(st.get("timeline", []), title), "\n".join(timeline.summary_lines(st.get("timeline", []))))

    button.click(generate, inputs=[model, model_path, condition, seed, steps, guidance, policy, spec, *widgets],
                 outputs=[status, base_img, acc_img, diff_img, metrics, tl_plot, tl_text], api_name="generate_image")


# -- dLLM tab -------------------------------------------------------------------------------------
def _dllm_tab(gr: Any) -> None:
    from dcache.demos import dllm_task

    gr.Markdown("The embedded LLaDA-architecture model solves the \"scripts\" task: the prompt (`^ scripts | "
                "message |`) allows 2 or 3 of 4 scripts (`A`-`D`) and gives a 16-digit message; the answer repeats "
                "the message over the whole canvas, every digit in one allowed script of the model's choice "
                "(`a3` = digit 3 in script a). Each prompt has 2-3 valid answers: accuracy is the share of rows "
                "that are one of them, and the cached run also reports how many of its tokens equal the plain "
                "sampler's. `?` is a still-masked slot. Both runs use "
                "the same problems; the first one is shown as it fills in. A policy's `threshold` also "
                "switches to confidence-threshold parallel decoding (Fast-dLLM); `None` keeps one token per step, "
                "so the cache alone is compared.")
    with gr.Row():
        with gr.Column(scale=1):
            model = gr.Textbox(value=dllm_task.DEFAULT_DLLM_MODEL, label="model: 'embedded' or a local LLaDA directory",
                               elem_id="dllm-model")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="seed", elem_id="dllm-seed")
                length = gr.Radio(choices=list(dllm_task.GEN_LENGTHS), value=64, label="answer length",
                                  elem_id="dllm-length")
                batch = gr.Number(value=4, precision=0, label="problems (batch)", elem_id="dllm-batch")
            policy, _, table, widgets = _policy_panel(gr, "dllm", "dual-cache", "dllm")
            button = gr.Button("Generate", variant="primary", elem_id="dllm-generate")
            status = gr.Markdown("", elem_id="dllm-status")
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="first problem: prompt (^ scripts | message |) and its valid answers", lines=4,
                                elem_id="dllm-prompt")
            plain = gr.Textbox(label="without cache (plain sampler)", lines=2, elem_id="dllm-plain")
            cached = gr.Textbox(label="with the policy", lines=2, elem_id="dllm-cached")
            metrics = gr.Markdown("", elem_id="dllm-metrics")

    def side_line(run) -> str:
        if run is None:
            return "waiting"
        if not run.done:
            return f"{run.label}: step {run.step}"
        line = (f"{run.label}: {run.tokens_per_s:.1f} tokens/s · {run.seconds:.3f} s · {run.nfe} forwards · "
                f"accuracy {run.accuracy:.3f} (valid answers)")
        if run.agreement is not None:
            line += f" · same tokens as the plain sampler {run.agreement:.3f}"
        return line

    def generate(model_v, seed_v, length_v, batch_v, policy_v, *values):
        try:
            opts = _options(table, policy_v, list(values))
            shown = None
            for base, side in dllm_task.run_dllm(model_v, seed_v, length_v, batch_v, policy_v, opts):
                if shown is None:  # the request is validated by now
                    shown = "\n".join(dllm_task.render_prompt(int(seed_v), int(length_v), int(batch_v)))
                lines = [side_line(base), side_line(side)]
                if base.done and side is not None and side.done:
                    lines.append(f"speedup: {side.tokens_per_s / base.tokens_per_s:.2f}x (tokens/s ratio)")
                yield ("running" if not (side and side.done) else "done", shown, base.text,
                       side.text if side else "", "\n".join(f"- {ln}" for ln in lines))
        except Exception as e:  # noqa: BLE001 - every failure becomes a message in the page
            yield _error_text(e), None, None, None, None

    button.click(generate, inputs=[model, seed, length, batch, policy, *widgets],
                 outputs=[status, prompt, plain, cached, metrics], api_name="generate_dllm")


# -- AR video tab ---------------------------------------------------------------------------------
def _video_tab(gr: Any) -> None:
    from dcache.demos import media, video_task
    from dcache.pipelines.ar_video.reference import VELOCITIES

    gr.Markdown("The embedded causal video model moves a digit at (vx, vy) pixels per frame. The baseline "
                f"keeps every frame's keys and values (`{video_task.BASELINE_POLICY}`); the policy keeps fewer.")
    with gr.Row():
        with gr.Column(scale=1):
            model = gr.Textbox(value=video_task.DEFAULT_VIDEO_MODEL,
                               label="model: 'embedded' or a local AR-video model directory", elem_id="video-model")
            with gr.Row():
                digit = gr.Dropdown(choices=list(range(10)), value=3, label="digit", elem_id="video-digit")
                vx = gr.Radio(choices=list(VELOCITIES), value=1, label="vx", elem_id="video-vx")
                vy = gr.Radio(choices=list(VELOCITIES), value=-2, label="vy", elem_id="video-vy")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="seed", elem_id="video-seed")
                frames = gr.Number(value=12, precision=0, label="frames (multiple of 3)", elem_id="video-frames")
            policy, _, table, widgets = _policy_panel(gr, "ar-video", "forcing-kv", "video")
            button = gr.Button("Generate", variant="primary", elem_id="video-generate")
            status = gr.Markdown("", elem_id="video-status")
        with gr.Column(scale=2):
            with gr.Row():
                v_base = gr.Video(label=f"baseline ({video_task.BASELINE_POLICY})", elem_id="video-baseline",
                                  autoplay=True, loop=True)
                v_pol = gr.Video(label="policy", elem_id="video-policy", autoplay=True, loop=True)
            metrics = gr.Markdown("", elem_id="video-metrics")

    def generate(model_v, digit_v, vx_v, vy_v, seed_v, frames_v, policy_v, *values, progress=gr.Progress()):
        try:
            opts = _options(table, policy_v, list(values))
            base, side, cached = video_task.run_video(model_v, digit_v, vx_v, vy_v, seed_v, frames_v, policy_v, opts,
                                                      _progress_adapter(progress))
        except Exception as e:  # noqa: BLE001 - every failure becomes a message in the page
            return _error_text(e), None, None, None
        saved = 1 - side.kv_bytes / base.kv_bytes if base.kv_bytes else 0.0
        lines = [
            f"KV memory: baseline {base.kv_bytes / 1024:.1f} KiB · {side.label} {side.kv_bytes / 1024:.1f} KiB "
            f"({saved:.1%} less)",
            f"denoising fps: baseline {base.fps:.1f}{' (cached)' if cached else ''} · {side.label} {side.fps:.1f}",
            f"speedup: {side.fps / base.fps:.2f}x (fps ratio)",
            f"PSNR vs baseline: {_fmt_db(media.psnr(base.frames, side.frames))}",
        ]
        return "done", media.write_mp4(base.frames), media.write_mp4(side.frames), "\n".join(f"- {ln}" for ln in lines)

    button.click(generate, inputs=[model, digit, vx, vy, seed, frames, policy, *widgets],
                 outputs=[status, v_base, v_pol, metrics], api_name="generate_video")


# -- app ------------------------------------------------------------------------------------------
def build_app(concurrency: int = 2) -> Any:
    """The Blocks app (queued: ``concurrency`` requests run at once, each on its own instances)."""
    import gradio as gr

    with gr.Blocks(title="dcache demo") as app:
        gr.Markdown(f"# dcache {dcache.__version__}: baseline vs accelerated")
        with gr.Tab("Image", elem_id="tab-image"):
            _image_tab(gr)
        with gr.Tab("dLLM", elem_id="tab-dllm"):
            _dllm_tab(gr)
        with gr.Tab("AR video", elem_id="tab-video"):
            _video_tab(gr)
    app.queue(default_concurrency_limit=concurrency, max_size=64)
    return app


def host_warning(host: str) -> str | None:
    if host in LOCAL_HOSTS:
        return None
    return f"serving the dcache demo on {host}, reachable from other machines; it has no authentication"


def launch(host: str = "127.0.0.1", port: int = 7860, concurrency: int = 2, block: bool = True) -> Any:
    """Start the app; binding beyond localhost happens only when asked for, and warns."""
    warning = host_warning(host)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    app = build_app(concurrency)
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, show_error=True)
    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dcache demo", description="Gradio demo: baseline vs accelerated, side by side.")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others warn)")
    ap.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ap.add_argument("--concurrency", type=int, default=2, help="requests served at once (default 2)")
    args = ap.parse_args(argv)
    if not 1 <= args.port <= 65535:
        ap.error(f"--port must be in [1, 65535], got {args.port}")
    if args.concurrency < 1:
        ap.error(f"--concurrency must be at least 1, got {args.concurrency}")
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("the demo needs gradio: pip install 'dcache[demo]'", file=sys.stderr)
        return 2
    try:
        launch(args.host, args.port, args.concurrency, block=True)
    except OSError as e:
        print(f"cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
