"""Progress bars for long work, on stderr, so stdout stays for results."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(items: Iterable[T], *, description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ITEMS with a progress bar (shown only on a terminal; logs stay clean in CI and Argo)."""
    from rich.console import Console
    from rich.progress import track as rich_track

    console = Console(stderr=True)
    if not console.is_terminal:
        yield from items
        return
    yield from rich_track(items, description=description, total=total, console=console, transient=True)
