"""Rows and files of one ``dcache eval`` run: every metric computed from the samples on disk.

``score`` turns the finished samples of each configuration into a row (timing, FLOPs, memory,
fidelity to the baseline, task accuracy, FID/KID/CLIP, VBench); ``write_outputs`` writes
results.json/csv/md, pareto.png and grid.png (or the dLLM's JSONL) and prints the table.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import TYPE_CHECKING, Any

from dcache.eval.report import _fmt

if TYPE_CHECKING:
    from dcache.eval.evaluate import EvalConfig, Job

def vbench_rows(cfg: EvalConfig, store: Any, rows: list[dict], model: Any, conditions: list[Any]) -> None:
    """VBench dimension scores per row, run in the user's VBench environment (dcache.eval.vbench)."""
    from dcache.eval import vbench

    done = store.finished()
    for row in rows:
        recs = sorted((r for (cid, _), r in done.items() if cid == row["id"]), key=lambda r: r["index"])
        videos = [(os.path.join(cfg.out, r["video"]), model.text(conditions[r["index"]])) for r in recs]
        folder = os.path.join(cfg.out, "vbench", "videos", row["id"])
        vbench.layout(videos, folder)
        scores = vbench.run(cfg.vbench_python, folder, cfg.vbench_dims, os.path.join(cfg.out, "vbench", "results"),
                            row["id"])
        for d, v in scores.items():
            row[f"vbench_{d}"] = v


def score(cfg: EvalConfig, store: Any, jobs: list[Job], conditions: list[Any], model: Any, scorers: Any,
          notes: list[str]) -> list[dict]:
    """One row per configuration, every metric from the files on disk."""
    import statistics

    import torch

    from dcache.eval import metrics
    from dcache.eval.measure import speedup

    done = store.finished()
    measured = store.measured()
    by_job: dict[str, dict[int, dict]] = {}
    for (cid, i), rec in done.items():
        by_job.setdefault(cid, {})[i] = rec
    base_recs = by_job.get("baseline", {})
    idx_all = sorted(base_recs)
    base_imgs = {i: store.image(base_recs[i]) for i in idx_all}
    lp_ok, lp_note = metrics.lpips_status()
    if not lp_ok and cfg.task != "dllm":
        notes.append(lp_note)
    notes += scorers.notes
    base_flops = measured.get("baseline", {}).get("flops")
    rows = []
    for j in jobs:
        recs = by_job.get(j.id, {})
        if not recs:
            continue
        idx = sorted(set(recs) & set(base_recs))
        imgs = torch.stack([store.image(recs[i]) for i in sorted(recs)])
        row: dict[str, Any] = {"id": j.id, "source": j.source, "policy": j.policy, "label": j.label,
                               "options": j.options, "samples": len(recs),
                               "wall_s": statistics.median(r["wall_s"] for r in recs.values())}
        if j.id == "baseline":
            row.update(speedup=1.0, timed_pairs=len(recs), timing_sessions=len({r["session"] for r in recs.values()}))
        else:
            row.update(speedup(base_recs, recs))
        m = measured.get(j.id, {})
        row["flops"] = m.get("flops")
        row["computed_fraction"] = (m["flops"] / base_flops) if m.get("flops") is not None and base_flops else None
        row["peak_mem_bytes"] = m.get("peak_mem_bytes")
        if idx and not imgs.is_floating_point():  # text: share of tokens equal to the baseline's
            a = torch.stack([store.image(recs[i]) for i in idx])
            b = torch.stack([base_imgs[i] for i in idx])
            row["token_agreement"] = float((a == b).float().mean())
        elif idx:
            a = torch.stack([store.image(recs[i]) for i in idx])
            b = torch.stack([base_imgs[i] for i in idx])
            if a.ndim == 5:  # video (N, C, F, H, W): every frame is scored, then averaged
                nf = a.shape[2]
                row["psnr_per_frame"] = [metrics.psnr_capped(a[:, :, f], b[:, :, f]) for f in range(nf)]
                row["ssim_per_frame"] = [metrics.ssim(a[:, :, f], b[:, :, f]) for f in range(nf)]
                if lp_ok:
                    row["lpips_per_frame"] = [metrics.lpips_distance(a[:, :, f], b[:, :, f]) for f in range(nf)]
                a, b = a.transpose(1, 2).flatten(0, 1), b.transpose(1, 2).flatten(0, 1)
            row["psnr"] = metrics.psnr_capped(a, b)
            row["ssim"] = metrics.ssim(a, b)
            row["lpips"] = metrics.lpips_distance(a, b)
        if model.task_metric is not None:
            conds = [conditions[i] for i in sorted(recs)]
            ok = model.task_metric(imgs, conds)
            row["task"] = sum(ok) / len(ok)
            row["task_metric"] = model.task_metric_name
            if "task_extra" in model.info:
                row.update(model.info["task_extra"](imgs, conds))
        if idx and (scorers.fid is not None):
            a = torch.stack([store.image(recs[i]) for i in idx])
            b = torch.stack([base_imgs[i] for i in idx])
            if a.ndim == 5:  # video: every frame is an image of the distribution
                a, b = a.transpose(1, 2).flatten(0, 1), b.transpose(1, 2).flatten(0, 1)
            row.update(scorers.fid_kid(b, a))
        if scorers.clip is not None:
            caps = [model.text(conditions[i]) for i in sorted(recs)]
            if imgs.ndim == 5:  # video: the mean over frames of each frame against the video's caption
                caps = [c for c in caps for _ in range(imgs.shape[2])]
                row["clip_score"] = scorers.clip_score(imgs.transpose(1, 2).flatten(0, 1), caps)
            else:
                row["clip_score"] = scorers.clip_score(imgs, caps)
        if scorers.image_reward is not None:
            from dcache.eval import image_reward

            row["image_reward"] = image_reward.score(scorers.image_reward, imgs,
                                                     [model.text(conditions[i]) for i in sorted(recs)])
        rows.append(row)
    if len(idx_all) < len(cfg.seed_list):
        notes.append(f"baseline has {len(idx_all)} of {len(cfg.seed_list)} samples (run again to finish)")
    return rows


