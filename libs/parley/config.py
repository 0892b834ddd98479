"""The one config loader: YAML or JSON files into typed pydantic models.

Errors name the file and the offending field so an operator can fix them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from parley.errors import InvalidInput

ModelT = TypeVar("ModelT", bound=BaseModel)


def load_config(path: str | Path, model: type[ModelT]) -> ModelT:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"cannot read config file {p}: {exc}") from exc
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InvalidInput(f"config file {p} is not valid {p.suffix or 'YAML'}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidInput(f"config file {p} must hold a mapping at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"config file {p} is invalid:\n{exc}") from exc
