"""Run directories: a trained model, its config, and its optimizer trajectory on disk.

    RUN/config.json           preset, seed, sha256 of the weights, and their digest
    RUN/weights.npy           the per-example weights (n,)
    RUN/traj/step_XXXXXX.pt   Adam state before step k, every ~sqrt(T) steps (replay, resume)
    RUN/final.pt              the state after the last step, with the loss curve

Every file is written atomically and every .pt carries the config digest, so a torn write or
a file from another config is detected, never silently used. Tensors load with
weights_only=True.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from engine import atomic
from engine.errors import UserError
from engine.presets import Preset, digest, preset_from_dict
from engine.training import TrainState

FORMAT = 1


def run_config(preset: Preset, seed: int, weights: np.ndarray) -> dict:
    """The config (what its digest is of) of a run of `preset` with this seed and weights (n,)."""
    return {"format": FORMAT, "preset": preset.to_dict(), "seed": int(seed),
            "weights_sha256": hashlib.sha256(np.ascontiguousarray(weights, dtype=np.float32).tobytes()).hexdigest()}


@dataclass
class Run:
    path: Path
    config: dict
    digest: str

    @property
    def preset(self) -> Preset:
        return preset_from_dict(self.config["preset"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    def weights(self) -> np.ndarray:
        return np.load(self.path / "weights.npy", allow_pickle=False)

    # -- trajectory
    def _ckpt_path(self, step: int) -> Path:
        return self.path / "traj" / f"step_{step:06d}.pt"

    def checkpoint_steps(self) -> list[int]:
        return sorted(int(p.stem[5:]) for p in (self.path / "traj").glob("step_*.pt"))

    def save_checkpoint(self, state: TrainState, losses: list[float]) -> None:
        atomic.save_torch({"digest": self.digest, **_cpu(state).to_dict(), "losses": list(losses)}, self._ckpt_path(state.step))

    def load_checkpoint(self, step: int) -> tuple[TrainState, list[float]]:
        d = self._load(self._ckpt_path(step), expect_step=step)
        return TrainState.from_dict(d), list(d["losses"])

    def latest_checkpoint(self) -> Optional[tuple[TrainState, list[float]]]:
        """The most advanced stored state that loads cleanly (a damaged one is skipped)."""
        for step in reversed(self.checkpoint_steps()):
            try:
                return self.load_checkpoint(step)
            except UserError:
                continue
        return None

    # -- final state
    def final_exists(self) -> bool:
        return (self.path / "final.pt").is_file()

    def save_final(self, state: TrainState, losses: list[float], seconds: float) -> None:
        atomic.save_torch({"digest": self.digest, **_cpu(state).to_dict(), "losses": list(losses), "seconds": seconds},
                          self.path / "final.pt")

    def load_final(self) -> TrainState:
        return TrainState.from_dict(self._load(self.path / "final.pt", expect_step=self.preset.steps))

    def losses(self) -> list[float]:
        return list(self._load(self.path / "final.pt", expect_step=self.preset.steps)["losses"])

    def train_seconds(self) -> float:
        """Wall time of the training session that finished the run (after any resume)."""
        return float(self._load(self.path / "final.pt", expect_step=self.preset.steps).get("seconds", float("nan")))

    def model(self, device: Optional[str] = None) -> torch.nn.Module:
        """The trained score network (final parameters), in eval mode, on `device` (default: the
        preset's, with engine.device's deterministic settings)."""
        from engine.bpd import model_for
        m = model_for(self.preset, self.seed, self.load_final().model_params)
        return m if device is None else m.to(device)

    def _load(self, path: Path, expect_step: int) -> dict:
        if not path.is_file():
            raise UserError(f"{path} is missing")
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
            raise UserError(f"{path} is corrupt ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
        if not isinstance(d, dict) or not {"digest", "step", "params", "m", "v"} <= set(d):
            raise UserError(f"{path} is corrupt (not a training state)")
        if d["digest"] != self.digest:
            raise UserError(f"{path} belongs to another config (digest {str(d['digest'])[:12]}, expected {self.digest[:12]})")
        if int(d["step"]) != expect_step:
            raise UserError(f"{path} is corrupt (holds step {d['step']}, expected {expect_step})")
        return d


def _cpu(state: TrainState) -> TrainState:
    return state.map(lambda x: x.detach().cpu())


def config_difference(stored: dict, wanted: dict) -> str:
    """What tells two run configs apart, in words: e.g. "preset cpu with steps 600, not 3000"
    (a preset's settings change between versions, and a user's old run then stops matching)."""
    a, b = stored.get("preset", {}), wanted.get("preset", {})
    fields = [k for k in sorted(set(a) | set(b)) if k != "name" and a.get(k) != b.get(k)]
    said = [f"{k} {_show(a.get(k))}, not {_show(b.get(k))}" for k in fields]
    if stored.get("seed") != wanted.get("seed"):
        said.append(f"seed {stored.get('seed')}, not {wanted.get('seed')}")
    if stored.get("weights_sha256") != wanted.get("weights_sha256"):
        said.append("other per-example weights")
    if stored.get("format") != wanted.get("format"):
        said.append(f"format {stored.get('format')}, not {wanted.get('format')}")
    name = a.get("name") if a.get("name") == b.get("name") else f"{a.get('name')}, not {b.get('name')}"
    return f"preset {name}" + (" with " + "; ".join(said) if said else "")


def _show(v) -> str:
    return "(" + ", ".join(map(str, v)) + ")" if isinstance(v, (list, tuple)) else str(v)


def open_for_training(path: Path, preset: Preset, seed: int, weights: np.ndarray, n_params: int) -> Run:
    """Create RUN for this config, or reopen it to resume; refuse a directory of another config."""
    cfg = run_config(preset, seed, weights)
    dig = digest(cfg)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a directory")
    if (path / "config.json").exists():
        run = _read_config(path)
        if run.digest != dig:
            raise UserError(f"{path} holds a run of another config ({config_difference(run.config, cfg)}); "
                            "choose another --out or delete it")
        return run
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"{path} exists, is not empty and is not a run directory; choose another --out")
    atomic.save_npy(np.asarray(weights, dtype=np.float32), path / "weights.npy")
    atomic.save_json({**cfg, "digest": dig, "n_params": n_params}, path / "config.json")
    return Run(path, cfg, dig)


def set_aside_other(path: Path, preset: Preset, seed: int, weights: np.ndarray) -> Optional[Path]:
    """Move a run of another config at PATH (one made by an earlier version of the preset, or by
    another version of this tool) to PATH.<its digest[:8]>, so PATH is free to train this config.

    Returns where it went, or None when PATH holds no run or one of this config. A config.json that
    cannot be read is left for open_for_training to report: it may be a torn copy of this very run."""
    try:
        stored = json.loads((path / "config.json").read_text()).get("digest")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(stored, str) or stored == digest(run_config(preset, seed, weights)):
        return None
    aside = path.with_name(f"{path.name}.{stored[:8]}")
    k = 1
    while aside.exists():  # the same old run set aside before and made again: keep both
        aside, k = path.with_name(f"{path.name}.{stored[:8]}.{k}"), k + 1
    path.rename(aside)
    return aside


def _read_config(path: Path) -> Run:
    try:
        raw = json.loads((path / "config.json").read_text())
        cfg = {k: raw[k] for k in ("format", "preset", "seed", "weights_sha256")}
        preset_from_dict(cfg["preset"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}/config.json is corrupt ({type(e).__name__})") from None
    if raw.get("digest") != digest(cfg):
        raise UserError(f"{path}/config.json is corrupt (its digest does not match its contents)")
    if cfg["format"] != FORMAT:
        raise UserError(f"{path} was written by another version of this tool (format {cfg['format']}, expected {FORMAT})")
    return Run(path, cfg, raw["digest"])


def load_run(path: Path | str) -> Run:
    """Open a finished run for use; every problem is a one-line UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"run directory {path} does not exist (make one with: python -m engine train --preset cpu --out {path})")
    if not path.is_dir():
        raise UserError(f"{path} is not a run directory")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a run directory (no config.json)")
    run = _read_config(path)
    if not run.final_exists():
        done = run.checkpoint_steps()
        raise UserError(f"run {path} is unfinished (stored up to step {done[-1] if done else 0} of {run.preset.steps}); "
                        f"resume it with: python -m engine train --preset {run.preset.name} --out {path} --seed {run.seed}")
    try:
        w = run.weights()
    except (OSError, ValueError) as e:
        raise UserError(f"{path}/weights.npy is corrupt ({type(e).__name__})") from None
    if hashlib.sha256(np.ascontiguousarray(w, dtype=np.float32).tobytes()).hexdigest() != run.config["weights_sha256"]:
        raise UserError(f"{path}/weights.npy does not match its config")
    run.load_final()  # validates the final state now rather than at first use
    return run
