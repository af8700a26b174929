"""The `slurm:` config section (`SlurmConfig`): the #SBATCH resources of every job and per stage;
and model sizing (`gpus_for_model`: the GPUs a model's weights and KV cache need, from its
parameter count, `params_billions`). A leaf: run and generation configs hold one;
`exit_loop.pipeline.slurm` reads it.

    slurm:
      partition: gpu
      time: '12:00:00'        # quoted: YAML reads an unquoted 12:00:00 as seconds
      rollout: {gpus: 4}
      train: {gpus: 8, mem: 0}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path


@dataclass
class Resources:
    """One stage's #SBATCH resources; a key left unset takes the `slurm:` section's own value."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus: int | None = None       # --gpus-per-node
    cpus: int | None = None       # --cpus-per-task
    mem: str | int | None = None  # --mem, e.g. 64G (0: all of the node's memory)
    time: str | int | None = None  # --time, e.g. "12:00:00" (quoted), "1-00:00:00"
    extra: list[str] = field(default_factory=list)  # more #SBATCH lines, e.g. "--constraint=h100"

    def __post_init__(self) -> None:
        if isinstance(self.time, int):
            raise ValueError(f"time: got the number {self.time}; YAML reads an unquoted 12:00:00 as "
                             "a number of seconds: quote it (time: '12:00:00')")


@dataclass
class SlurmConfig(Resources):
    """The `slurm:` section: defaults for every job (the Resources keys), per-stage sections that
    override them, and what every job script runs first. Unset GPUs: sample.tensor_parallel_size
    for rollout jobs, 1 for train, none for the rest."""
    rollout: Resources = field(default_factory=Resources)  # jobs that sample: eval + sample, generate
    merge: Resources = field(default_factory=Resources)    # shards -> one file (generation: + verify, filter)
    verify: Resources = field(default_factory=Resources)
    filter: Resources = field(default_factory=Resources)
    train: Resources = field(default_factory=Resources)    # >1 GPU: accelerate launch unless train.launcher
    server: Resources = field(default_factory=Resources)   # a launched server (sample.server.launch): its job
    nodes: int = 1                # train jobs span this many nodes (accelerate launch on each, through srun)
    signal_s: int = 180           # USR1 this long before the time limit: the job requeues itself
    env: dict[str, str] = field(default_factory=dict)      # exported in every job
    setup: list[str] = field(default_factory=list)         # shell lines every job runs first (module load …)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.signal_s < 0:
            raise ValueError(f"signal_s must be >= 0, got {self.signal_s}")
        if self.nodes < 1:
            raise ValueError(f"slurm.nodes must be at least 1, got {self.nodes}")

    def resources(self, section: str, gpus: int) -> Resources:
        """The section's resources over the defaults; `gpus` where neither sets them."""
        sec: Resources = getattr(self, section)
        out = {f.name: getattr(sec, f.name) if getattr(sec, f.name) is not None else getattr(self, f.name)
               for f in fields(Resources) if f.name != "extra"}
        if out["gpus"] is None:
            out["gpus"] = gpus
        return Resources(**out, extra=[*self.extra, *sec.extra])


# --------------------------------------------------------------------------- GPU count

_SIZE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])")
KNOWN_PARAMS_B = {"deepseek-ai/DeepSeek-R1": 671.0, "deepseek-ai/DeepSeek-V3": 671.0}


def params_billions(model: str) -> float | None:
    """Parameter count in billions from a local config.json or the model's name, else None."""
    if model in KNOWN_PARAMS_B:
        return KNOWN_PARAMS_B[model]
    cfg_path = Path(model).expanduser() / "config.json"
    if cfg_path.exists():
        c = json.loads(cfg_path.read_text())
        h, layers, vocab = c.get("hidden_size"), c.get("num_hidden_layers"), c.get("vocab_size")
        inter = c.get("intermediate_size") or (4 * h if h else None)
        if h and layers and vocab:
            per_layer = 4 * h * h + 3 * h * inter
            return (layers * per_layer + 2 * vocab * h) / 1e9
    sizes = [float(m.group(1)) for m in _SIZE.finditer(model.rsplit("/", 1)[-1])]
    return max(sizes) if sizes else None


def gpus_for_model(model: str, gpu_memory_gb: float = 80.0, max_gpus: int = 8) -> int:
    """The smallest power of two (at most `max_gpus`) of GPUs whose memory holds the model's bf16
    weights with 40% left for the KV cache; 1 when its size is unknown."""
    b = params_billions(model)
    if b is None:
        return 1
    need_gb = 2.0 * b / 0.6  # bf16 weights, 40% of memory left for the KV cache
    n = 1
    while n * gpu_memory_gb < need_gb and n < max_gpus:
        n *= 2
    return n
