import sys, time
sys.path.insert(0, "benchmarks/accuracy"); sys.path.insert(0, "benchmarks")
import pairs
cfg = pairs.settings(pairs.parse_args([]))
cfg["stem"]="pairs"
for src in ("mnist5k", "kmnist"):
    print(pairs.image_prior(cfg, src, print))
