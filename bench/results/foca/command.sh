# Profiles (seeds 100-103, not the bench's 0-7), then the one bench run with peers. 1 thread.
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
for cfg in "6 3" "10 6" "16 3"; do set -- $cfg
  python bench/hyca_profile.py --out bench/results/foca/profiles/hyca_i$1_w$2.json --interval $1 --warmup-steps $2 --seeds 100,101,102,103
done
dcache bench --policies "taylorseer,foca,taylorseer(interval=6),taylorseer(interval=6,order=0),hyca(profile=bench/results/foca/profiles/hyca_i6_w3.json,interval=6),hyca(profile=bench/results/foca/profiles/hyca_i10_w6.json,interval=10,warmup_steps=6),hyca(profile=bench/results/foca/profiles/hyca_i16_w3.json,interval=16),taylorseer(interval=16,order=0),foca(interval=16),static(interval=25)" --peers --threads 1 --repeats 3 --num-samples 8 --out bench/results/foca
