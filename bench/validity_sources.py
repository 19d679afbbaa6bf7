"""ResNet-20 (or any model) on digits at pcm_harsh: curvature and measured single-layer sensitivity under one
noise condition, pickled for hilal.validity (issue 56). Usage:
python bench/validity_sources.py MODEL CONDITION REPS OUT.pkl
CONDITION: all (the preset), weights (programming+drift+read, exact periphery), -SOURCE (the preset without
SOURCE), or SOURCE[+SOURCE] (those alone)."""
import pickle
import sys
import time

import torch

from hilal.attribution import WEIGHT_SOURCES, source_config
from hilal.data import load_dataset
from hilal.hessian import HessianConfig, layer_metrics
from hilal.train import TrainConfig, trained_model
from hilal.validity import measured_sensitivity

torch.set_num_threads(1)
model_name, cond, reps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
noise = "output"
splits = load_dataset("digits", seed=0)
model = trained_model(model_name, splits, seed=0, cfg=TrainConfig(epochs=15, seed=0), progress=False)
if cond == "all":
    preset = "pcm_harsh"
elif cond == "weights":
    preset = source_config("pcm_harsh", list(WEIGHT_SOURCES))
elif cond.startswith("-"):
    preset = source_config("pcm_harsh", cond[1:], alone=False)
else:
    preset = source_config("pcm_harsh", cond.split("+"))
hcfg = HessianConfig(noise=noise, t_inference=86400.0, seed=0)
t0 = time.time()
metrics = layer_metrics(model, splits, preset, hcfg, progress=False)
t1 = time.time()
print(f"curvature {t1-t0:.1f}s", flush=True)
sens, draws = measured_sensitivity(model, splits, preset, 86400.0, reps, 0)
t2 = time.time()
print(f"sensitivity {t2-t1:.1f}s", flush=True)
pickle.dump({"metrics": metrics, "attrs": dict(metrics.attrs), "sens": sens, "draws": draws, "curv_s": t1 - t0,
             "sens_s": t2 - t1}, open(out, "wb"))
