# The frontier run (issue #10): every dcache configuration and every peer on the same seeds.
# 50 steps, CFG 4, seeds 0-15 (0-7 chose the schedule family, 8-15 are held out), one torch thread, 3 interleaved timing rounds for the dcache rows
# (peers: 3 rounds right after their own quality run). About 10 min at 1 thread on an idle core.
# run1_* in this folder: the first run (residual-level schedules only, before level="output").
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
dcache bench --policies "static(interval=5,warmup_steps=3,level=output,residual_order=1),static(budget=12,warmup_steps=2,level=output,residual_order=1),static(budget=11,warmup_steps=2,level=output,residual_order=1),static(budget=10,warmup_steps=2,level=output,residual_order=1),static(budget=10,warmup_steps=2,level=output),static(budget=9,warmup_steps=2,level=output),static(budget=8,warmup_steps=2,level=output),static(budget=9,warmup_steps=2,level=output,ends=0.0),static(budget=9,warmup_steps=2),static(interval=5,warmup_steps=3,residual_order=1),fbcache(threshold=0.2,warmup_steps=3),fbcache(threshold=0.2,warmup_steps=3,residual_order=1),taylorseer(interval=6),taylorseer(interval=6,difference_from=3),taylorseer(interval=6,order=0),static(interval=25)" \
  --peers --threads 1 --repeats 3 --num-samples 16 --out bench/results/frontier