CSV_COLUMNS = ["id", "source", "policy", "label", "options", "samples", "wall_s", "speedup", "speedup_median",
               "timed_pairs", "timing_note", "flops", "computed_fraction", "peak_mem_bytes", "psnr", "ssim", "lpips",
               "token_agreement", "task", "task_metric", "attributes", "fid", "kid", "kid_std", "clip_score", "image_reward"]


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (tuple, list)):
        return [_clean(x) for x in v]
    return v


def write_outputs(cfg: EvalConfig, rows: list[dict], notes: list[str], store: Any, jobs: list[Job], model: Any) -> None:
    import torch

    from dcache.eval import pareto

    out = cfg.out
    meta = {"model": model.name, "steps": cfg.steps, "num_frames": cfg.num_frames, "guidance": cfg.guidance,
            "seeds": cfg.seed_list,
            "device": cfg.device, "torch_threads": torch.get_num_threads(), "notes": notes,
            "pareto_metric": cfg.pareto_metric}
    payload = {"meta": meta, "rows": [{k: _clean(v) for k, v in r.items()} for r in rows]}
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, os.path.join(out, "results.json"))
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        columns = CSV_COLUMNS + sorted({k for r in rows for k in r if k.startswith("vbench_")})
        w.writerow(columns)
        for r in rows:
            w.writerow([json.dumps(r[c], sort_keys=True) if isinstance(r.get(c), dict)
                        else ("" if r.get(c) is None else _clean(r.get(c))) for c in columns])
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(_markdown(rows) + "\n")
    pareto.plot(os.path.join(out, "pareto.png"), rows, cfg.pareto_metric)
    done = store.finished()
    if cfg.task == "dllm":
        _write_text_samples(cfg, store, jobs, model, done)
    else:
        _write_grid(cfg, store, jobs, model, done)
    what = {"ar-video": f"{cfg.num_frames} frames", "dllm": f"{cfg.gen_length} tokens, block {cfg.block_length}"}.get(
        cfg.task, f"{cfg.steps} steps" + (", video" if model.info.get("kind") == "video" else ""))
    print(f"\n{model.name}, {what}, {len(cfg.seed_list)} samples, {torch.get_num_threads()} CPU threads")
    print(_table(rows))
    for nt in notes:
        print(f"note: {nt}")
    figs = "pareto.png" if cfg.task == "dllm" else "pareto.png, grid.png"
    print(f"\nwrote results.json, results.csv, results.md, {figs} in {out}")


