set -x
nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,temperature.gpu,utilization.gpu,pci.bus_id --format=csv
nvidia-smi topo -m 2>&1 | head -5
python3 --version
python3 - <<'PY'
import sys, glob, json, time
sys.path[:0] = glob.glob(".device-probe/*.whl") + ["."]
from utopia_agent.gpus import make_inventory
inv = make_inventory("nvml", 0)
t = time.perf_counter(); snap = inv.snapshot(); dt = time.perf_counter() - t
for g in snap:
    print(json.dumps(g.__dict__))
print("snapshot seconds", round(dt, 4), "backend", inv.backend)
print("distance(0,0)", inv.distance(0, 0))
inv.close()
PY
