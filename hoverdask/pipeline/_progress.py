"""Rich progress bars: one per slide and one for the cohort, fed by finished tasks."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


class CohortProgress:
    """Counts finished tasks per slide; a disabled instance does nothing."""

    def __init__(self, *, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            disable=not enabled,
        )
        self._overall: TaskID | None = None
        self._slides: dict[str, TaskID] = {}

    def __enter__(self) -> Self:
        self._progress.__enter__()
        self._overall = self._progress.add_task("[bold]all slides", total=0)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.__exit__(exc_type, exc, tb)

    def add_slide(self, slide_id: str, tasks: int) -> None:
        self._slides[slide_id] = self._progress.add_task(slide_id, total=tasks)
        if self._overall is not None:
            total = self._progress.tasks[self._overall].total or 0
            self._progress.update(self._overall, total=total + tasks)

    def skip(self, slide_id: str) -> None:
        self._progress.console.print(f"{slide_id}: finished earlier, skipped", highlight=False)

    def advance(self, slide_id: str) -> None:
        self._progress.advance(self._slides[slide_id])
        if self._overall is not None:
            self._progress.advance(self._overall)

    def finish(self, slide_id: str, *, ok: bool) -> None:
        task = self._slides[slide_id]
        label = "[green]done" if ok else "[red]failed"
        remaining = (self._progress.tasks[task].total or 0) - self._progress.tasks[task].completed
        self._progress.update(task, description=f"{slide_id} {label}")
        if not ok and self._overall is not None:
            self._progress.advance(self._overall, remaining)
