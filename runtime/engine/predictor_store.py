"""``--length-predictor-path``: what the SJF/SRTF length predictor learned, kept across restarts.

Read when the engine starts (if the file exists), written when it closes, atomically (a temporary
file renamed over the old one), so a crash mid-write leaves the previous state. JSON via msgspec.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import structlog

from conveyor.runtime.engine.config import ConfigError
from conveyor.scheduler.length_predictor import LengthPredictor, PredictorState

log = structlog.get_logger("conveyor.policy")


def load_predictor(predictor: LengthPredictor, path: Path) -> None:
    try:
        state = msgspec.json.decode(path.read_bytes(), type=PredictorState)
        predictor.load_state(state)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
        raise ConfigError(f"--length-predictor-path {path}: not a length predictor state ({e}); "
                          "remove the file to start from scratch") from e
    log.info("length predictor loaded", path=str(path), finishes=state.num_observed)


def save_predictor(predictor: LengthPredictor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.json.encode(predictor.state()))
    os.replace(tmp, path)
    log.info("length predictor saved", path=str(path), finishes=predictor.num_observed)
