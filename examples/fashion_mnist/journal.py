"""The journal of a sweep: each finished run as one JSON line, for ``--resume``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from .config import Recipe, RunResult, RunSpec, result_from_json, result_to_json
from .grid import DataRequest


class Journal:
    """Each finished run, one JSON line, so an interrupted sweep can resume.

    A line is reused only for the same run spec, recipe and data.
    """

    def __init__(
        self, path: Path, request: DataRequest, recipes: dict[str, Recipe]
    ) -> None:
        self.path = path
        self.request = dataclasses.asdict(request)
        self.recipes = {m: dataclasses.asdict(r) for m, r in recipes.items()}

    def clear(self) -> None:
        """Starts an empty journal."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def append(self, result: RunResult) -> None:
        """Records one finished run."""
        record = {
            "request": self.request,
            "recipe": self.recipes[result.spec.model],
            "result": result_to_json(result),
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def load(self, grid: Sequence[RunSpec]) -> dict[RunSpec, RunResult]:
        """The journal's runs that belong to ``grid`` under this recipe and data."""
        if not self.path.is_file():
            return {}
        wanted = set(grid)
        kept: dict[RunSpec, RunResult] = {}
        for line in self.path.read_text().splitlines():
            record = json.loads(line)
            result = result_from_json(record["result"])
            if (
                result.spec in wanted
                and record["request"] == self.request
                and record["recipe"] == self.recipes.get(result.spec.model)
            ):
                kept[result.spec] = result
        return kept