def _write_text_samples(cfg: EvalConfig, store: Any, jobs: list[Job], model: Any, done: dict) -> None:
    """samples/<config>.jsonl rewritten in index order, one line per sample, with its verdict
    (``correct``: the canvas is one of the problem's valid ``answers``)."""
    info = model.info
    for j in jobs:
        recs = sorted((r for (cid, _), r in done.items() if cid == j.id), key=lambda r: r["index"])
        path = os.path.join(cfg.out, "samples", f"{j.id}.jsonl")
        with open(path + ".tmp", "w") as f:
            for r in recs:
                out = torch_tensor(r["output"])
                f.write(json.dumps({"index": r["index"], "seed": r["seed"], "prompt": info["prompt_text"](r["seed"]),
                                    "output": info["render"](out), "answers": info["answers"](r["seed"]),
                                    "correct": info["correct"](out, r["seed"]), "tokens": r["output"]}) + "\n")
        os.replace(path + ".tmp", path)


def torch_tensor(values: list[int]):
    import torch

    return torch.tensor(values, dtype=torch.long)


def _write_grid(cfg: EvalConfig, store: Any, jobs: list[Job], model: Any, done: dict) -> None:
    import torch

    from dcache.eval.grid import write_grid

    out = cfg.out
    cols = [i for i in range(len(cfg.seed_list)) if ("baseline", i) in done][:8]
    grid_rows = []
    video = model.info.get("kind") == "video"
    frames = []
    if video and cols:  # one video: columns are evenly spaced frames of the first sample
        nf = store.image(done[("baseline", cols[0])]).shape[1]
        frames = sorted({round(k * (nf - 1) / 7) for k in range(8)}) if nf > 1 else [0]
    for j in jobs:
        if video and cols and (j.id, cols[0]) in done:
            v = store.image(done[(j.id, cols[0])])
            grid_rows.append((j.label, v[:, frames].transpose(0, 1)))
        elif not video and cols and all((j.id, i) in done for i in cols):
            grid_rows.append((j.label if j.source in ("dcache", "baseline") else f"{j.source}:{j.label}",
                              torch.stack([store.image(done[(j.id, i)]) for i in cols])))
    if video:
        headers = [f"frame {f}" for f in frames]
    else:
        conds = store.config["conditions"]
        headers = [f"seed {cfg.seed_list[i]}, " + (model.text(conds[i]) if model.conditioning == "prompt"
                                                   else f"class {conds[i]}") for i in cols]
    write_grid(os.path.join(out, "grid.png"), headers, grid_rows)


TABLE = [("source", "source"), ("label", "policy"), ("wall_s", "s/sample"), ("speedup", "speedup"),
         ("computed_fraction", "computed"), ("psnr", "psnr"), ("ssim", "ssim"), ("lpips", "lpips"),
         ("token_agreement", "same_tokens"), ("task", "task"), ("attributes", "attributes"),
         ("fid", "fid"), ("kid", "kid"), ("clip_score", "clip"), ("image_reward", "image_reward")]




def _cols(rows: list[dict]) -> list[tuple[str, str]]:
    extra = sorted({k for r in rows for k in r if k.startswith("vbench_")})
    return [(k, h) for k, h in TABLE if any(r.get(k) is not None for r in rows)] + [(k, k[7:]) for k in extra]


def _table(rows: list[dict]) -> str:
    cols = _cols(rows)
    cells = [[_fmt(r.get(k)) + ("*" if k == "speedup" and r.get("timing_note") else "") for k, _ in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(cols)]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(cols, widths))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    if any(r.get("timing_note") for r in rows):
        lines.append("* " + "; ".join(sorted({f"{r['label']}: {r['timing_note']}" for r in rows if r.get("timing_note")})))
    return "\n".join(lines)


def _markdown(rows: list[dict]) -> str:
    cols = _cols(rows)
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(k)).replace("|", "/") for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)
