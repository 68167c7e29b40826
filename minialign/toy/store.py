"""Checkpoints under data/: <name>.safetensors (weights) + <name>.json (class, config, schedule,
the command that remade it, measured quality). Nothing is ever downloaded."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minialign.schedule import Schedule
from minialign.toy.models import MODELS

DATA_DIR = Path(__file__).resolve().parents[2] / "data"


def recipe_args(doc: str, recipes, argv=None, steps_help: str = "override the recipe's number of steps"):
    """The command line every "train and ship a checkpoint" script shares: NAME (a recipe or all), --steps,
    --seed, --out. Returns (parsed args, the recipe names to run)."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=[*recipes, "all"])
    p.add_argument("--steps", type=int, default=None, help=steps_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DATA_DIR), help="folder to write into (default: data/)")
    args = p.parse_args(argv)
    return args, list(recipes) if args.name == "all" else [args.name]


def save(model: torch.nn.Module, name: str, meta: dict, data_dir: Path = DATA_DIR) -> Path:
    kind = next(k for k, cls in MODELS.items() if type(model) is cls)
    data_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(data_dir / f"{name}.safetensors"))
    meta = {"kind": kind, "config": model.config, **meta}
    (data_dir / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return data_dir / f"{name}.safetensors"


def load(name: str, data_dir: Path = DATA_DIR, device="cpu"):
    """(model in eval mode with frozen weights, Schedule or None, meta dict) for a shipped checkpoint."""
    data_dir = Path(data_dir)
    meta_path, weights = data_dir / f"{name}.json", data_dir / f"{name}.safetensors"
    if not meta_path.exists() or not weights.exists():
        have = sorted(p.stem for p in data_dir.glob("*.safetensors"))
        raise FileNotFoundError(
            f"no checkpoint {name!r} in {data_dir} (have: {have}); remake it with "
            f"`python -m minialign.toy.pretrain {name}`"
        )
    meta = json.loads(meta_path.read_text())
    model = MODELS[meta["kind"]](**meta["config"])
    model.load_state_dict(load_file(str(weights)))
    model.to(device).eval().requires_grad_(False)
    sched = meta.get("schedule")
    schedule = Schedule.make(sched["name"], sched["T"], sched["beta_start"], sched["beta_end"]) if sched else None
    return model, schedule, meta
